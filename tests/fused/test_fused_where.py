"""The fused losses' per-token boolean ``where``: a masked token is what an ignored one is
(loss 0, gradient 0, left out of the mean), whatever its label holds."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import normal

from softmax_jax.fused import linear_softmax_cross_entropy, linear_softmax_distillation

_B, _T, _D, _V = 2, 3, 4, 7
_X = normal(0, (_B, _T, _D))
_W = normal(1, (_D, _V))
_BIAS = normal(2, _V)
_TX = normal(3, (_B, _T, 3))
_TW = normal(4, (3, _V))
_LABELS = jnp.array([[1, 6, 99], [0, 3, -5]])  # 99 and -5 invalid, but masked
_WHERE = jnp.array([[True, True, False], [True, False, False]])
_IGNORED = jnp.where(_WHERE, _LABELS, -100)


def _ce(where, labels, ignore_index, reduction, x, w, b, eps):
    return linear_softmax_cross_entropy(
        x, w, labels, b, where=where, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=eps, z_loss=1e-3, class_weights=jnp.linspace(0.5, 2.0, _V))


def _distill(where, labels, ignore_index, reduction, x, w, b, eps):
    return linear_softmax_distillation(
        x, w, _TX, _TW, labels=labels, b=b, where=where, ignore_index=ignore_index,
        reduction=reduction, hard_weight=0.3, label_smoothing=eps, temperature=2.0, beta=0.5)


@functools.partial(jax.jit, static_argnames=("loss", "reduction"))
def _masked_and_ignored(x, w, b, *, loss, reduction, eps=0.1):
    """The loss (with a constant ``eps``) and the gradients of its sum for (x, w, b, eps),
    with the tokens masked by ``where`` and with the same tokens labelled ``ignore_index``."""
    args = (x, w, b, jnp.float32(eps))

    def value_and_grads(where, labels, ignore_index):
        value = loss(where, labels, ignore_index, reduction, x, w, b, eps)
        grads = jax.grad(lambda *a: jnp.sum(loss(where, labels, ignore_index, reduction, *a)),
                         argnums=(0, 1, 2, 3))(*args)
        return value, grads

    return value_and_grads(_WHERE, _LABELS, None), value_and_grads(None, _IGNORED, -100)


@pytest.mark.parametrize("loss", [_ce, _distill])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_where_equals_ignore_index_on_the_masked_tokens(loss, reduction):
    (value, got), (value_ignored, want) = _masked_and_ignored(
        _X, _W, _BIAS, loss=loss, reduction=reduction)
    np.testing.assert_array_equal(value, value_ignored)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, h)
    assert np.all(np.asarray(got[0])[~np.asarray(_WHERE)] == 0.0)


def test_fused_distillation_where_without_labels_is_the_mean_over_kept_tokens():
    got, per = jax.jit(lambda x: (
        linear_softmax_distillation(x, _W, _TX, _TW, where=_WHERE),
        linear_softmax_distillation(x, _W, _TX, _TW, reduction="none")))(_X)
    np.testing.assert_allclose(got, per[_WHERE].mean(), rtol=1e-6)


def test_fused_where_must_be_boolean_of_the_token_shape():
    with pytest.raises(TypeError, match="where must be a boolean mask"):
        linear_softmax_cross_entropy(_X, _W, _LABELS, where=_WHERE.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"where must be a boolean mask of shape \(2, 3\)"):
        linear_softmax_cross_entropy(_X, _W, _LABELS, where=_WHERE.reshape(-1))
    with pytest.raises(TypeError, match="where must be a boolean mask"):
        linear_softmax_distillation(_X, _W, _TX, _TW, where=jnp.ones((_B, _T)))
