"""The fused cross-entropy's and distillation's ``where`` under ``jax.jit`` with
``NamedSharding`` inputs on Explicit and Auto meshes: the masked tokens are left out exactly
as on one device, whether the mask has the tokens' shape or broadcasts to it."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import softmax_jax as sj

B, T, D, V = 4, 4, 8, 32


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "x": rng.normal(size=(B, T, D)).astype(np.float32),
        "w": (0.6 * rng.normal(size=(D, V))).astype(np.float32),
        "tx": rng.normal(size=(B, T, D)).astype(np.float32),
        "tw": (0.6 * rng.normal(size=(D, V))).astype(np.float32),
        "labels": rng.integers(0, V, (B, T)).astype(np.int32),
    }


ARRAYS = _inputs()
WHERE = {"tokens": np.array([[True, False, True, True]] * 2 + [[False] * 4, [True] * 4]),
         "positions": np.array([True, True, False, True])}
LOSSES = {
    "cross_entropy": lambda a, where: sj.linear_softmax_cross_entropy(
        a["x"], a["w"], a["labels"], where=where, label_smoothing=0.1),
    "distillation": lambda a, where: sj.linear_softmax_distillation(
        a["x"], a["w"], a["tx"], a["tw"], labels=a["labels"], where=where, hard_weight=0.5),
}
SPECS = {"x": P("data"), "tx": P("data"), "labels": P("data"), "w": P(None, "model"),
         "tw": P(None, "model")}


def _run(loss: str, arrays: dict, where: np.ndarray) -> list[np.ndarray]:
    def of(x, w, rest):
        return LOSSES[loss](dict(rest, x=x, w=w), where)

    value, (dx, dw) = jax.jit(jax.value_and_grad(of, argnums=(0, 1)))(
        arrays["x"], arrays["w"], arrays)
    return [np.asarray(value), np.asarray(dx), np.asarray(dw)]


@functools.cache
def _one_device(loss: str, where: str) -> list[np.ndarray]:
    return _run(loss, {n: jax.numpy.asarray(a) for n, a in ARRAYS.items()}, WHERE[where])


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=lambda k: k.name)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_fused_where_under_jit_on_a_mesh_equals_one_device(loss, kind, where):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))
    with jax.set_mesh(mesh):
        placed = {n: jax.device_put(a, NamedSharding(mesh, SPECS[n])) for n, a in ARRAYS.items()}
        got = _run(loss, placed, WHERE[where])
    want = _one_device(loss, where)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-6)
        assert np.isfinite(e).all()
