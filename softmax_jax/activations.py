r"""The softmax family and the sigmoid, each with its analytic ``custom_vjp`` rule.

Every function computes in at least float32 (bf16/f16 inputs are upcast, the result is cast
back) and is stable for any finite input. Stability comes from the notes'
:math:`F = -\max_k x_k` shift, which changes nothing mathematically,

.. math::
    \frac{e^{x_i + F}}{\sum_k e^{x_k + F}} = \frac{e^F e^{x_i}}{e^F \sum_k e^{x_k}}
    = \frac{e^{x_i}}{\sum_k e^{x_k}},

but keeps every exponent at or below zero, so nothing overflows. :class:`Normalizer` always
applies it, row by row: each row is shifted by its own maximum, so a row's value and gradient
are bit for bit the same whatever else is in the batch, and at the largest logit
:math:`x_i + F = 0` exactly, so the log-probability there is not the difference of two
large numbers.

``axis`` is read as in ``jax.nn``: an int, a tuple of axes normalised over together, or
``None`` for every axis. ``where`` masks follow NumPy broadcasting (a per-row mask is
``(N, 1)``). Zero-size inputs give what ``jax.nn`` gives: an empty softmax, and
:math:`-\infty` for the log-sum-exp of nothing.

A :math:`+\infty` logit (unmasked) has no softmax (:math:`\infty / \infty`): it makes its
row NaN in every function of the family, values and gradients, as a NaN logit does and as
``jax.nn.softmax`` does; ``logsumexp`` is NaN there too, where ``jax.nn.logsumexp`` gives
:math:`+\infty`. Other rows are unaffected, and :math:`-\infty` logits are ordinary
(probability 0).

Each rule sits right below its function and names the formula it implements. The rules are
written in differentiable ``jnp``, so reverse-over-reverse (``jax.jacrev(jax.grad(f))``) and
forward-over-reverse (``jax.hessian(f)``) both work. Forward mode applied to the function
itself (``jax.jvp``, ``jax.jacfwd``) is not available for a ``custom_vjp`` function: JAX
raises a ``TypeError`` saying so.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from softmax_jax import _cross_entropy_terms as _ce
from softmax_jax import _validation as _v
from softmax_jax._normalizer import (
    Axes,
    Normalizer,
    masked_fill,
    reduction_axes,
)
from softmax_jax._validation import Mask

__all__ = ["log_softmax", "sigmoid", "softmax"]


# --------------------------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax(x: jax.Array, axis: Axes, mask: Mask) -> jax.Array:
    return _softmax_fwd(x, axis, mask)[0]


def _softmax_fwd(x: jax.Array, axis: Axes, mask: Mask) -> tuple[jax.Array, tuple[jax.Array, Mask]]:
    z = masked_fill(x.astype(_v.compute_dtype(x.dtype)), mask, -jnp.inf)
    # One pass after the row statistics: XLA keeps e^(z - m) from the sum's pass for the
    # output (Normalizer.prob), so nothing N x V but the output is written.
    a = Normalizer.of(z, axis).prob(z).astype(x.dtype)
    return a, (a, mask)


def _softmax_bwd(axis: Axes, res: tuple[jax.Array, Mask], g: jax.Array) -> tuple[jax.Array, None]:
    r"""Softmax Jacobian-vector product.

    From :math:`\partial a_j / \partial z_i = a_j(\delta_{ij} - a_i)`:
    :math:`\bar z_i = \sum_j \bar a_j a_j (\delta_{ij} - a_i)
    = a_i (\bar a_i - \sum_j \bar a_j a_j)`. Masked entries take no cotangent; a row whose
    cotangent is all 0 (:math:`\max_j |\bar a_j| = 0`) gets exactly 0, even where its
    softmax is NaN; a NaN row with any nonzero cotangent is NaN throughout, as in ``jax.nn``.
    """
    a, mask = res
    ct = _v.compute_dtype(a.dtype)
    a32 = a.astype(ct)
    g = masked_fill(g.astype(ct), mask, 0.0)
    # a (g - s) rather than a g - a s: g * a is then read only inside the reduction, and the
    # gradient is one element-wise pass over (a, g) instead of a stored a * g read twice.
    dx = a32 * (g - jnp.sum(a32 * g, axis=axis, keepdims=True))
    # Whether the row's cotangent is all 0: from the cotangent alone, as the NaN row's sum
    # above is NaN either way. On XLA:CPU the select splits the fused pass (no select fuses
    # into it): one more read and write of an N x V array.
    g_max = jnp.max(jnp.abs(g), axis=axis, keepdims=True, initial=0.0)
    return _ce.zero_without_cotangent(dx, g_max).astype(a.dtype), None


_softmax.defvjp(_softmax_fwd, _softmax_bwd)
_softmax_jit = jax.jit(_softmax, static_argnums=(1,))


def softmax(
    x: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Softmax along ``axis``, stable for any finite input.

    .. math::
        a_j = \frac{e^{x_j - m}}{\sum_k e^{x_k - m}}, \qquad m = \max_k x_k .

    Gradient (a ``custom_vjp``): :math:`\bar x = a \odot (\bar a - \sum_j \bar a_j a_j)`, the
    softmax Jacobian :math:`a_j(\delta_{ij} - a_i)` applied to the cotangent.

    Args:
      x: floating-point array of scores (logits).
      axis: the axis to normalise over, a tuple of axes normalised over together, or
        ``None`` for all axes.
      where: optional boolean mask that broadcasts to ``x``'s shape (a per-row mask is
        ``(N, 1)``); masked entries get probability 0 and take no part in the
        normalisation. A fully masked row is all zeros.

    Returns:
      An array of ``x``'s shape and dtype whose entries along ``axis`` sum to 1 (an empty
      array for an empty ``x``).

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> print(sj.softmax(jnp.array([2.0, 3.0, 4.0])))
      [0.0900 0.2447 0.6652]
      >>> print(sj.softmax(jnp.array([2.0, 3.0, 4.0]), where=jnp.array([True, True, False])))
      [0.2689 0.7311 0.0000]
    """
    x = _v.as_float_array("x", x)
    axes = reduction_axes(axis, x.ndim)
    return _softmax_jit(x, axes, _v.prepare_where(where, x.shape, axes))


