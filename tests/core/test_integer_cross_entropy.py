"""``softmax_cross_entropy_with_integer_labels`` alone: its labels (dtypes, ``ignore_index``,
out-of-range values), class weights against PyTorch and the gradient's scatter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from _cross_entropy_inputs import (
    OPTIONS,
    ROWS,
    WEIGHTS,
    V,
    data,
    numpy_data,
    value_and_grads,
)

import softmax_jax as sj
from softmax_jax import reference as ref


@pytest.mark.parametrize("eps,lam", OPTIONS)
def test_integer_ce_matches_reference_float64(x64, eps, lam):
    logits, labels, _ = data(jnp.float64)
    f = lambda z: sj.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, labels, label_smoothing=eps, z_loss=lam)
    r = lambda z: ref.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, labels, label_smoothing=eps, z_loss=lam)
    (v1, (g1,)), (v2, (g2,)) = value_and_grads(f, logits), value_and_grads(r, logits)
    assert v1.dtype == jnp.float64
    np.testing.assert_allclose(v1, v2, rtol=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-12)


def test_ignore_index_and_out_of_range_labels():
    logits, _, _ = data(seed=11)
    labels = jnp.array([0, -100, V, -1, 3, -100])
    loss = sj.softmax_cross_entropy_with_integer_labels(logits, labels, ignore_index=-100)
    assert loss[1] == 0.0 and loss[5] == 0.0
    assert np.isnan(loss[2]) and np.isnan(loss[3])
    np.testing.assert_allclose(
        loss[np.array([0, 4])],
        sj.softmax_cross_entropy_with_integer_labels(logits[np.array([0, 4])], labels[
            np.array([0, 4])]), rtol=1e-6)
    g = jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(
        z, labels, ignore_index=-100).sum())(logits)
    np.testing.assert_array_equal(g[1], 0.0)
    assert np.all(np.isnan(g[2])) and np.all(np.isfinite(g[0]))
    # without ignore_index, -100 is just another out-of-range label
    assert np.isnan(sj.softmax_cross_entropy_with_integer_labels(logits, labels)[1])


def test_integer_gradient_scatter_under_vmap_and_any_axis(x64):
    """The one-hot part of the gradient is a scatter-add; check it under vmap (which batches
    the scatter), on a middle class axis, and with ignored and out-of-range labels, against
    jax.grad of the plain formula in float64."""
    logits = jax.random.normal(jax.random.PRNGKey(21), (3, 4, 6), dtype=jnp.float64)
    labels = jnp.array([[0, 5, -100, 2], [6, 1, 1, -1], [3, 3, 0, 4]])
    keep = (labels >= 0) & (labels < 6)

    def plain(z, y):  # the reference with the bad rows dropped the same way
        return jnp.where(keep, ref.softmax_cross_entropy_with_integer_labels(
            z, jnp.where(keep, y, 0)), 0.0)

    w = jnp.arange(1.0, 13.0).reshape(3, 4)
    want = jax.grad(lambda z: (w * plain(z, labels)).sum())(logits)
    f = lambda z, y: sj.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, y, ignore_index=-100)
    got = jax.vmap(jax.grad(lambda z, y, w: (w * f(z, y)).sum()))(logits, labels, w)
    ok = np.asarray(keep)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(got[0, 2], 0.0)  # ignore_index
    assert np.all(np.isnan(got[1, 0])) and np.all(np.isnan(got[1, 3]))  # out of range
    # the same loss with the classes on the middle axis
    moved = jnp.moveaxis(logits, 2, 1)
    g_mid = jax.grad(lambda z: (w * sj.softmax_cross_entropy_with_integer_labels(
        z, labels, axis=1, ignore_index=-100)).sum())(moved)
    np.testing.assert_allclose(jnp.moveaxis(g_mid, 1, 2)[ok], want[ok], rtol=1e-12,
                               atol=1e-14)


def test_ignore_index_rows_may_hold_nan_logits():
    logits = jnp.array([[jnp.nan, 1.0], [0.0, 1.0]])
    f = lambda z: sj.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, jnp.array([-100, 1]), ignore_index=-100).sum()
    assert np.isfinite(f(logits))
    g = jax.grad(f)(logits)
    np.testing.assert_array_equal(g[0], 0.0)


def test_narrow_and_unsigned_labels():
    logits, labels, _ = data(seed=12, v=300)
    want = sj.softmax_cross_entropy_with_integer_labels(logits, labels)
    got = sj.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.uint16))
    np.testing.assert_allclose(got, want)
    small = jnp.array([1, 2, 255, 0, 7, 9], dtype=jnp.uint8)
    got = sj.softmax_cross_entropy_with_integer_labels(logits, small)
    np.testing.assert_allclose(got, optax.softmax_cross_entropy_with_integer_labels(
        logits, small.astype(jnp.int32)), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("eps,weighted", [(0.1, False), (0.0, True), (0.1, True)])
def test_low_precision_integer_gradient_with_smoothing_and_weights(dtype, eps, weighted):
    # The narrow-dtype rule keeps the one-hot term inside its rounding pass, a code path of
    # its own: float32 on the same rounded logits is the reference, and the only difference
    # allowed is the final rounding, half an ulp of the dtype (eps / 2 relative).
    logits32, labels, _ = data(seed=5, scale=4.0)
    logits = logits32.astype(dtype)
    up = logits.astype(jnp.float32)
    w = jnp.linspace(0.5, 2.0, V) if weighted else None
    kw = dict(label_smoothing=eps, class_weights=w)

    def total(z):
        return sj.softmax_cross_entropy_with_integer_labels(z, labels, **kw).sum()

    loss = sj.softmax_cross_entropy_with_integer_labels(logits, labels, **kw)
    want = sj.softmax_cross_entropy_with_integer_labels(up, labels, **kw)
    tol = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(loss.astype(jnp.float32), want, rtol=tol / 2, atol=0)
    g = jax.grad(total)(logits)
    assert g.dtype == dtype
    g32 = jax.grad(total)(up)
    # float32 itself against jax.grad of the plain formula, so the reference is pinned too
    w_ref = jnp.ones(V) if w is None else w
    target = (1 - eps) * jax.nn.one_hot(labels, V) + eps / V
    plain = jax.grad(lambda z: (target * w_ref * -jax.nn.log_softmax(z)).sum())(up)
    np.testing.assert_allclose(g32, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.astype(jnp.float32), g32, rtol=tol / 2, atol=1e-7)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_integer_class_weights_match_pytorch(eps):
    logits, labels, _ = numpy_data()
    labels[2] = -100
    cot = np.linspace(0.5, 2.0, ROWS).astype(np.float32)
    zt = torch.tensor(logits, requires_grad=True)
    want = torch.nn.functional.cross_entropy(
        zt, torch.tensor(labels), weight=torch.tensor(WEIGHTS, dtype=torch.float32),
        ignore_index=-100, label_smoothing=eps, reduction="none")
    (want * torch.tensor(cot)).sum().backward()

    def loss(z):
        return sj.softmax_cross_entropy_with_integer_labels(
            z, labels, ignore_index=-100, label_smoothing=eps, class_weights=WEIGHTS)

    got = loss(logits)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert got[2] == 0.0
    grad = jax.grad(lambda z: jnp.vdot(loss(z), cot))(logits)
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-5, atol=1e-6)
    # PyTorch's weighted "mean", as the docstring spells it
    mean = torch.nn.functional.cross_entropy(
        torch.tensor(logits), torch.tensor(labels),
        weight=torch.tensor(WEIGHTS, dtype=torch.float32), ignore_index=-100,
        label_smoothing=eps)
    kept = np.where(labels != -100, WEIGHTS[np.where(labels != -100, labels, 0)], 0.0)
    np.testing.assert_allclose(got.sum() / kept.sum(), mean.item(), rtol=1e-5)


def test_numpy_integer_labels_and_ignore_index():
    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="int32"):
        sj.softmax_cross_entropy_with_integer_labels(logits, np.array([2**32 + 1, 0]))
    with pytest.raises(ValueError, match="int32"):
        sj.softmax_cross_entropy_with_integer_labels(logits, np.array([0, 2**63], np.uint64))
    got = sj.softmax_cross_entropy_with_integer_labels(
        logits, np.array([1, -100], np.int64), ignore_index=np.int64(-100))
    np.testing.assert_allclose(got, [np.log(3.0), 0.0], rtol=1e-6)
    with pytest.raises(TypeError, match="ignore_index"):
        sj.softmax_cross_entropy_with_integer_labels(logits, np.array([1, 0]), ignore_index=1.0)


def test_uint64_labels_under_x64_are_invalid_not_wrapped(x64):
    z = jnp.zeros((3, 4), jnp.float32)
    labels = np.array([2**32 + 1, 1, 2**64 - 100], np.uint64)
    with pytest.raises(ValueError, match="outside the range of the uint64 labels"):
        sj.softmax_cross_entropy_with_integer_labels(z, labels, ignore_index=-100)
    got = sj.softmax_cross_entropy_with_integer_labels(z, labels)
    assert np.isnan(got[0]) and np.isnan(got[2])
    np.testing.assert_allclose(got[1], np.log(4.0), rtol=1e-6)
    got = sj.softmax_cross_entropy_with_integer_labels(z, jnp.asarray(labels))
    assert np.isnan(got[0]) and np.isnan(got[2])
    # the fused loss reads its labels through the same check
    x, w = jnp.eye(3, 2, dtype=jnp.float32), jnp.zeros((2, 4), jnp.float32)
    fused = sj.fused.linear_softmax_cross_entropy(x, w, labels, reduction="none")
    assert np.isnan(fused[0]) and np.isnan(fused[2]) and np.isfinite(fused[1])


def test_uint32_labels_never_wrap_onto_ignore_index():
    z = jnp.zeros((2, 4), jnp.float32)
    labels = np.array([2**32 - 100, 3], np.uint32)  # as int32: -100
    with pytest.raises(ValueError, match="outside the range of the uint32 labels"):
        sj.softmax_cross_entropy_with_integer_labels(z, labels, ignore_index=-100)
    got = sj.softmax_cross_entropy_with_integer_labels(z, labels)
    assert np.isnan(got[0])
    np.testing.assert_allclose(got[1], np.log(4.0), rtol=1e-6)


def test_ignore_index_beyond_the_label_dtype_names_ignore_index():
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="ignore_index"):
        sj.softmax_cross_entropy_with_integer_labels(z, jnp.array([0, 1]), ignore_index=2**40)
