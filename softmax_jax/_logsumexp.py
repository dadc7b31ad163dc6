r"""``logsumexp``, with ``jax.nn.logsumexp``'s signature: scale factors ``b``, the sign of the
sum, ``keepdims``, ``where``, and ``axis=None`` (all axes) by default.

Two rules: without ``b`` the gradient is the softmax, recomputed from the input and the saved
normaliser; with ``b`` it is :math:`b\,e^{x - \mathrm{lse}}` times the sign of the sum, for
both arguments. Each saves its inputs and O(rows) numbers, never an N x V tensor.
"""

from __future__ import annotations

import functools
from typing import Literal, overload

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

__all__ = ["logsumexp"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _logsumexp(x: jax.Array, axis: Axes, mask: Mask) -> jax.Array:
    return _logsumexp_fwd(x, axis, mask)[0]


def _logsumexp_fwd(
    x: jax.Array, axis: Axes, mask: Mask
) -> tuple[jax.Array, tuple[jax.Array, Normalizer, Mask]]:
    norm = Normalizer.of(masked_fill(x.astype(_v.compute_dtype(x.dtype)), mask, -jnp.inf), axis)
    # The input is live anyway; saving it and the normaliser costs O(rows) extra.
    return jnp.squeeze(norm.lse(), axis).astype(x.dtype), (x, norm, mask)


def _logsumexp_bwd(
    axis: Axes, res: tuple[jax.Array, Normalizer, Mask], g: jax.Array
) -> tuple[jax.Array, None]:
    r"""Log-sum-exp vector-Jacobian product.

    From :math:`\partial\,\mathrm{lse}(x) / \partial x_i = a_i` (the softmax):
    :math:`\bar x = \bar g\, a` with :math:`a = e^{(x - m) - \log s}` recomputed from the input;
    exactly 0 in a row whose cotangent is 0, even where that row is NaN.
    """
    x, norm, mask = res
    ct = norm.m.dtype
    z = masked_fill(x.astype(ct), mask, -jnp.inf)
    g_k = jnp.expand_dims(g.astype(ct), axis)
    dx = _ce.zero_without_cotangent(norm.fenced().scaled_prob(z, g_k), g_k)
    return dx.astype(x.dtype), None


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)
_logsumexp_jit = jax.jit(_logsumexp, static_argnums=(1,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scaled_logsumexp(
    x: jax.Array, axis: Axes, b: jax.Array, mask: Mask
) -> tuple[jax.Array, jax.Array]:
    return _scaled_logsumexp_fwd(x, axis, b, mask)[0]


def _scaled_logsumexp_fwd(
    x: jax.Array, axis: Axes, b: jax.Array, mask: Mask
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array, Mask, jax.Array, jax.Array]]:
    ct = _v.compute_dtype(x.dtype)
    z = masked_fill(x.astype(ct), mask, -jnp.inf)
    # A zero weight drops its term whatever x holds there (an inf or a NaN), as in jax.nn.
    z = jnp.where(b == 0, -jnp.inf, z)
    m = Normalizer.shift(z, axis)
    s = jnp.sum(b.astype(ct) * jnp.exp(z - m), axis=axis, keepdims=True)
    lse = jnp.squeeze(m + jnp.log(jnp.abs(s)), axis).astype(x.dtype)
    # Only O(rows) is saved beyond the inputs: the shift and the signed sum.
    return (lse, jnp.squeeze(jnp.sign(s), axis).astype(x.dtype)), (x, b, mask, m, s)


def _scaled_logsumexp_bwd(
    axis: Axes,
    res: tuple[jax.Array, jax.Array, Mask, jax.Array, jax.Array],
    cts: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array, None]:
    r"""Vector-Jacobian product of :math:`\log|S|`, :math:`S = \sum_k b_k e^{x_k}`.

    From :math:`\partial \log|S| / \partial x_i = b_i e^{x_i} / S` and
    :math:`\partial \log|S| / \partial b_i = e^{x_i} / S`, with
    :math:`e^{x_i} / S = \mathrm{sign}(S)\, e^{(x_i - m) - \log|s|}`:
    :math:`\bar b = \bar g\,\mathrm{sign}(S)\,e^{x - \mathrm{lse}}` (summed over the axes
    ``b`` was broadcast along) and :math:`\bar x = b \odot \bar b`. The sign output is
    piecewise constant and takes no cotangent. Entries with :math:`e^{x_i} = 0` (masked,
    :math:`-\infty`) get 0, also in an empty row, but NaN in a row whose sum is NaN; a
    sum cancelled to exactly 0 gives the infinite derivative, as ``jax.nn`` does. A zero
    weight still gets its true :math:`\bar b_i` (``jax.nn``'s autodiff gives 0 there). A row
    whose cotangent is 0 gets exactly 0 for both, even where it is NaN.
    """
    x, b, mask, m, s = res
    ct = m.dtype
    z = masked_fill(x.astype(ct), mask, -jnp.inf)
    empty = z == -jnp.inf
    log_abs = jnp.where(s == 0, 0.0, jnp.log(jnp.abs(s)))
    e = jnp.exp((jnp.where(empty, m, z) - m) - log_abs)  # double where: never -inf - -inf
    # A NaN sum (a NaN or +inf entry) makes the whole row NaN, its -inf entries too, as
    # without b.
    w = jnp.where(empty & ~jnp.isnan(s), 0.0, e * jnp.where(s == 0, jnp.inf, jnp.sign(s)))
    g_k = jnp.expand_dims(cts[0].astype(ct), axis)
    w = _ce.zero_without_cotangent(w * g_k, g_k)
    bc = b.astype(ct)
    dx = masked_fill(jnp.where(bc == 0, 0.0, bc * w), mask, 0.0)
    return dx.astype(x.dtype), _sum_to_shape(w, b.shape).astype(b.dtype), None


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``x`` summed over the axes that an array of ``shape`` (same rank) was broadcast along."""
    axes = tuple(d for d, n in enumerate(shape) if n == 1 and x.shape[d] != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


_scaled_logsumexp.defvjp(_scaled_logsumexp_fwd, _scaled_logsumexp_bwd)
_scaled_logsumexp_jit = jax.jit(_scaled_logsumexp, static_argnums=(1,))


def _scale_factors(a: jax.Array, b: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
    """``a`` and ``b`` in their common floating dtype, ``b`` given ``a``'s rank; ``b`` must
    be real and broadcast to ``a`` (it never enlarges the result)."""
    arr = jnp.asarray(b)
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
            or arr.dtype == jnp.bool_):
        raise TypeError(f"b must be a real array of scale factors, got dtype {arr.dtype}")
    if not _v.broadcasts_to(arr.shape, a.shape):
        raise ValueError(
            f"b.shape={tuple(arr.shape)} must broadcast to a.shape={tuple(a.shape)}"
        )
    dtype = jnp.result_type(a, b)
    arr = jnp.reshape(arr, (1,) * (a.ndim - arr.ndim) + arr.shape)
    return a.astype(dtype), arr if arr.dtype == dtype else arr.astype(dtype)


@overload
def logsumexp(
    a: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = None,
    b: jax.typing.ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: Literal[False] = False,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array: ...
@overload
def logsumexp(
    a: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = None,
    b: jax.typing.ArrayLike | None = None,
    keepdims: bool = False,
    *,
    return_sign: Literal[True],
    where: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]: ...
@overload
def logsumexp(
    a: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = None,
    b: jax.typing.ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def logsumexp(
    a: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = None,
    b: jax.typing.ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Stable :math:`\log\sum_k b_k e^{a_k}` over ``axis``, with ``jax.nn.logsumexp``'s
    signature and semantics (including its default ``axis=None``: all axes).

    .. math::
        \mathrm{lse}(a) = m + \log\Big|\sum_k b_k e^{a_k - m}\Big|, \qquad m = \max_k a_k .

    Gradient (a ``custom_vjp``): :math:`\bar a = \bar g\,\mathrm{softmax}(a)` without ``b``;
    with it, :math:`\bar b = \bar g\,\mathrm{sign}(S)\,e^{a - \mathrm{lse}}` and
    :math:`\bar a = b \odot \bar b`, where :math:`S = \sum_k b_k e^{a_k}`.

    Args:
      a: floating-point array.
      axis: the axis to reduce, a tuple of axes, or ``None`` (the default) for all axes.
      b: optional scale factors for the exponentials, broadcasting to ``a``'s shape; they
        may be negative. A zero factor drops its term, whatever ``a`` holds there.
      keepdims: keep the reduced axes as size 1.
      return_sign: return ``(lse, sign)``, ``lse`` being the log of :math:`|S|` and
        ``sign`` the sign of :math:`S` (0 for an empty sum). Without it, a negative sum
        gives NaN (whose gradient is 0, as in ``jax.nn``).
      where: optional boolean mask broadcasting to ``a``'s shape; masked entries are left
        out of the sum. A fully masked row, a row of :math:`-\infty` and an empty axis
        give :math:`-\infty`. An unmasked :math:`+\infty` entry (with a nonzero weight)
        gives NaN, value and gradient, as in the rest of the family (``jax.nn.logsumexp``
        gives :math:`+\infty`, which its gradient, the softmax, cannot follow).

    Returns:
      ``a``'s shape without ``axis`` (or with it as size 1 under ``keepdims``), in the dtype
      of ``a`` and ``b`` promoted together; with ``return_sign``, a pair of such arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> x = jnp.array([1000.0, 1000.0])  # exp(1000) overflows; the shifted form does not
      >>> print(sj.logsumexp(x) - 1000.0)
      0.6931
      >>> print(sj.logsumexp(jnp.array([[0.0, 0.0], [1.0, 2.0]]), axis=-1))
      [0.6931 2.3133]
      >>> lse, sign = sj.logsumexp(jnp.array([0.0, 1.0]), b=jnp.array([1.0, -1.0]),
      ...                          return_sign=True)
      >>> print(lse, sign)  # log(e - 1) = 0.5413, and the sum is negative
      0.5413 -1.0
    """
    a = _v.as_float_array("a", a)
    if b is not None:
        a, b = _scale_factors(a, b)
    axes = reduction_axes(axis, a.ndim, "a")
    mask = _v.prepare_where(where, a.shape, axes)
    if b is None:
        lse = _logsumexp_jit(a, axes, mask)
        lse = jnp.expand_dims(lse, axes) if keepdims else lse
        if not return_sign:
            return lse
        # A sum of exponentials is positive, or 0 when empty (lse = -inf); NaN stays NaN.
        fixed = jax.lax.stop_gradient(lse)
        sign = jnp.where(fixed == -jnp.inf, 0.0, jnp.where(jnp.isnan(fixed), fixed, 1.0))
        return lse, sign.astype(lse.dtype)
    lse, sign = _scaled_logsumexp_jit(a, axes, b, mask)
    if keepdims:
        lse, sign = jnp.expand_dims(lse, axes), jnp.expand_dims(sign, axes)
    if return_sign:
        return lse, sign
    return jnp.where(sign < 0, jnp.nan, lse)  # a negative sum has no real logarithm