# --------------------------------------------------------------------------------------------
# log_softmax
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _log_softmax(x: jax.Array, axis: Axes, mask: Mask) -> jax.Array:
    return _log_softmax_fwd(x, axis, mask)[0]


def _log_softmax_fwd(
    x: jax.Array, axis: Axes, mask: Mask
) -> tuple[jax.Array, tuple[jax.Array, Mask]]:
    z = masked_fill(x.astype(_v.compute_dtype(x.dtype)), mask, -jnp.inf)
    out = Normalizer.of(z, axis).log_prob(z).astype(x.dtype)
    return out, (out, mask)


def _log_softmax_bwd(
    axis: Axes, res: tuple[jax.Array, Mask], g: jax.Array
) -> tuple[jax.Array, None]:
    r"""Log-softmax vector-Jacobian product.

    From :math:`\partial \log a_j / \partial z_i = \delta_{ij} - a_i`:
    :math:`\bar z = \bar g - a \sum_j \bar g_j`, with :math:`a = e^{\log a}` recomputed from the
    saved output. Masked entries neither receive nor contribute cotangent; a row whose
    cotangent is all 0 gets exactly 0, even where its log-softmax is NaN (element-wise: an
    entry whose :math:`\bar g_j` and :math:`\sum_j \bar g_j` are 0, so that in a NaN row
    whose nonzero cotangent sums to 0 only the entries with a nonzero cotangent are NaN).
    """
    out, mask = res
    ct = _v.compute_dtype(out.dtype)
    g = masked_fill(g.astype(ct), mask, 0.0)
    a = jnp.exp(out.astype(ct))
    g_sum = jnp.sum(g, axis=axis, keepdims=True)
    dx = masked_fill(_ce.zero_without_cotangent(g - a * g_sum, g, g_sum), mask, 0.0)
    return dx.astype(out.dtype), None


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)
_log_softmax_jit = jax.jit(_log_softmax, static_argnums=(1,))


def log_softmax(
    x: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Log of the softmax along ``axis``, without ever forming the softmax itself.

    .. math::
        \log a_j = x_j - \log\sum_k e^{x_k} = (x_j - m) - \log\sum_k e^{x_k - m}.

    Gradient (a ``custom_vjp``): :math:`\bar x = \bar g - a \sum_j \bar g_j`.

    Args:
      x: floating-point array of logits.
      axis: the axis to normalise over, a tuple of axes normalised over together, or
        ``None`` for all axes.
      where: optional boolean mask that broadcasts to ``x``'s shape (a per-row mask is
        ``(N, 1)``); masked entries come out as :math:`-\infty` and get zero gradient.

    Returns:
      An array of ``x``'s shape and dtype (an empty array for an empty ``x``).

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> print(sj.log_softmax(jnp.array([2.0, 3.0, 4.0])))
      [-2.4076 -1.4076 -0.4076]
    """
    x = _v.as_float_array("x", x)
    axes = reduction_axes(axis, x.ndim)
    return _log_softmax_jit(x, axes, _v.prepare_where(where, x.shape, axes))


# --------------------------------------------------------------------------------------------
# sigmoid
# --------------------------------------------------------------------------------------------


@jax.custom_vjp
def _sigmoid(x: jax.Array) -> jax.Array:
    return _sigmoid_fwd(x)[0]


def _sigmoid_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # lax.logistic never overflows: it saturates to exactly 0 or 1.
    return jax.lax.logistic(x.astype(_v.compute_dtype(x.dtype))).astype(x.dtype), x


def _sigmoid_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    r"""Sigmoid derivative :math:`\sigma'(z) = \sigma(z)(1 - \sigma(z)) = \sigma(z)\sigma(-z)`.

    The second form is evaluated (from the saved input): for large :math:`z`,
    :math:`1 - \sigma(z)` cancels catastrophically while :math:`\sigma(-z)` stays exact.
    An entry whose cotangent is 0 gets exactly 0, even at a NaN input.
    """
    ct = _v.compute_dtype(x.dtype)
    z, g = x.astype(ct), g.astype(ct)
    dx = _ce.zero_without_cotangent(g * jax.lax.logistic(z) * jax.lax.logistic(-z), g)
    return (dx.astype(x.dtype),)


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)
_sigmoid_jit = jax.jit(_sigmoid)


def sigmoid(x: jax.typing.ArrayLike) -> jax.Array:
    r"""The logistic sigmoid :math:`\sigma(x) = 1 / (1 + e^{-x})`, element-wise.

    Gradient (a ``custom_vjp``): :math:`\bar x = \bar a\,\sigma(x)(1 - \sigma(x))`. This is the
    :math:`\sigma'(z)` factor that slows learning under the quadratic cost.

    Args:
      x: floating-point array.

    Returns:
      An array of ``x``'s shape and dtype with entries in [0, 1].

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> print(sj.sigmoid(jnp.array([-1.0, 0.0, 1.0])))
      [0.2689 0.5    0.7311]
    """
    return _sigmoid_jit(_v.as_float_array("x", x))
