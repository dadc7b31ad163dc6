"""A row whose cotangent is exactly zero gets an exactly zero gradient, whatever its label or
logits hold; NaN stays the value, and the gradient wherever the cotangent is non-zero.

This is what optax users write to mask padding outside the loss (labels -100, no
``ignore_index``): ``jnp.where(mask, loss, 0)`` or ``(loss * mask).sum() / mask.sum()``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softmax_jax as sj
from softmax_jax import reference as ref
from softmax_jax.fused import linear_softmax_cross_entropy, linear_softmax_distillation

_LABELS = jnp.array([[3, 7, 1, -100, -100], [4, 4, 9, 2, -100]])
_MASK = _LABELS != -100
_LOGITS = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 11))


def _masked_mean(per_example, mask):
    return jnp.where(mask, per_example, 0.0).sum() / mask.sum()


def _reference_grad(logits, labels, mask):
    """``jax.grad`` of the float64 formula on the valid rows only (the others: 0)."""
    safe = jnp.where(mask, labels, 0)
    with jax.enable_x64(True):
        f = lambda z: _masked_mean(  # noqa: E731
            ref.softmax_cross_entropy_with_integer_labels(z, safe), mask)
        return np.asarray(jax.grad(f)(jnp.asarray(logits, jnp.float64)))


@pytest.mark.parametrize("masking", ["where", "product"])
def test_integer_labels_padding_masked_outside_the_loss_has_finite_gradient(masking):
    def loss(fn, z):
        ce = fn(z, _LABELS)
        if masking == "where":
            return _masked_mean(ce, _MASK)
        return (ce * _MASK).sum() / _MASK.sum()

    ours = jax.grad(lambda z: loss(sj.softmax_cross_entropy_with_integer_labels, z))(_LOGITS)
    theirs = jax.grad(lambda z: _masked_mean(
        optax.softmax_cross_entropy_with_integer_labels(z, jnp.where(_MASK, _LABELS, 0)),
        _MASK))(_LOGITS)
    assert np.all(np.asarray(ours)[~np.asarray(_MASK)] == 0.0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours, _reference_grad(_LOGITS, _LABELS, _MASK),
                               rtol=1e-5, atol=1e-7)


def test_integer_labels_invalid_row_keeps_nan_value_and_nan_gradient_when_counted():
    per = sj.softmax_cross_entropy_with_integer_labels(_LOGITS, _LABELS)
    assert np.array_equal(np.isnan(per), ~np.asarray(_MASK))
    g = jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(z, _LABELS).sum())(
        _LOGITS)
    assert np.all(np.isnan(np.asarray(g)[~np.asarray(_MASK)]))


def test_integer_labels_nan_logits_row_with_zero_cotangent_has_zero_gradient():
    z = _LOGITS.at[0, 1, 4].set(jnp.nan)
    mask = _MASK.at[0, 1].set(False)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, class_weights=jnp.linspace(0.5, 2.0, 11))
    g = jax.grad(lambda z: _masked_mean(
        sj.softmax_cross_entropy_with_integer_labels(z, _LABELS, **kw), mask))(z)
    g = np.asarray(g)
    assert np.all(g[~np.asarray(mask)] == 0.0)
    assert np.all(np.isfinite(g[np.asarray(mask)]))


def test_integer_labels_hyperparameter_cotangents_ignore_zero_cotangent_rows():
    kw = dict(class_weights=jnp.linspace(0.5, 2.0, 11))

    def loss(z, eps, lam, w):
        return _masked_mean(sj.softmax_cross_entropy_with_integer_labels(
            z, _LABELS, label_smoothing=eps, z_loss=lam, class_weights=w), _MASK)

    grads = jax.grad(loss, argnums=(1, 2, 3))(_LOGITS, 0.1, 1e-3, kw["class_weights"])
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


def test_dense_labels_nan_logits_row_with_zero_cotangent_has_zero_gradient():
    z = _LOGITS.at[0, 3, 2].set(jnp.nan)
    y = jax.nn.one_hot(jnp.where(_MASK, _LABELS, 0), 11)

    def loss(z, y):
        return _masked_mean(sj.softmax_cross_entropy(z, y, label_smoothing=0.1, z_loss=1e-3),
                            _MASK)

    gz, gy = jax.grad(loss, argnums=(0, 1))(z, y)
    for g in (np.asarray(gz), np.asarray(gy)):
        assert np.all(g[~np.asarray(_MASK)] == 0.0)
        assert np.all(np.isfinite(g[np.asarray(_MASK)]))


def _head():
    x = jax.random.normal(jax.random.PRNGKey(1), (10, 4))
    w = jax.random.normal(jax.random.PRNGKey(2), (4, 11))
    return x, w, _LABELS.reshape(-1), _MASK.reshape(-1)


def test_fused_cross_entropy_none_padding_masked_outside_has_core_gradient():
    x, w, labels, mask = _head()
    kw = dict(label_smoothing=0.1, z_loss=1e-3)

    def fused(x, w):
        return _masked_mean(linear_softmax_cross_entropy(x, w, labels, reduction="none", **kw),
                            mask)

    def core(x, w):
        return _masked_mean(sj.softmax_cross_entropy_with_integer_labels(
            x @ w, jnp.where(mask, labels, 0), **kw), mask)

    for ours, theirs in zip(jax.grad(fused, (0, 1))(x, w), jax.grad(core, (0, 1))(x, w),
                            strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_fused_distillation_none_padding_masked_outside_has_finite_gradient():
    x, w, labels, mask = _head()
    tx = jax.random.normal(jax.random.PRNGKey(3), (10, 3))
    tw = jax.random.normal(jax.random.PRNGKey(4), (3, 11))

    def fused(x, w):
        return _masked_mean(linear_softmax_distillation(
            x, w, tx, tw, labels=labels, hard_weight=0.5, reduction="none"), mask)

    def core(x, w):
        hard = sj.softmax_cross_entropy_with_integer_labels(x @ w, jnp.where(mask, labels, 0))
        soft = sj.distillation_loss(x @ w, tx @ tw)
        return _masked_mean(0.5 * hard + 0.5 * soft, mask)

    for ours, theirs in zip(jax.grad(fused, (0, 1))(x, w), jax.grad(core, (0, 1))(x, w),
                            strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_contrastive_none_zero_cotangent_pair_with_invalid_label_has_zero_gradient():
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 3))
    y = jax.random.normal(jax.random.PRNGKey(6), (6, 3))
    labels = jnp.array([2, 7, 0, 5])  # 7 is out of range
    mask = jnp.array([True, False, True, True])

    def loss(x, y, s):
        per = sj.contrastive_loss(x, y, logit_scale=s, labels=labels, bidirectional=False,
                                  reduction="none")
        return jnp.where(mask, per, 0.0).sum()

    gx, gy, gs = jax.grad(loss, argnums=(0, 1, 2))(x, y, 2.0)
    assert np.all(np.asarray(gx)[1] == 0.0)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in (gx, gy, gs))


def test_contrastive_none_zero_cotangent_pair_with_nan_embedding_has_zero_x_gradient():
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 3)).at[1, 0].set(jnp.nan)
    y = jax.random.normal(jax.random.PRNGKey(6), (4, 3))
    mask = jnp.array([True, False, True, True])
    # (CLIP's column terms would see the NaN row in every column's normaliser.)
    one_way = lambda a, b, **kw: sj.contrastive_loss(a, b, bidirectional=False, **kw)  # noqa: E731
    for fn in (one_way, sj.sigmoid_contrastive_loss):
        g = jax.grad(lambda x, f=fn: jnp.where(mask, f(x, y, reduction="none"), 0.0).sum())(x)
        assert np.all(np.asarray(g)[1] == 0.0)
        assert np.all(np.isfinite(np.asarray(g)[np.asarray(mask)]))
