"""The compiled programs of the core functions make no N x V pass beyond what their outputs need.

Counted in XLA's own compiled program (``compile().as_text()``): the instructions of the entry
computation whose result has the logits' shape, parameters left out. Each is an N x V array
written to memory. A softmax needs one (its output); so does a log-softmax, and the gradient
of ``logsumexp``; the integer-label cross-entropy's gradient needs one pass plus the
scatter-add of one entry per row at the labels, which XLA applies in place; the dense
cross-entropy's gradient needs one.

The shape is chosen so that XLA:CPU takes the path it takes at benchmark sizes (its YNNPACK
fusion of reductions with their element-wise consumers is used from about 4096 rows; a
narrow vocabulary keeps the compile cheap). Other backends fuse differently, so the counts
are pinned on CPU only.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import softmax_jax as sj

N, V = 4096, 64

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the counts describe XLA:CPU's fusion decisions"
)


def n_by_v_arrays(fn, *args) -> list[str]:
    """The non-parameter instructions of ``jit(fn)``'s entry computation shaped f32[N, V]."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    shape = re.compile(rf"=\s*f32\[{N},{V}\]")
    return [line.strip() for line in entry.splitlines()
            if shape.search(line) and " parameter(" not in line]


LOGITS = jax.ShapeDtypeStruct((N, V), jnp.float32)
LABELS = jax.ShapeDtypeStruct((N,), jnp.int32)


def mean_value_and_grad(loss):
    return jax.value_and_grad(lambda z, *rest: loss(z, *rest).mean())


CASES = {
    # name: (softmax_jax function, its jax.nn / optax counterpart, args, arrays the output needs)
    "softmax": (sj.softmax, jax.nn.softmax, (LOGITS,), 1),
    "log_softmax": (sj.log_softmax, jax.nn.log_softmax, (LOGITS,), 1),
    "logsumexp value_and_grad": (
        mean_value_and_grad(functools.partial(sj.logsumexp, axis=-1)),
        mean_value_and_grad(functools.partial(jax.nn.logsumexp, axis=-1)), (LOGITS,), 1),
    "integer-label cross-entropy value_and_grad": (
        mean_value_and_grad(sj.softmax_cross_entropy_with_integer_labels),
        mean_value_and_grad(optax.softmax_cross_entropy_with_integer_labels),
        (LOGITS, LABELS), 2),
    # Unfenced, the backward pass shared the forward pass's broadcast row maximum, which XLA
    # then wrote out as a full N x V array for the label sum (500 MiB at 4096 x 32000).
    "dense cross-entropy value_and_grad": (
        mean_value_and_grad(sj.softmax_cross_entropy),
        mean_value_and_grad(optax.softmax_cross_entropy), (LOGITS, LOGITS), 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_no_n_by_v_pass_beyond_the_output(name):
    fn, anchor, args, needed = CASES[name]
    ours = n_by_v_arrays(fn, *args)
    theirs = n_by_v_arrays(anchor, *args)
    assert len(ours) <= needed, (
        f"{name}: {len(ours)} N x V arrays, the output needs {needed}"
        f" (the jax.nn/optax counterpart compiles to {len(theirs)}):\n" + "\n".join(ours))


def test_distillation_value_and_grad_holds_one_n_by_v_temporary():
    # Without the fence on the backward pass's normalisers XLA kept each head's z/T - m from
    # the forward pass and wrote it out: 2.0 N x V arrays here (1500 MiB at 4096 x 32000,
    # against 500 for the fenced rule and 2000 for the optax composition).
    fn = jax.value_and_grad(
        lambda s, t: sj.distillation_loss(s, t, temperature=2.0).mean(), argnums=(0, 1))
    temp = jax.jit(fn).lower(LOGITS, LOGITS).compile().memory_analysis().temp_size_in_bytes
    assert temp <= 1.25 * N * V * 4, temp / (N * V * 4)
