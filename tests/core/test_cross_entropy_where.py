"""The cross-entropies' ``where`` masks: per-example and per-class masks as optax reads them,
and a label on a masked class."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from _cross_entropy_inputs import N, V, data, numpy_data, random_logits

import softmax_jax as sj


def test_where_agrees_with_optax_and_with_slicing():
    logits, labels, soft = data(seed=6)
    mask = np.ones((N, V), bool)
    mask[:, [2, 7]] = False
    labels = jnp.where(jnp.isin(labels, jnp.array([2, 7])), 0, labels)
    mask[3] = False  # a fully masked row
    got = sj.softmax_cross_entropy_with_integer_labels(logits, labels, where=mask)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, labels, where=mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[3] == 0.0
    np.testing.assert_allclose(sj.softmax_cross_entropy(logits, soft, where=mask),
                               optax.softmax_cross_entropy(logits, soft, where=mask),
                               rtol=1e-5, atol=1e-6)
    soft = jnp.where(mask, soft, 0.0)  # the same loss: where drops the masked label mass
    got_d = sj.softmax_cross_entropy(logits, soft, where=mask)
    np.testing.assert_allclose(got_d, optax.softmax_cross_entropy(logits, soft, where=mask),
                               rtol=1e-5, atol=1e-6)
    keep = [c for c in range(V) if c not in (2, 7)]
    sliced = sj.softmax_cross_entropy(logits[:, keep], soft[:, keep])
    np.testing.assert_allclose(np.delete(np.asarray(got_d), 3), np.delete(np.asarray(sliced), 3),
                               rtol=1e-5)
    g = jax.grad(lambda z: sj.softmax_cross_entropy(z, soft, where=mask).sum())(logits)
    np.testing.assert_array_equal(g[:, [2, 7]], 0.0)
    np.testing.assert_array_equal(g[3], 0.0)
    np.testing.assert_allclose(np.delete(np.asarray(g)[:, keep], 3, axis=0),
                               np.delete(np.asarray(jax.grad(lambda z: sj.softmax_cross_entropy(
                                   z, soft[:, keep]).sum())(logits[:, keep])), 3, axis=0),
                               rtol=1e-5, atol=1e-7)
    gi = jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(
        z, labels, where=mask).sum())(logits)
    np.testing.assert_array_equal(gi[3], 0.0)
    np.testing.assert_array_equal(gi[:, [2, 7]], 0.0)


def test_square_masks_follow_optax():
    """On square logits a ``[classes]``-shaped mask is one flag per example, as in optax; a
    class mask has the logits' rank (``where[None, :]``)."""
    logits, _, soft = numpy_data(seed=6, n=4, v=4)
    labels = np.array([0, 1, 2, 3])
    mask = np.array([True, True, True, False])
    for ours, theirs, y in [
        (sj.softmax_cross_entropy_with_integer_labels,
         optax.softmax_cross_entropy_with_integer_labels, labels),
        (sj.softmax_cross_entropy, optax.softmax_cross_entropy, soft),
    ]:
        per_example = ours(logits, y, where=mask)
        np.testing.assert_allclose(per_example, theirs(logits, y, where=mask), rtol=1e-5)
        assert per_example[3] == 0.0 and (per_example[:3] > 0).all()
    got = sj.softmax_cross_entropy_with_integer_labels(logits, labels, where=mask[None, :])
    sliced = optax.softmax_cross_entropy_with_integer_labels(logits[:3, :3], labels[:3])
    np.testing.assert_allclose(got[:3], sliced, rtol=1e-6)
    assert np.isposinf(got[3])  # its label is the masked class
    full = np.broadcast_to(mask, (4, 4))
    kept = np.where(full, soft, 0.0)
    np.testing.assert_allclose(sj.softmax_cross_entropy(logits, kept, where=mask[None, :]),
                               optax.softmax_cross_entropy(logits, kept, where=full), rtol=1e-5)
    np.testing.assert_allclose(sj.softmax_cross_entropy(logits, soft, where=mask[None, :]),
                               optax.softmax_cross_entropy(logits, soft, where=full), rtol=1e-5)


@pytest.mark.parametrize("n,k", [(4, 4), (5, 3), (3, 6)])
def test_per_example_mask_matches_optax(n, k):
    z = random_logits(n, k)
    labels = jnp.arange(n) % k
    rows = jnp.arange(n) % 3 != 1
    soft = jax.nn.softmax(random_logits(n, k, seed=1))
    for ours, theirs, y in [
        (sj.softmax_cross_entropy_with_integer_labels,
         optax.softmax_cross_entropy_with_integer_labels, labels),
        (sj.softmax_cross_entropy, optax.softmax_cross_entropy, soft),
    ]:
        np.testing.assert_allclose(ours(z, y, where=rows), theirs(z, y, where=rows),
                                   rtol=1e-6, atol=1e-7)
        g = jax.grad(lambda z, f=ours, y=y: f(z, y, where=rows).sum())(z)
        g_ref = jax.grad(lambda z, f=theirs, y=y: f(z, y, where=rows).sum())(z)
        np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-7)
    # a mask of the logits' rank is per element (no label on a masked class here)
    full = jnp.ones((n, k), bool).at[:, -1].set(False).at[0].set(False)
    labels = jnp.arange(n) % (k - 1)
    np.testing.assert_allclose(
        sj.softmax_cross_entropy_with_integer_labels(z, labels, where=full),
        optax.softmax_cross_entropy_with_integer_labels(z, labels, where=full), rtol=1e-6,
        atol=1e-6)  # optax's lse - z_y cancels near 0


