"""One behaviour for a +inf logit across the softmax family: its row is NaN, everywhere.

A +inf logit is an overflow upstream; the softmax has no value there (inf / inf), so every
function of the row's normaliser returns NaN for that row, value and gradient, as it does
for a NaN logit: the softmax, log_softmax, logsumexp (with or without ``b``), the
cross-entropies and the divergences. ``jax.nn.softmax`` gives NaN too; ``jax.nn.logsumexp``
gives +inf (the one difference, documented). The other rows of the batch are untouched, a
masked +inf takes no part, and an ignored example stays 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_jax as sj

INF = jnp.inf


# Rows 0 and 1 hold +inf; row 2 is an ordinary row that must come out as if alone.
X = jnp.array([[1.0, INF, 0.0], [INF, INF, -INF], [2.0, 3.0, 1.0]])


COT = jnp.arange(9.0).reshape(3, 3) / 9.0


LABELS = jnp.array([0, 1, 2])


def _check_rows(out, alone):
    """NaN over every entry of rows 0 and 1; row 2 exactly what its own computation gives."""
    out = np.asarray(out)
    assert np.all(np.isnan(out[:2])), out
    np.testing.assert_array_equal(out[2], np.asarray(alone))


def _losses():
    t = jax.nn.one_hot(LABELS, 3)
    return {
        "softmax": lambda x: sj.softmax(x),
        "log_softmax": lambda x: sj.log_softmax(x),
        "logsumexp": lambda x: sj.logsumexp(x, axis=-1),
        "logsumexp with b": lambda x: sj.logsumexp(x, axis=-1, b=jnp.full((3,), 0.5)),
        "integer-label CE": lambda x: sj.softmax_cross_entropy_with_integer_labels(
            x, LABELS[: x.shape[0]] if x.shape[0] == 3 else LABELS[2:]),
        "integer-label CE, smoothing and z-loss": lambda x:
            sj.softmax_cross_entropy_with_integer_labels(
                x, LABELS if x.shape[0] == 3 else LABELS[2:], label_smoothing=0.1,
                z_loss=1e-3),
        "dense CE": lambda x: sj.softmax_cross_entropy(x, t if x.shape[0] == 3 else t[2:]),
        "kl_divergence": lambda x: sj.kl_divergence(sj.log_softmax(x), sj.softmax(-x * 0.0)),
        "distillation (student)": lambda x: sj.distillation_loss(x, jnp.zeros_like(x)),
        "distillation (teacher)": lambda x: sj.distillation_loss(jnp.zeros_like(x), x),
    }


@pytest.mark.parametrize("name", list(_losses()))
def test_a_plus_inf_logit_makes_its_row_nan_value_and_gradient(name):
    fn = _losses()[name]
    _check_rows(fn(X), fn(X[2:])[0])

    def scalar(x):
        y = fn(x)
        return jnp.sum(y * COT[-x.shape[0]:]) if y.ndim == 2 else jnp.sum(y)

    _check_rows(jax.grad(scalar)(X), jax.grad(scalar)(X[2:])[0])


def test_softmax_of_plus_inf_agrees_with_jax_nn():
    x = jnp.array([1.0, INF])
    assert np.all(np.isnan(sj.softmax(x))) and np.all(np.isnan(jax.nn.softmax(x)))
    assert np.all(np.isnan(sj.log_softmax(x))) and np.all(np.isnan(jax.nn.log_softmax(x)))
    # the documented difference: jax.nn.logsumexp gives +inf, a number the gradient
    # (the softmax) cannot follow
    assert np.isnan(sj.logsumexp(x)) and np.isposinf(jax.nn.logsumexp(x))
    lse, sign = sj.logsumexp(x, return_sign=True)
    assert np.isnan(lse) and np.isnan(sign)


def test_masked_plus_inf_takes_no_part():
    mask = jnp.array([True, False, True])
    for fn, nn_fn in [(sj.softmax, jax.nn.softmax), (sj.log_softmax, jax.nn.log_softmax)]:
        np.testing.assert_allclose(fn(X[0], where=mask), nn_fn(X[0], where=mask), rtol=1e-6)
    np.testing.assert_allclose(sj.logsumexp(X[0], where=mask), np.logaddexp(1.0, 0.0),
                               rtol=1e-6)
    # A class mask of the cross-entropy has the logits' rank (optax's convention).
    loss = sj.softmax_cross_entropy_with_integer_labels(X[:1], LABELS[:1], where=mask[None])
    np.testing.assert_allclose(loss, [np.logaddexp(1.0, 0.0) - 1.0], rtol=1e-6)


def test_an_ignored_example_with_plus_inf_stays_zero():
    labels = jnp.array([-100, -100, 2])

    def loss(x):
        return sj.softmax_cross_entropy_with_integer_labels(x, labels, ignore_index=-100)

    total, g = jax.value_and_grad(lambda x: loss(x).sum())(X)
    np.testing.assert_array_equal(loss(X)[:2], 0.0)
    np.testing.assert_array_equal(g[:2], 0.0)
    assert np.isfinite(total)
