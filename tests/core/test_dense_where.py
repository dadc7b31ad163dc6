"""``where`` of the dense cross-entropy is slicing, labels included (optax's contract:
``softmax_cross_entropy(p[m], t[m]) == softmax_cross_entropy(p, t, where=m)``); an integer
label on a masked class keeps its infinite loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softmax_jax as sj


def _case(size, seed):
    rng = np.random.default_rng(seed)
    preds = rng.normal(size=size).astype(np.float32)
    targets = rng.dirichlet(np.ones(size)).astype(np.float32)
    mask = rng.integers(2, size=size).astype(bool)
    mask[rng.integers(size)] = True
    return preds, targets, mask


@pytest.mark.parametrize("size", [5, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_where_equals_slicing_the_masked_classes_away(size, seed):
    preds, targets, mask = _case(size, seed)
    want = sj.softmax_cross_entropy(preds[mask], targets[mask])
    got = sj.softmax_cross_entropy(preds, targets, where=mask)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, optax.softmax_cross_entropy(preds, targets, where=mask),
                               rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_where_with_smoothing_and_weights_equals_slicing(seed):
    preds, targets, mask = _case(10, seed)
    w = np.linspace(0.5, 2.0, 10).astype(np.float32)
    kw = dict(label_smoothing=0.2, z_loss=1e-2)
    want = sj.softmax_cross_entropy(preds[mask], targets[mask], class_weights=w[mask], **kw)
    got = sj.softmax_cross_entropy(preds, targets, where=mask, class_weights=w, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_dense_where_gradients_equal_those_of_the_sliced_loss():
    preds, targets, mask = _case(10, 3)
    w = np.linspace(0.5, 2.0, 10).astype(np.float32)

    def masked(p, t, eps, lam, w):
        return sj.softmax_cross_entropy(p, t, where=mask, label_smoothing=eps, z_loss=lam,
                                        class_weights=w)

    def sliced(p, t, eps, lam, w):
        return sj.softmax_cross_entropy(p[mask], t[mask], label_smoothing=eps, z_loss=lam,
                                        class_weights=w[mask])

    args = (preds, targets, 0.2, 1e-2, w)
    got = jax.grad(masked, argnums=(0, 1, 2, 3, 4))(*args)
    want = jax.grad(sliced, argnums=(0, 1, 2, 3, 4))(*args)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)
    for g in (got[0], got[1], got[4]):
        assert np.all(np.asarray(g)[~mask] == 0.0)


def test_dense_where_batch_of_class_masks_matches_optax_value_and_gradient():
    rng = np.random.default_rng(4)
    preds = rng.normal(size=(6, 7)).astype(np.float32)
    targets = rng.dirichlet(np.ones(7), size=6).astype(np.float32)
    mask = rng.integers(2, size=(6, 7)).astype(bool)
    mask[:, 0] = True
    np.testing.assert_allclose(sj.softmax_cross_entropy(preds, targets, where=mask),
                               optax.softmax_cross_entropy(preds, targets, where=mask),
                               rtol=1e-6)
    ours = jax.grad(lambda p: sj.softmax_cross_entropy(p, targets, where=mask).sum())(preds)
    theirs = jax.grad(lambda p: optax.softmax_cross_entropy(p, targets, where=mask).sum())(
        preds)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_integer_label_on_a_masked_class_keeps_an_infinite_loss():
    logits = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.1, -0.3]])
    mask = jnp.array([True, False, True])
    out = sj.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 2]),
                                                       where=mask[None, :])
    assert np.isposinf(float(out[0])) and np.isfinite(float(out[1]))
