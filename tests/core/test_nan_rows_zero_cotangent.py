"""A row whose cotangent is exactly zero gets an exactly zero gradient, whatever its inputs
hold (a NaN among them), in every core function; the other rows get ``jax.grad`` of the plain
formula (and its second derivatives), and a NaN row whose cotangent is not zero keeps NaN
gradients (all of the row, or for the log-softmax where its cotangent is not zero).

This is how users mask rows outside a function: ``jnp.where(row_mask, f(x), 0)`` or
``(f(x) * mask).sum()``. ``jax.nn`` returns NaN for the whole gradient of such a row.
"""

from __future__ import annotations

import functools

import _inputs
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_jax as sj
from softmax_jax import reference as ref

N, V = 3, 5
ROWS = np.array([True, False, True])  # row 1 is masked out and holds a NaN
_NAN_AT = (1, 2)
_WEIGHTS = _inputs.uniform(0, (N, V), 0.5, 2.0)  # a generic cotangent for N x V outputs


def _with_nan(x: jax.Array) -> jax.Array:
    host = np.array(x)
    host[_NAN_AT] = np.nan
    return jnp.asarray(host)


_LOGITS = _with_nan(_inputs.normal(1, (N, V)))
_PROBS = _with_nan(_inputs.probabilities(2, (N, V)))
_TARGETS = _inputs.probabilities(3, (N, V))
_LOG_TARGETS = jnp.asarray(np.log(np.asarray(_TARGETS)))


def _masked_total(out: jax.Array, rows: np.ndarray, weights: np.ndarray) -> jax.Array:
    """The sum of ``out`` over the rows kept by ``rows`` (an N x V output weighted by a
    generic cotangent), the other rows left out with a ``where``."""
    if out.ndim == 2:
        return jnp.where(rows[:, None], out * weights.astype(out.dtype), 0.0).sum()
    return jnp.where(rows, out, 0.0).sum()


# name: (softmax_jax function, plain formula, inputs, argnums differentiated)
CASES = {
    "softmax": (sj.softmax, ref.softmax, (_LOGITS,)),
    "log_softmax": (sj.log_softmax, ref.log_softmax, (_LOGITS,)),
    "logsumexp": (functools.partial(sj.logsumexp, axis=-1), ref.logsumexp, (_LOGITS,)),
    "logsumexp scale factors": (
        lambda a, b: sj.logsumexp(a, axis=-1, b=b),
        lambda a, b: jax.nn.logsumexp(a, axis=-1, b=b), (_LOGITS, _TARGETS)),
    "softmax_entropy": (sj.softmax_entropy, ref.softmax_entropy, (_LOGITS,)),
    "sigmoid": (sj.sigmoid, ref.sigmoid, (_LOGITS,)),
    "sigmoid_binary_cross_entropy": (
        sj.sigmoid_binary_cross_entropy, ref.sigmoid_binary_cross_entropy,
        (_LOGITS, _TARGETS)),
    "log_likelihood": (sj.log_likelihood, ref.log_likelihood, (_PROBS, _TARGETS)),
    "quadratic_cost": (sj.quadratic_cost, ref.quadratic_cost, (_PROBS, _TARGETS)),
    "kl_divergence": (sj.kl_divergence, ref.kl_divergence, (_LOG_TARGETS, _PROBS)),
    "kl_divergence_with_log_targets": (
        sj.kl_divergence_with_log_targets, ref.kl_divergence_with_log_targets,
        (_LOGITS, _LOG_TARGETS)),
    "distillation_loss": (
        functools.partial(sj.distillation_loss, temperature=2.0, beta=0.5),
        functools.partial(ref.distillation_loss, temperature=2.0, beta=0.5),
        (_LOGITS, _TARGETS)),
}


def _grads(fn, args, rows, weights):
    argnums = tuple(range(len(args)))
    return jax.jit(jax.grad(lambda *a: _masked_total(fn(*a), rows, weights), argnums))(*args)


@pytest.mark.parametrize("name", CASES)
def test_nan_row_with_zero_cotangent_gets_exactly_zero_gradient(name):
    fn, plain, args = CASES[name]
    ours = _grads(fn, args, ROWS, np.asarray(_WEIGHTS))
    with jax.enable_x64(True):
        kept = tuple(jnp.asarray(np.asarray(a)[ROWS], jnp.float64) for a in args)
        theirs = _grads(plain, kept, ROWS[ROWS], np.asarray(_WEIGHTS)[ROWS])
    for g, want in zip(ours, theirs, strict=True):
        g = np.asarray(g)
        assert np.all(g[~ROWS] == 0.0), g[~ROWS]
        np.testing.assert_allclose(g[ROWS], want, rtol=1e-5, atol=1e-6)


# The cotangent is not zero, though its sum (log_softmax) or its product with the softmax
# (softmax) could be: the softmax's whole row stays NaN, as jax.nn gives; the log-softmax's
# gradient g - a * sum(g) is NaN where the cotangent is not 0, and 0 where it is (its sum
# being 0 too).
_SUMS_TO_ZERO = np.zeros((N, V), np.float32)
_SUMS_TO_ZERO[1, :2] = 1.0, -1.0


@pytest.mark.parametrize(("name", "nan_at"), [
    ("softmax", np.ones(V, bool)), ("log_softmax", _SUMS_TO_ZERO[1] != 0)])
def test_nan_row_whose_cotangent_sums_to_zero_keeps_a_nan_gradient(name, nan_at):
    fn = CASES[name][0]
    g = np.asarray(jax.jit(jax.grad(lambda x: (fn(x) * _SUMS_TO_ZERO).sum()))(_LOGITS))
    np.testing.assert_array_equal(np.isnan(g[1]), nan_at)
    assert np.all(g[1][~nan_at] == 0.0)
    assert np.all(g[ROWS] == 0.0)  # rows with a zero cotangent


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_zero_cotangent_rows_under_vmap_match_the_batched_call(name):
    fn = CASES[name][0]
    weights = jnp.asarray(np.where(ROWS[:, None], np.asarray(_WEIGHTS), 0.0))

    def row_loss(x, w):
        out = fn(x)
        return (out * w).sum() if out.ndim else out * w[0]

    batched = jax.jit(jax.grad(lambda x: jax.vmap(row_loss)(x, weights).sum()))(_LOGITS)
    mapped = jax.jit(jax.vmap(jax.grad(row_loss)))(_LOGITS, weights)
    assert np.all(np.asarray(mapped)[~ROWS] == 0.0)
    # the two programs fuse differently: equal to float32 rounding
    np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-7)


_SECOND_ORDER = ["softmax", "log_softmax", "logsumexp", "softmax_entropy", "sigmoid"]


@pytest.mark.parametrize("name", _SECOND_ORDER)
def test_hessian_where_the_cotangent_is_exactly_zero_matches_the_plain_formula(x64, name):
    # In (f(z) * z).sum() the cotangent of f is z itself: a logit of exactly 0 is a zero
    # cotangent whose own derivative is not 0, so the zero-cotangent rule must not act on
    # finite rows (row 1 is all 0: its whole cotangent, and the softmax's sum, are 0).
    fn, plain = CASES[name][:2]
    z = np.asarray(_inputs.normal(4, (N, V)), np.float64)
    z[0, 1], z[1] = 0.0, 0.0

    def total(f):
        def weighted(x):
            out = f(x)
            return (out * (x if out.ndim == 2 else x[:, 0])).sum()
        return weighted

    ours = jax.jit(jax.hessian(total(fn)))(z)
    theirs = jax.jit(jax.hessian(total(plain)))(z)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
