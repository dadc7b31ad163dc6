"""CLIP (``contrastive_loss``) and SigLIP (``sigmoid_contrastive_loss``) on one device,
against ``jax.grad`` of the plain materialised formulas (softmax_jax/reference_contrastive.py)
in float64, with small blocks so that N is not a multiple of any of them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softmax_jax as sj
from softmax_jax import reference_contrastive as ref
from softmax_jax.fused import contrastive as fc

# Blocks (token_block, col_block) of 4 x 3, 5 x 16 and one tile for all; N = 13 is a
# multiple of none.
REDUCTIONS = ["mean", "sum", "none"]


def _data(n, d=5, m=None, seed=0, scale=1.0):
    """Float64 NumPy embeddings ``x`` (N x D) and ``y`` (M x D): sliced and edited on the
    host, they reach each loss as arguments (float32 unless float64 is on)."""
    rng = np.random.default_rng(seed)
    m = n if m is None else m
    return scale * rng.normal(size=(n, d)), scale * rng.normal(size=(m, d))


def _scalarise(out, reduction):
    """A scalar of every output: ``"none"`` weighted by a fixed cotangent."""
    if reduction != "none":
        return out
    return jnp.sum(jnp.cos(1.0 + jnp.arange(out.shape[0])) * out)


def _close(got, want, tol=1e-11):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape
        scale = max(1.0, float(np.max(np.abs(w))))
        np.testing.assert_allclose(g, w, atol=tol * scale, rtol=tol)


# The value and gradients in (x, y, scale[, bias]), each one compiled program per set of
# static options (the engine run op by op would compile every operation of its scans).


@functools.cache
def _clip_vg(blocks, reduction, bidirectional=True):
    def f(x, y, s, labels=None):
        return _scalarise(fc.clip(x, y, s, labels, None, bidirectional, reduction, None,
                                  blocks), reduction)
    return jax.jit(jax.value_and_grad(f, (0, 1, 2)))


@functools.cache
def _ref_clip_vg(reduction, bidirectional=True):
    def f(x, y, s, labels=None):
        return _scalarise(ref.clip_loss(x, y, s, labels, bidirectional, reduction), reduction)
    return jax.jit(jax.value_and_grad(f, (0, 1, 2)))


@functools.cache
def _sig_vg(blocks, reduction):
    def f(x, y, s, b):
        return _scalarise(fc.sigmoid(x, y, s, b, None, reduction, None, blocks), reduction)
    return jax.jit(jax.value_and_grad(f, (0, 1, 2, 3)))


@functools.cache
def _ref_sig_vg(reduction):
    def f(x, y, s, b):
        return _scalarise(ref.sigmoid_contrastive_loss(x, y, s, b, reduction), reduction)
    return jax.jit(jax.value_and_grad(f, (0, 1, 2, 3)))


@pytest.mark.parametrize(("blocks", "reduction", "bidirectional"), [
    ((4, 3), "mean", True), ((4, 3), "sum", True), ((4, 3), "none", True),
    ((5, 16), "mean", False), ((4, 3), "none", False), ((64, 64), "sum", False),
    ((64, 64), "mean", True)])
def test_clip_matches_materialised_float64(x64, blocks, reduction, bidirectional):
    x, y = _data(13)
    s = jnp.float64(1.7)
    _close(_clip_vg(blocks, reduction, bidirectional)(x, y, s),
           _ref_clip_vg(reduction, bidirectional)(x, y, s))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_clip_labels_rectangular_float64(x64, reduction):
    x, y = _data(11, m=7, seed=1)
    labels = np.random.default_rng(2).integers(0, 7, 11)
    s = jnp.float64(0.8)
    _close(_clip_vg((4, 3), reduction, False)(x, y, s, labels),
           _ref_clip_vg(reduction, False)(x, y, s, labels))


@pytest.mark.parametrize(("blocks", "reduction"), [
    ((4, 3), "mean"), ((5, 16), "sum"), ((4, 3), "none"), ((64, 64), "mean")])
def test_sigmoid_matches_materialised_float64(x64, blocks, reduction):
    x, y = _data(13, seed=3)
    args = (x, y, jnp.float64(2.3), jnp.float64(-1.1))
    _close(_sig_vg(blocks, reduction)(*args), _ref_sig_vg(reduction)(*args))


def test_public_api_matches_and_jits(x64):
    x, y = _data(9, seed=4)
    _close(sj.contrastive_loss(x, y, logit_scale=3.0), ref.clip_loss(x, y, 3.0))
    _close(jax.jit(lambda a, b: sj.sigmoid_contrastive_loss(a, b, logit_bias=0.5))(x, y),
           ref.sigmoid_contrastive_loss(x, y, 1.0, 0.5))
    # optax's composition, of which this loss is a drop-in (one compiled program)
    @jax.jit
    def optax_losses(x, y):
        z = 3.0 * x @ y.T
        lab = jnp.arange(9)
        clip = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(z, lab).mean()
                      + optax.softmax_cross_entropy_with_integer_labels(z.T, lab).mean())
        return clip, optax.sigmoid_binary_cross_entropy(z + 0.5, jnp.eye(9)).sum(1).mean()

    want_clip, want_sigmoid = optax_losses(x, y)
    _close(sj.contrastive_loss(x, y, logit_scale=3.0), want_clip)
    _close(sj.sigmoid_contrastive_loss(x, y, logit_scale=3.0, logit_bias=0.5), want_sigmoid)


def test_single_pair(x64):
    x, y = _data(1, seed=5)
    s = jnp.float64(1.3)
    for red in REDUCTIONS:
        _close(_clip_vg(None, red)(x, y, s), _ref_clip_vg(red)(x, y, s))
        _close(_sig_vg(None, red)(x, y, s, s), _ref_sig_vg(red)(x, y, s, s))
    assert float(sj.contrastive_loss(x, y)) == 0.0  # one pair: its own softmax is 1


@pytest.mark.parametrize(("loss", "reduction"), [
    ("clip", "mean"), ("clip", "none"), ("clip_one_way", "sum"), ("sigmoid", "mean"),
    ("sigmoid", "none")])
def test_where_equals_slicing(x64, loss, reduction):
    x, y = _data(12, seed=6)
    keep = np.ones(12, bool)
    keep[[0, 5, 6, 11]] = False
    # The padding holds huge and NaN values: a masked pair must not reach any sum.
    x[5], x[0], y[6] = np.nan, 1e30, np.inf
    idx = np.flatnonzero(keep)
    weight = np.cos(1.0 + np.arange(12))  # the cotangent of "none", sliced with the pairs

    def fused(a, b, s, t):
        if loss == "sigmoid":
            out = fc.sigmoid(a, b, s, t, jnp.asarray(keep), reduction, None, (4, 3))
        else:
            out = fc.clip(a, b, s, None, jnp.asarray(keep), loss == "clip", reduction, None,
                          (4, 3))
        return jnp.sum(weight * out) if reduction == "none" else out

    def sliced(a, b, s, t):
        if loss == "sigmoid":
            out = ref.sigmoid_contrastive_loss(a, b, s, t, reduction)
        else:
            out = ref.clip_loss(a, b, s, None, loss == "clip", reduction)
        return jnp.sum(weight[idx] * out) if reduction == "none" else out

    s, t = jnp.float64(1.9), jnp.float64(-0.7)
    value, grads = jax.jit(jax.value_and_grad(fused, (0, 1, 2, 3)))(x, y, s, t)
    want_value, want = jax.jit(jax.value_and_grad(sliced, (0, 1, 2, 3)))(x[idx], y[idx], s, t)
    _close(value, want_value)
    _close((grads[0][idx], grads[1][idx], grads[2], grads[3]), want)
    assert np.all(np.asarray(grads[0])[~keep] == 0)
    assert np.all(np.asarray(grads[1])[~keep] == 0)


def test_where_none_reduction_values(x64):
    x, y = _data(10, seed=7)
    keep = np.arange(10) % 3 != 1
    idx = np.flatnonzero(keep)
    where = jnp.asarray(keep)
    got = sj.contrastive_loss(x, y, where=where, reduction="none")
    want = ref.clip_loss(x[idx], y[idx], reduction="none")
    _close(np.asarray(got)[idx], want)
    assert np.all(np.asarray(got)[~keep] == 0)
    got = sj.sigmoid_contrastive_loss(x, y, where=where, reduction="none", logit_bias=0.3)
    _close(np.asarray(got)[idx], ref.sigmoid_contrastive_loss(x[idx], y[idx], 1.0, 0.3, "none"))
    assert np.all(np.asarray(got)[~keep] == 0)
    nothing = jnp.zeros(10, bool)
    assert float(sj.contrastive_loss(x, y, where=nothing)) == 0.0
    g = jax.grad(lambda a: sj.sigmoid_contrastive_loss(a, y, where=nothing))(x)
    assert np.all(np.asarray(g) == 0)


def test_invalid_label_gives_nan(x64):
    x, y = _data(6, m=4, seed=8)
    labels = jnp.array([0, 1, 4, 3, -1, 2])
    out = sj.contrastive_loss(x, y, labels=labels, bidirectional=False, reduction="none")
    assert np.isnan(np.asarray(out)[[2, 4]]).all()
    assert np.isfinite(np.asarray(out)[[0, 1, 3, 5]]).all()
    assert np.isnan(float(sj.contrastive_loss(x, y, labels=labels, bidirectional=False)))


def test_large_norms_finite():
    x, y = _data(20, d=8, seed=9, scale=300.0)
    for f in (lambda a, b, s: sj.contrastive_loss(a, b, logit_scale=s),
              lambda a, b, s: sj.sigmoid_contrastive_loss(a, b, logit_scale=s, logit_bias=-s)):
        value, grads = jax.value_and_grad(f, (0, 1, 2))(x.astype(jnp.float32),
                                                       y.astype(jnp.float32), 100.0)
        assert np.isfinite(float(value)) and float(value) > 1e3
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g)))
    with jax.enable_x64(True):  # and right, against the reference in float64
        x, y = _data(20, d=8, seed=9, scale=300.0)
        s = jnp.float64(100.0)
        _close(_clip_vg((8, 8), "mean")(x, y, s), _ref_clip_vg("mean")(x, y, s), 1e-9)


def test_bfloat16():
    x, y = _data(24, d=16, seed=10)
    xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
    for vg, ref_vg, extra in ((_clip_vg((8, 8), "mean"), _ref_clip_vg("mean"), (4.0,)),
                              (_sig_vg((8, 8), "mean"), _ref_sig_vg("mean"), (4.0, -1.0))):
        value, grads = vg(xb, yb, *(jnp.float32(e) for e in extra))
        assert value.dtype == jnp.float32
        assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
        want_value, want_grads = ref_vg(xb.astype(jnp.float32), yb.astype(jnp.float32),
                                        *extra)
        np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
        for g, w in zip(grads, want_grads, strict=True):
            scale = float(np.max(np.abs(np.asarray(w, np.float32))))
            err = np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32)))
            assert err <= 2e-2 * scale, (err, scale)


def test_vmap_over_leading_axis(x64):
    rng = np.random.default_rng(11)
    xs, ys = (rng.normal(size=(3, 7, 4)) for _ in range(2))
    got = jax.vmap(lambda a, b: jax.value_and_grad(
        lambda u, v: sj.contrastive_loss(u, v, logit_scale=2.0), (0, 1))(a, b))(xs, ys)
    want = jax.vmap(lambda a, b: jax.value_and_grad(
        lambda u, v: ref.clip_loss(u, v, 2.0), (0, 1))(a, b))(xs, ys)
    _close(got, want)
    got = jax.vmap(lambda a, b: sj.sigmoid_contrastive_loss(a, b, reduction="none"))(xs, ys)
    want = jax.vmap(lambda a, b: ref.sigmoid_contrastive_loss(a, b, reduction="none"))(xs, ys)
    _close(got, want)


def test_bad_inputs():
    x, y = _data(4)
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    with pytest.raises(ValueError, match="embedding size D"):
        sj.contrastive_loss(x, y[:, :3])
    with pytest.raises(ValueError, match="N == M"):
        sj.contrastive_loss(x, y[:3])
    with pytest.raises(ValueError, match="N == M"):
        sj.sigmoid_contrastive_loss(x, y[:3])
    with pytest.raises(ValueError, match="bidirectional=False"):
        sj.contrastive_loss(x, y, labels=jnp.arange(4))
    with pytest.raises(ValueError, match="axis_name"):
        sj.contrastive_loss(x, y, labels=jnp.arange(4), bidirectional=False, axis_name="d")
    with pytest.raises(TypeError, match="x must be a floating-point"):
        sj.contrastive_loss(jnp.ones((4, 5), jnp.int32), y)
    with pytest.raises(TypeError, match="y must be a floating-point"):
        sj.sigmoid_contrastive_loss(x, jnp.ones((4, 5), jnp.int32))
    with pytest.raises(TypeError, match="labels"):
        sj.contrastive_loss(x, y, labels=jnp.ones(4), bidirectional=False)
    for labels in (jnp.arange(3), jnp.arange(4)[:, None]):
        # The labels' shape check is the fused losses' own: the same words for the same slip.
        with pytest.raises(ValueError, match=r"labels\.shape must have x's leading shape \(4,\)"
                           ) as clip:
            sj.contrastive_loss(x, y, labels=labels, bidirectional=False)
        with pytest.raises(ValueError) as fused:
            sj.linear_softmax_cross_entropy(x, y.T, labels)
        assert str(clip.value) == str(fused.value)
    with pytest.raises(ValueError, match="where"):
        sj.contrastive_loss(x, y, where=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="where"):
        sj.sigmoid_contrastive_loss(x, y, where=jnp.ones((4, 1), bool))
    with pytest.raises(TypeError, match="where"):
        sj.sigmoid_contrastive_loss(x, y, where=jnp.ones(4))
    with pytest.raises(ValueError, match="reduction"):
        sj.contrastive_loss(x, y, reduction="avg")
    with pytest.raises(ValueError, match="2-D"):
        sj.contrastive_loss(x[0], y[0])
    with pytest.raises(ValueError, match="logit_scale"):
        sj.contrastive_loss(x, y, logit_scale=jnp.ones(2))
    with pytest.raises(ValueError, match="logit_bias"):
        sj.sigmoid_contrastive_loss(x, y, logit_bias=float("nan"))
    with pytest.raises(ValueError, match="axis_name"):  # y not sharded over the axis
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
        jax.shard_map(lambda a, b: sj.contrastive_loss(a, b, axis_name="d"), mesh=mesh,
                      in_specs=(jax.P("d"), jax.P()), out_specs=jax.P())(x, y)


@pytest.mark.parametrize("name", ["logit_scale", "logit_bias"])
@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_infinite_scale_or_bias_raises_and_traced_gives_nan(name, value):
    # An infinite scale once gave CLIP -inf (s = inf) or +inf (s = -inf): a plausible-looking
    # loss for an argument with no meaning. A concrete one raises; a traced one is NaN.
    x, y = _data(6, seed=10)
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    losses = [sj.sigmoid_contrastive_loss]
    if name == "logit_scale":
        losses.append(sj.contrastive_loss)
    for loss in losses:
        with pytest.raises(ValueError, match=name):
            loss(x, y, **{name: value})
        traced = jax.jit(lambda v, loss=loss: loss(x, y, **{name: v}))(jnp.float32(value))
        assert np.isnan(float(traced)), (loss.__name__, float(traced))
