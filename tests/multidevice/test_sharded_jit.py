"""Every public function under ``jax.jit`` with ``NamedSharding`` inputs, on Explicit and Auto
meshes, 1-D ``('data',)`` and 2-D ``('data', 'model')``: the value and the gradients of the
floating-point inputs equal those of the same call on one device.

The batch axis is sharded over ``data``; the fused heads' ``w`` is replicated, sharded along
the vocabulary over ``model`` (or over ``data`` on the 1-D mesh, with ``x`` replicated), or
sharded along ``D`` (FSDP).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import softmax_jax as sj

N, D, DT, V = 16, 8, 6, 32


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, V, N).astype(np.int32)
    labels[[3, 11]] = -100
    z = rng.normal(size=(N, V)).astype(np.float32)
    return {
        "x": rng.normal(size=(N, D)).astype(np.float32),
        "y": (0.5 * rng.normal(size=(N, D))).astype(np.float32),
        "w": (0.6 * rng.normal(size=(D, V))).astype(np.float32),
        "b": (0.3 * rng.normal(size=V)).astype(np.float32),
        "tx": rng.normal(size=(N, DT)).astype(np.float32),
        "tw": (0.7 * rng.normal(size=(DT, V))).astype(np.float32),
        "z": z,
        "t": (0.8 * rng.normal(size=(N, V))).astype(np.float32),
        "p": np.asarray(jax.nn.softmax(rng.normal(size=(N, V)).astype(np.float32))),
        "labels": labels,
        "valid": np.where(labels < 0, 0, labels).astype(np.int32),
        "bits": rng.integers(0, 2, (N, V)).astype(np.float32),
        "cw": rng.uniform(0.5, 1.5, V).astype(np.float32),
        "ct": rng.normal(size=N).astype(np.float32),
    }


ARRAYS = _inputs()


@dataclass(frozen=True)
class Case:
    """``fn(**arrays)`` -> a scalar; ``diff`` names the arrays differentiated; ``specs`` the
    sharding of each array per mesh rank (1 or 2), by name; unnamed arrays are replicated."""

    name: str
    fn: Callable
    names: tuple[str, ...]
    diff: tuple[str, ...]
    specs: dict[int, dict[str, P]] = field(default_factory=dict)


BATCH = {1: {"z": P("data"), "t": P("data"), "p": P("data"), "bits": P("data"),
             "labels": P("data"), "valid": P("data"), "x": P("data"), "y": P("data"),
             "tx": P("data"), "ct": P("data")},
         2: {"z": P("data"), "t": P("data"), "p": P("data"), "bits": P("data"),
             "labels": P("data"), "valid": P("data"), "x": P("data"), "y": P("data"),
             "tx": P("data"), "ct": P("data")}}
VOCAB = {1: {"w": P(None, "data"), "b": P("data"), "tw": P(None, "data"), "cw": P("data")},
         2: {"w": P(None, "model"), "b": P("model"), "tw": P(None, "model"),
             "cw": P("model"), "x": P("data"), "labels": P("data"), "tx": P("data"),
             "ct": P("data")}}
FSDP = {1: {"w": P("data", None), "x": P("data"), "labels": P("data"), "ct": P("data")},
        2: {"w": P("model", None), "x": P("data"), "labels": P("data"), "ct": P("data")}}


def _weighted(out: jax.Array, ct: jax.Array) -> jax.Array:
    """A scalar from per-row outputs (a cotangent that is not all ones)."""
    return jnp.sum(out * ct.reshape(ct.shape + (1,) * (out.ndim - 1)))


def _fce(x, w, labels, b, ct, cw, weighted=False, **kw):
    out = sj.linear_softmax_cross_entropy(x, w, labels, b,
                                          class_weights=cw if weighted else None, **kw)
    return _weighted(out, ct) if kw.get("reduction") == "none" else out


def _fdist(x, w, tx, tw, labels, ct, **kw):
    out = sj.linear_softmax_distillation(x, w, tx, tw, labels=labels, **kw)
    return _weighted(out, ct) if kw.get("reduction") == "none" else out


def _case(name, fn, names, diff, specs=BATCH):
    return Case(name, fn, tuple(names), tuple(diff), specs)


CORE = [
    _case("softmax", lambda z, ct: _weighted(sj.softmax(z), ct), "z ct".split(), ["z"]),
    _case("log_softmax", lambda z, ct: _weighted(sj.log_softmax(z), ct), "z ct".split(), ["z"]),
    _case("logsumexp", lambda z, ct: _weighted(sj.logsumexp(z, axis=-1), ct),
          "z ct".split(), ["z"]),
    _case("sigmoid", lambda z, ct: _weighted(sj.sigmoid(z), ct), "z ct".split(), ["z"]),
    _case("softmax_cross_entropy",
          lambda z, p, ct, cw: _weighted(sj.softmax_cross_entropy(
              z, p, label_smoothing=0.1, z_loss=1e-2, class_weights=cw), ct),
          "z p ct cw".split(), ["z", "p"]),
    _case("integer_cross_entropy",
          lambda z, valid, ct: _weighted(
              sj.softmax_cross_entropy_with_integer_labels(z, valid), ct),
          "z valid ct".split(), ["z"]),
    _case("integer_cross_entropy_options",
          lambda z, labels, ct: _weighted(sj.softmax_cross_entropy_with_integer_labels(
              z, labels, label_smoothing=0.1, z_loss=1e-2, ignore_index=-100), ct),
          "z labels ct".split(), ["z"]),
    _case("integer_cross_entropy_class_weights",
          lambda z, valid, ct, cw: _weighted(sj.softmax_cross_entropy_with_integer_labels(
              z, valid, class_weights=cw), ct),
          "z valid ct cw".split(), ["z"]),
    _case("log_likelihood", lambda p, bits, ct: _weighted(sj.log_likelihood(p, bits), ct),
          "p bits ct".split(), ["p"]),
    _case("sigmoid_binary_cross_entropy",
          lambda z, bits, ct: _weighted(sj.sigmoid_binary_cross_entropy(z, bits), ct),
          "z bits ct".split(), ["z"]),
    _case("quadratic_cost", lambda z, t, ct: _weighted(sj.quadratic_cost(z, t), ct),
          "z t ct".split(), ["z", "t"]),
    _case("kl_divergence",
          lambda z, p, ct: _weighted(sj.kl_divergence(jax.nn.log_softmax(z), p), ct),
          "z p ct".split(), ["z", "p"]),
    _case("kl_divergence_with_log_targets",
          lambda z, t, ct: _weighted(sj.kl_divergence_with_log_targets(
              jax.nn.log_softmax(z), jax.nn.log_softmax(t)), ct),
          "z t ct".split(), ["z", "t"]),
    _case("distillation_loss",
          lambda z, t, ct: _weighted(sj.distillation_loss(z, t, temperature=2.0, beta=0.5),
                                     ct),
          "z t ct".split(), ["z"]),
]

CONTRASTIVE = [
    _case("contrastive_loss", lambda x, y: sj.contrastive_loss(x, y, logit_scale=2.0),
          "x y".split(), ["x", "y"]),
    _case("contrastive_loss_none",
          lambda x, y, ct: _weighted(sj.contrastive_loss(x, y, reduction="none"), ct),
          "x y ct".split(), ["x", "y"]),
    _case("sigmoid_contrastive_loss",
          lambda x, y: sj.sigmoid_contrastive_loss(x, y, logit_scale=2.0, logit_bias=-1.0),
          "x y".split(), ["x", "y"]),
]

_FCE_ARGS = "x w labels b ct cw".split()
_FDIST_ARGS = "x w tx tw labels ct".split()
FUSED = [
    _case("fused_ce_batch", functools.partial(_fce, ignore_index=-100, label_smoothing=0.1,
                                              z_loss=1e-2),
          _FCE_ARGS, ["x", "w", "b"]),
    _case("fused_ce_vocab", functools.partial(_fce, ignore_index=-100, label_smoothing=0.1,
                                              z_loss=1e-2),
          _FCE_ARGS, ["x", "w", "b"], VOCAB),
    _case("fused_ce_vocab_none", functools.partial(_fce, ignore_index=-100,
                                                   reduction="none"),
          _FCE_ARGS, ["x", "w", "b"], VOCAB),
    _case("fused_ce_vocab_sum_soft_cap", functools.partial(
        _fce, ignore_index=-100, reduction="sum", soft_cap=3.0), _FCE_ARGS,
          ["x", "w", "b"], VOCAB),
    _case("fused_ce_fsdp", functools.partial(_fce, ignore_index=-100, label_smoothing=0.1),
          _FCE_ARGS, ["x", "w", "b"], FSDP),
    _case("fused_distillation_vocab", functools.partial(
        _fdist, temperature=2.0, beta=0.5, hard_weight=0.3, ignore_index=-100),
          _FDIST_ARGS, ["x", "w"], VOCAB),
    _case("fused_distillation_batch_none", functools.partial(
        _fdist, temperature=1.5, ignore_index=-100, reduction="none"),
          _FDIST_ARGS, ["x", "w"]),
    _case("fused_ce_vocab_class_weights", functools.partial(
        _fce, weighted=True, ignore_index=-100, label_smoothing=0.1), _FCE_ARGS,
          ["x", "w", "b"], VOCAB),
]


MESHES = {
    "explicit_2d": ((2, 4), ("data", "model"), AxisType.Explicit),
    "explicit_1d": ((8,), ("data",), AxisType.Explicit),
    "auto_2d": ((2, 4), ("data", "model"), AxisType.Auto),
    "auto_1d": ((8,), ("data",), AxisType.Auto),
}


@functools.cache
def _mesh(name: str) -> jax.sharding.Mesh:
    shape, axes, kind = MESHES[name]
    return jax.make_mesh(shape, axes, axis_types=(kind,) * len(axes))


def _value_and_grads(case: Case, arrays: dict) -> tuple:
    def f(*diff, rest):
        return case.fn(**dict(rest, **dict(zip(case.diff, diff, strict=True))))

    rest = {n: arrays[n] for n in case.names if n not in case.diff}
    diff = tuple(arrays[n] for n in case.diff)
    return jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(diff)))))(*diff, rest=rest)


@functools.cache
def _one_device(name: str) -> tuple:
    case = next(c for c in CORE + CONTRASTIVE + FUSED if c.name == name)
    out = _value_and_grads(case, {n: jnp.asarray(ARRAYS[n]) for n in case.names})
    return tuple(np.asarray(a) for a in jax.tree.leaves(out))


def _check(case: Case, mesh_name: str) -> None:
    mesh = _mesh(mesh_name)
    specs = case.specs[len(mesh.axis_names)]
    with jax.set_mesh(mesh):
        placed = {n: jax.device_put(ARRAYS[n], NamedSharding(mesh, specs.get(n, P())))
                  for n in case.names}
        got = tuple(np.asarray(a) for a in jax.tree.leaves(_value_and_grads(case, placed)))
    want = _one_device(case.name)
    assert len(got) == len(want)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-6)
    assert np.isfinite(want[0]).all()


@pytest.mark.parametrize("mesh_name", ["explicit_2d", "auto_1d"])
@pytest.mark.parametrize("case", CORE, ids=lambda c: c.name)
def test_core_function_under_jit_on_a_mesh_equals_one_device(case, mesh_name):
    _check(case, mesh_name)


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("case", CONTRASTIVE + FUSED, ids=lambda c: c.name)
def test_fused_and_contrastive_under_jit_on_a_mesh_equal_one_device(case, mesh_name):
    _check(case, mesh_name)


def test_core_function_on_a_one_dimensional_explicit_mesh():
    _check(CORE[7], "explicit_1d")  # class weights: a gather at the labels


def test_core_function_on_a_two_dimensional_auto_mesh():
    _check(CORE[6], "auto_2d")  # smoothing, z-loss and ignore_index


def test_sharded_class_axis_of_an_unfused_loss_raises_or_matches():
    """A class axis sharded over ``model``: the unfused losses either raise a clear error or
    give the one-device numbers (never wrong numbers)."""
    case = CORE[6]
    mesh = _mesh("explicit_2d")
    specs = {"z": P("data", "model"), "labels": P("data"), "ct": P("data")}
    with jax.set_mesh(mesh):
        placed = {n: jax.device_put(ARRAYS[n], NamedSharding(mesh, specs.get(n, P())))
                  for n in case.names}
        try:
            got = jax.tree.leaves(_value_and_grads(case, placed))
        except ValueError as err:
            assert "class axis" in str(err)
            return
    for g, e in zip(got, _one_device(case.name), strict=True):
        np.testing.assert_allclose(np.asarray(g), e, rtol=2e-5, atol=2e-6)


def test_axis_name_inside_a_users_shard_map_keeps_the_local_mean():
    """Inside the user's own ``shard_map`` over a data axis, ``"mean"`` stays the mean of the
    device's tokens (the automatic paths change nothing there)."""
    mesh = _mesh("explicit_1d")
    x, w, labels = (jnp.asarray(ARRAYS[n]) for n in ("x", "w", "valid"))
    specs = (P("data"), P(), P("data"))

    def body(x, w, labels):
        return sj.linear_softmax_cross_entropy(x, w, labels)[None]

    with jax.set_mesh(mesh):
        placed = [jax.device_put(a, NamedSharding(mesh, s))
                  for a, s in zip((x, w, labels), specs, strict=True)]
        got = jax.jit(jax.shard_map(body, in_specs=specs, out_specs=P("data")))(*placed)
    want = [sj.linear_softmax_cross_entropy(x[i:i + 2], w, labels[i:i + 2])
            for i in range(0, N, 2)]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=1e-6)
