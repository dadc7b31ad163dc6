"""``linear_log_probs`` under ``jax.jit`` with ``NamedSharding`` inputs on Explicit and Auto
meshes: the values and the gradients of ``x``, ``w`` and ``b`` equal those of the same call
on one device, and the compiled program gathers neither ``w``'s ``[D, V]`` nor a
``[tokens, V]`` array."""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import softmax_jax as sj

B, T, D, V = 4, 4, 8, 32


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    tokens[0, 1] = tokens[2, 3] = -100
    return {
        "x": rng.normal(size=(B, T, D)).astype(np.float32),
        "w": (0.6 * rng.normal(size=(D, V))).astype(np.float32),
        "b": (0.3 * rng.normal(size=V)).astype(np.float32),
        "tokens": tokens,
        "where": rng.random((B, T)) > 0.25,
        "g": rng.normal(size=(B, T)).astype(np.float32),
        "h": rng.normal(size=(B, T)).astype(np.float32),
    }


ARRAYS = _inputs()


def _loss(x, w, b, tokens, where, g, h, entropy):
    """A scalar with per-token cotangents that are not all ones (of logp, and entropy)."""
    out = sj.linear_log_probs(x, w, tokens, b, temperature=1.5, ignore_index=-100,
                              where=where, return_entropy=entropy)
    if entropy:
        return jnp.sum(out[0] * g + out[1] * h), out
    return jnp.sum(out * g), out


def _run(arrays: dict, entropy: bool) -> list[np.ndarray]:
    grad = jax.value_and_grad(functools.partial(_loss, entropy=entropy), argnums=(0, 1, 2),
                              has_aux=True)
    out = jax.jit(grad)(*(arrays[n] for n in "x w b tokens where g h".split()))
    return [np.asarray(a) for a in jax.tree.leaves(out)]


@functools.cache
def _one_device(entropy: bool) -> list[np.ndarray]:
    return _run({n: jnp.asarray(a) for n, a in ARRAYS.items()}, entropy)


TOKENS = {"x": P("data"), "tokens": P("data"), "where": P("data"), "g": P("data"),
          "h": P("data")}
CASES = {
    # mesh shape, names, axis type, specs
    "explicit_2d_vocab": ((2, 4), ("data", "model"), AxisType.Explicit,
                          dict(TOKENS, w=P(None, "model"), b=P("model"))),
    "auto_2d_vocab": ((2, 4), ("data", "model"), AxisType.Auto,
                      dict(TOKENS, w=P(None, "model"), b=P("model"))),
    "auto_1d_fsdp": ((4,), ("data",), AxisType.Auto, dict(TOKENS, w=P("data", None))),
    "auto_1d_vocab": ((8,), ("data",), AxisType.Auto, {"w": P(None, "data"), "b": P("data")}),
}


@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "entropy"])
@pytest.mark.parametrize("case", list(CASES))
def test_linear_log_probs_under_jit_on_a_mesh_equals_one_device(case, entropy):
    shape, names, kind, specs = CASES[case]
    mesh = jax.make_mesh(shape, names, axis_types=(kind,) * len(names),
                         devices=jax.devices()[:int(np.prod(shape))])
    with jax.set_mesh(mesh):
        placed = {n: jax.device_put(a, NamedSharding(mesh, specs.get(n, P())))
                  for n, a in ARRAYS.items()}
        got = _run(placed, entropy)
    want = _one_device(entropy)
    assert len(got) == len(want) == (6 if entropy else 5)  # value, outputs, 3 grads
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-6)
        assert np.isfinite(e).all()


_GATHER = re.compile(r"=\s*(\([^)]*\)|\S+)\s+all-gather(?:-start)?\(")


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=lambda k: k.name)
def test_vocab_parallel_linear_log_probs_gathers_no_vocabulary(kind):
    n, d, v = 512, 64, 4096
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))

    def loss(x, w, tokens):
        logp, ent = sj.linear_log_probs(x, w, tokens, return_entropy=True)
        return jnp.sum(logp) + 0.1 * jnp.sum(ent)

    args = [((n, d), P("data"), jnp.float32), ((d, v), P(None, "model"), jnp.float32),
            ((n,), P("data"), jnp.int32)]
    structs = [jax.ShapeDtypeStruct(s, t, sharding=NamedSharding(mesh, p))
               for s, p, t in args]
    with jax.set_mesh(mesh):
        text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*structs).compile() \
            .as_text()
    gathers: collections.Counter = collections.Counter()
    for shape in _GATHER.findall(text):
        dims = re.search(r"\[([\d,]*)\]", shape)
        gathers[tuple(int(a) for a in dims.group(1).split(",") if a) if dims else ()] += 1
    wide = {s: c for s, c in gathers.items() if s and s[-1] == v}
    assert not wide, f"all-gathers of vocabulary-wide arrays: {wide}"