def test_per_example_mask_with_tuple_axes_matches_optax():
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 4, 5))
    labels = jnp.arange(8).reshape(2, 4) % 15
    rows = jnp.array([[True, False, True, True], [False, True, True, False]])
    got = sj.softmax_cross_entropy_with_integer_labels(z, labels, axis=(1, 3), where=rows)
    want = optax.softmax_cross_entropy_with_integer_labels(z, labels, axis=(1, 3), where=rows)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    soft = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(4), z.shape), axis=(1, 3))
    np.testing.assert_allclose(sj.softmax_cross_entropy(z, soft, axis=(1, 3), where=rows),
                               optax.softmax_cross_entropy(z, soft, axis=(1, 3), where=rows),
                               rtol=1e-5)


def test_mask_of_another_rank_raises_naming_both_spellings():
    z = random_logits(4, 5)
    with pytest.raises(ValueError, match=r"where.shape=\(5,\)"):
        sj.softmax_cross_entropy_with_integer_labels(z, jnp.zeros(4, int), where=jnp.ones(5, bool))
    with pytest.raises(ValueError, match="where"):
        sj.softmax_cross_entropy(z[None], jnp.zeros((1, 4, 5)), where=jnp.ones(5, bool))


@pytest.mark.parametrize("eps,weighted", [(0.0, False), (0.2, False), (0.2, True)])
def test_integer_label_on_a_masked_class_is_infinite_and_dense_drops_it(eps, weighted):
    logits = jnp.zeros((1, 3))
    loss = sj.softmax_cross_entropy_with_integer_labels(
        logits, jnp.array([1]), where=jnp.array([[True, False, True]]))
    assert np.isposinf(loss[0])
    z = random_logits(3, 5)
    labels = jnp.array([4, 1, 2])
    mask = jnp.ones((3, 5), bool).at[0, 4].set(False).at[1, 0].set(False)
    w = jnp.array([1.0, 0.5, 2.0, 1.5, 0.7]) if weighted else None
    kw = dict(where=mask, label_smoothing=eps, class_weights=w)

    def integer(z, e):
        return sj.softmax_cross_entropy_with_integer_labels(z, labels, **kw | {
            "label_smoothing": e})

    def dense(z, e):
        return sj.softmax_cross_entropy(z, jax.nn.one_hot(labels, 5), **kw | {
            "label_smoothing": e})

    a, b = integer(z, eps), dense(z, eps)
    assert np.isposinf(a[0])
    # the dense loss's where slices the labels too (as optax's): the masked mass is dropped
    kept = jnp.where(mask, jax.nn.one_hot(labels, 5), 0.0)
    np.testing.assert_allclose(b, sj.softmax_cross_entropy(z, kept, **kw), rtol=1e-6)
    np.testing.assert_allclose(a[1:], b[1:], rtol=1e-6)
    # the rows whose label is not masked: torch on the unmasked classes
    zt = torch.tensor(np.where(np.asarray(mask), np.asarray(z), -np.inf)[1:], dtype=torch.float64)
    ref = torch.nn.functional.cross_entropy(
        zt, torch.tensor(np.asarray(labels[1:])).long(), reduction="none",
        weight=None if w is None else torch.tensor(np.asarray(w), dtype=torch.float64))
    if eps == 0.0:
        np.testing.assert_allclose(a[1:], ref.numpy(), rtol=1e-6)
    argnums = (0, 1) if eps else (0,)
    ga = jax.grad(lambda *x: integer(*x).sum(), argnums)(z, eps)
    gb = jax.grad(lambda *x: dense(*x).sum(), argnums)(z, eps)
    np.testing.assert_allclose(ga[0][1:], gb[0][1:], rtol=1e-5, atol=1e-6)
    # the logits' gradient of the infinite row: c a - eps w / K over the unmasked classes
    wv = jnp.ones(5) if w is None else w
    c = (1 - eps) * wv[4] + eps * jnp.sum(wv[:4]) / 4
    a = jax.nn.softmax(z[0], where=mask[0])
    want = jnp.where(mask[0], c * a - eps * wv / 4, 0.0)
    np.testing.assert_allclose(ga[0][0], want, rtol=1e-5, atol=1e-7)
