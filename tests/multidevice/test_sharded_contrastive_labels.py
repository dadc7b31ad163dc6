"""CLIP with ``labels`` (each row's positive a column of ``y`` by its global index) under
``jax.jit`` with batch-sharded ``x`` and ``y``: the one-device value and gradients, on the
ring (``collective-permute`` of ``y``'s blocks, no all-gather of ``y``)."""

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

N, D = 16, 8
CN, CD = 2048, 64


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    half = rng.random(N // 2) > 0.25
    return {"x": rng.normal(size=(N, D)).astype(np.float32),
            "y": (0.5 * rng.normal(size=(N, D))).astype(np.float32),
            # each row's positive lives on another device; a kept row names a kept column
            "labels": ((np.arange(N) + N // 2) % N).astype(np.int32),
            "where": np.concatenate([half, half]),
            "g": rng.normal(size=N).astype(np.float32)}


ARRAYS = _arrays()


def _loss(x, y, labels, where, g):
    out = sj.contrastive_loss(x, y, labels=labels, bidirectional=False, logit_scale=1.5,
                              where=where, reduction="none")
    return jnp.sum(out * g) + sj.contrastive_loss(x, y, labels=labels, bidirectional=False)


def _value_and_grads(arrays) -> list[np.ndarray]:
    out = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1)))(
        *(arrays[n] for n in ("x", "y", "labels", "where", "g")))
    return [np.asarray(a) for a in jax.tree.leaves(out)]


@functools.cache
def _one_device() -> list[np.ndarray]:
    return _value_and_grads({n: jnp.asarray(a) for n, a in ARRAYS.items()})


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=lambda k: k.name)
def test_labelled_clip_on_a_batch_sharded_mesh_equals_one_device(kind):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
    with jax.set_mesh(mesh):
        placed = {n: jax.device_put(a, NamedSharding(mesh, P("data")))
                  for n, a in ARRAYS.items()}
        got = _value_and_grads(placed)
    for g, e in zip(got, _one_device(), strict=True):
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-6)


_OP = re.compile(r"=\s*(\([^)]*\)|\S+)\s+(all-gather|collective-permute)(?:-start)?\(")


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=lambda k: k.name)
def test_labelled_clip_goes_round_the_ring(kind):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
    structs = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, P("data")))
               for s, d in (((CN, CD), jnp.float32), ((CN, CD), jnp.float32),
                            ((CN,), jnp.int32))]

    def loss(x, y, labels):
        return sj.contrastive_loss(x, y, labels=labels, bidirectional=False)

    with jax.set_mesh(mesh):
        text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*structs).compile(
        ).as_text()
    coll: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for shape, kind_ in _OP.findall(text):
        coll[kind_][re.sub(r"\{[^}]*\}", "", shape)] += 1
    assert f"f32[{CN},{CD}]" not in coll["all-gather"], dict(coll["all-gather"])
    assert coll["collective-permute"][f"f32[{CN // 8},{CD}]"] >= 1, dict(coll["collective-permute"])


def test_labelled_clip_with_columns_that_do_not_divide_over_the_devices():
    """``y``'s 12 rows cannot go round a ring of 8: the whole batch on every device, the
    one-device numbers."""
    x, y = ARRAYS["x"], ARRAYS["y"][:12]
    labels = ARRAYS["labels"] % 12

    def loss(x, y, labels):
        return sj.contrastive_loss(x, y, labels=labels, bidirectional=False, logit_scale=1.5)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    want = jax.tree.leaves(grad(x, y, labels))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        got = jax.tree.leaves(grad(jax.device_put(x, P("data")), jax.device_put(y, P()),
                                   jax.device_put(labels, P("data"))))
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-6)
