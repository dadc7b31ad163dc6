"""Traced hyper-parameters (a learned temperature or logit scale, a scheduled smoothing) and
``return_stats`` with a reduced loss, under ``jax.jit`` on Explicit and Auto meshes.

The value and the gradients, those of the hyper-parameters included, equal the one-device
ones, and the compiled program keeps the sharded layout: no all-gather of a
vocabulary-wide array for the fused losses, the ring's ``collective-permute`` and no
all-gather for the contrastive ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _compiled import collectives
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import softmax_jax as sj

N, D, DT, V = 16, 8, 6, 32


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    labels = rng.integers(0, V, N).astype(np.int32)
    labels[[2, 9]] = -100
    return {
        "x": rng.normal(size=(N, D)).astype(np.float32),
        "y": (0.5 * rng.normal(size=(N, D))).astype(np.float32),
        "w": (0.6 * rng.normal(size=(D, V))).astype(np.float32),
        "tx": rng.normal(size=(N, DT)).astype(np.float32),
        "tw": (0.7 * rng.normal(size=(DT, V))).astype(np.float32),
        "labels": labels,
        "g": rng.normal(size=N).astype(np.float32),
        "ls": np.float32(0.1),
        "zl": np.float32(0.02),
        "temp": np.float32(1.7),
        "scale": np.float32(2.5),
        "bias": np.float32(-1.2),
    }


ARRAYS = _arrays()
VOCAB = {"x": P("data"), "labels": P("data"), "g": P("data"), "tx": P("data"),
         "w": P(None, "model"), "tw": P(None, "model")}
BATCH = {"x": P("data"), "y": P("data"), "g": P("data")}


def _fused_ce(x, w, ls, zl, labels):
    return sj.linear_softmax_cross_entropy(x, w, labels, ignore_index=-100,
                                           label_smoothing=ls, z_loss=zl)


def _fused_ce_stats(x, w, labels, g):
    loss, stats = sj.linear_softmax_cross_entropy(x, w, labels, ignore_index=-100,
                                                  return_stats=True)
    return loss + 0.1 * jnp.sum(jnp.where(labels < 0, 0.0, stats.lse * g))


def _distillation(x, w, temp, tx, tw, labels):
    return sj.linear_softmax_distillation(x, w, tx, tw, labels=labels, temperature=temp,
                                          beta=0.5, ignore_index=-100)


def _log_probs(x, w, temp, labels, g):
    logp, entropy = sj.linear_log_probs(x, w, labels, temperature=temp, ignore_index=-100,
                                        return_entropy=True)
    return jnp.sum(logp * g) + jnp.sum(entropy)


def _clip(x, y, scale):
    return sj.contrastive_loss(x, y, logit_scale=scale)


def _clip_none(x, y, scale, g):
    return jnp.sum(sj.contrastive_loss(x, y, logit_scale=scale, reduction="none") * g)


def _siglip(x, y, scale, bias):
    return sj.sigmoid_contrastive_loss(x, y, logit_scale=scale, logit_bias=bias)


# (function, names of its arguments, how many leading ones are differentiated, specs)
CASES = {
    "fused_ce_traced_smoothing": (_fused_ce, "x w ls zl labels", 4, VOCAB),
    "fused_ce_stats_mean": (_fused_ce_stats, "x w labels g", 2, VOCAB),
    "distillation_traced_temperature": (_distillation, "x w temp tx tw labels", 3, VOCAB),
    "log_probs_traced_temperature": (_log_probs, "x w temp labels g", 3, VOCAB),
    "clip_traced_scale": (_clip, "x y scale", 3, BATCH),
    "clip_none_traced_scale": (_clip_none, "x y scale g", 3, BATCH),
    "siglip_traced_scale_and_bias": (_siglip, "x y scale bias", 4, BATCH),
}
MESHES = {
    "explicit": ((2, 4), ("data", "model"), AxisType.Explicit),
    "auto": ((2, 4), ("data", "model"), AxisType.Auto),
}


@functools.cache
def _mesh(name: str) -> jax.sharding.Mesh:
    shape, axes, kind = MESHES[name]
    return jax.make_mesh(shape, axes, axis_types=(kind,) * len(axes))


def _value_and_grads(case: str, arrays: list) -> list[np.ndarray]:
    fn, _, k, _ = CASES[case]
    out = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(k))))(*arrays)
    return [np.asarray(a) for a in jax.tree.leaves(out)]


@functools.cache
def _one_device(case: str) -> list[np.ndarray]:
    return _value_and_grads(case, [jnp.asarray(ARRAYS[n]) for n in CASES[case][1].split()])


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("case", list(CASES))
def test_traced_hyperparameters_on_a_mesh_equal_one_device(case, mesh_name):
    mesh = _mesh(mesh_name)
    specs = CASES[case][3]
    with jax.set_mesh(mesh):
        placed = [jax.device_put(ARRAYS[n], NamedSharding(mesh, specs.get(n, P())))
                  for n in CASES[case][1].split()]
        got = _value_and_grads(case, placed)
    want = _one_device(case)
    assert len(got) == len(want)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-6)
    assert all(np.isfinite(e).all() for e in want)


CN, CD, CV = 2048, 64, 16384




def test_traced_smoothing_on_an_auto_mesh_gathers_no_vocabulary():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    f32 = jnp.float32
    coll = collectives(
        jax.value_and_grad(lambda x, w, ls, labels: _fused_ce(x, w, ls, 0.0, labels),
                           argnums=(0, 1, 2)), mesh,
        [((CN, CD), P("data"), f32), ((CD, CV), P(None, "model"), f32), ((), P(), f32),
         ((CN,), P("data"), jnp.int32)])
    wide = {s: c for s, c in coll["all-gather"].items() if s and s[-1] == CV}
    assert not wide, f"all-gathers of vocabulary-wide arrays: {wide}"


def test_traced_logit_scale_on_an_auto_mesh_goes_round_the_ring():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    f32 = jnp.float32
    coll = collectives(jax.value_and_grad(_clip, argnums=(0, 1, 2)), mesh,
                        [((CN, CD), P("data"), f32)] * 2 + [((), P(), f32)])
    assert not coll["all-gather"], f"gathered: {dict(coll['all-gather'])}"
    assert coll["collective-permute"][(CN // 8, CD)] >= 1, dict(coll["collective-permute"])
