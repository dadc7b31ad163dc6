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

Each rule sits right below its function and names the formula it implements. The rules are
written in differentiable ``jnp``, so reverse-over-reverse (``jax.jacrev(jax.grad(f))``) and
forward-over-reverse (``jax.hessian(f)``) both work. Forward mode applied to the function
itself (``jax.jvp``, ``jax.jacfwd``) is not available for a ``custom_vjp`` function: JAX
raises a ``TypeError`` saying so.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from softmax_jax import _axes
from softmax_jax import _validation as _v

__all__ = ["log_softmax", "logsumexp", "sigmoid", "softmax"]


# --------------------------------------------------------------------------------------------
# Shared stable kernels (plain jnp; used by the losses too)
# --------------------------------------------------------------------------------------------


def masked_fill(x: jax.Array, mask: jax.Array | None, fill: float) -> jax.Array:
    """``x`` with masked-out entries replaced by ``fill`` (the identity when there is no mask).

    Replacing before any arithmetic is the first half of the "double where": a masked NaN or
    inf never reaches an ``exp`` and so can never leak into a value or a gradient.
    """
    return x if mask is None else jnp.where(mask, x, fill)


class Normalizer(NamedTuple):
    r"""The softmax normaliser of each row, kept as two parts: :math:`\mathrm{lse} = m + \log s`.

    ``m`` is the row maximum (0 for a row with no finite maximum) and ``log_s`` is
    :math:`\log\sum_k e^{z_k - m}`. Keeping the parts apart matters at large magnitudes: for
    a row of four entries of :math:`-3 \times 10^{38}`, ``m + log_s`` rounds to ``m`` and
    :math:`e^{z - \mathrm{lse}}` would give 1 for every entry, whereas
    :math:`e^{(z - m) - \log s}` gives the right 1/4. Both arrays keep ``axis`` as size 1.
    """

    m: jax.Array
    log_s: jax.Array

    @staticmethod
    def of(z: jax.Array, axis: int) -> Normalizer:
        r"""Normaliser of ``z`` along ``axis``; masked entries must already be :math:`-\infty`.

        Two passes over ``z``: :math:`m = \max_k z_k`, then :math:`\log\sum_k e^{z_k - m}`.
        Every row is shifted by its own maximum, whatever the other rows hold, so a row's
        result does not depend on the rest of the batch, and :math:`z_k - m` is exact at the
        largest logit, so :math:`\log a_k` there is :math:`-\log s` with no cancellation
        between two large numbers. A row of only :math:`-\infty` (or an empty row) gets
        ``m = 0`` and ``log_s = -inf`` rather than NaN; NaN entries propagate through the
        sum. ``m`` carries no derivative: any shift gives the same normaliser.
        """
        m = jax.lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True, initial=-jnp.inf))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        return Normalizer(m, jnp.log(jnp.sum(jnp.exp(z - m), axis=axis, keepdims=True)))

    def lse(self) -> jax.Array:
        r""":math:`\log\sum_k e^{z_k}`: :math:`-\infty` for an empty (fully masked) row."""
        return self.m + self.log_s

    def log_prob(self, z: jax.Array) -> jax.Array:
        r""":math:`\log a = (z - m) - \log s`; an empty row gives :math:`-\infty`, not NaN."""
        return (z - self.m) - jnp.where(self.log_s == -jnp.inf, 0.0, self.log_s)

    def prob(self, z: jax.Array) -> jax.Array:
        r""":math:`a = e^{(z - m) - \log s}`: the softmax, 0 on masked entries and empty rows."""
        return jnp.exp(self.log_prob(z))


def batched_as_rows(body, factory, axis: int):
    """``body`` (a computation done row by row along ``axis``) as a ``custom_vmap`` whose
    batching rule treats the mapped axis as one more row axis: it calls ``factory(axis + 1)``,
    the same function built for that axis, on the arguments with the mapped axis first
    (unmapped ones broadcast to it). Control flow inside ``body`` (a ``lax.cond``) then
    decides once for the whole batch instead of becoming a ``select`` over every branch.
    """
    batchable = jax.custom_batching.custom_vmap(body)

    @batchable.def_vmap
    def _batched(axis_size, in_batched, *args):
        mapped = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
                  for a, b in zip(args, in_batched, strict=True)]
        out = factory(axis + 1)(*mapped)
        return out, jax.tree.map(lambda _: True, out)

    return batchable


# --------------------------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax(x: jax.Array, axis: int, mask: jax.Array | None) -> jax.Array:
    return _softmax_fwd(x, axis, mask)[0]


def _softmax_fwd(
    x: jax.Array, axis: int, mask: jax.Array | None
) -> tuple[jax.Array, tuple[jax.Array, jax.Array | None]]:
    z = masked_fill(x.astype(_v.compute_dtype(x.dtype)), mask, -jnp.inf)
    # exp((z - m) - log s) rather than exp(z - m) / s: the exponentials are recomputed inside
    # the final element-wise pass instead of being stored as an N x V temporary between passes.
    a = Normalizer.of(z, axis).prob(z).astype(x.dtype)
    return a, (a, mask)


def _softmax_bwd(
    axis: int, res: tuple[jax.Array, jax.Array | None], g: jax.Array
) -> tuple[jax.Array, None]:
    r"""Softmax Jacobian-vector product.

    From :math:`\partial a_j / \partial z_i = a_j(\delta_{ij} - a_i)`:
    :math:`\bar z_i = \sum_j \bar a_j a_j (\delta_{ij} - a_i)
    = a_i (\bar a_i - \sum_j \bar a_j a_j)`.
    """
    a, mask = res
    ct = _v.compute_dtype(a.dtype)
    a32 = a.astype(ct)
    ga = masked_fill(g.astype(ct) * a32, mask, 0.0)
    dx = ga - a32 * jnp.sum(ga, axis=axis, keepdims=True)
    return dx.astype(a.dtype), None


_softmax.defvjp(_softmax_fwd, _softmax_bwd)
_softmax_jit = jax.jit(_softmax, static_argnums=(1,))


def softmax(
    x: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Softmax along ``axis``, stable for any finite input.

    .. math::
        a_j = \frac{e^{x_j - m}}{\sum_k e^{x_k - m}}, \qquad m = \max_k x_k .

    Gradient (a ``custom_vjp``): :math:`\bar x = a \odot (\bar a - \sum_j \bar a_j a_j)`, the
    softmax Jacobian :math:`a_j(\delta_{ij} - a_i)` applied to the cotangent.

    Args:
      x: floating-point array of scores (logits).
      axis: the axis to normalise over, or a tuple of axes normalised over together.
      where: optional boolean mask of ``x``'s shape (or that shape without ``axis``); masked
        entries get probability 0 and take no part in the normalisation. A fully masked row
        is all zeros.

    Returns:
      An array of ``x``'s shape and dtype whose entries along ``axis`` sum to 1.

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> print(sj.softmax(jnp.array([2.0, 3.0, 4.0])))
      [0.0900 0.2447 0.6652]
      >>> print(sj.softmax(jnp.array([2.0, 3.0, 4.0]), where=jnp.array([True, True, False])))
      [0.2689 0.7311 0.0000]
    """
    x = _v.as_float_array("x", x)
    axis = _axes.class_axes(axis, x.ndim)
    if isinstance(axis, tuple):
        flat = _axes.Flattening.of(x.shape, axis)
        out = softmax(flat.flatten(x), -1, flat.where(where))
        return flat.unflatten(out)
    return _softmax_jit(x, axis, _v.prepare_where(where, x.shape, axis))


# --------------------------------------------------------------------------------------------
# log_softmax
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _log_softmax(x: jax.Array, axis: int, mask: jax.Array | None) -> jax.Array:
    return _log_softmax_fwd(x, axis, mask)[0]


def _log_softmax_fwd(
    x: jax.Array, axis: int, mask: jax.Array | None
) -> tuple[jax.Array, tuple[jax.Array, jax.Array | None]]:
    z = masked_fill(x.astype(_v.compute_dtype(x.dtype)), mask, -jnp.inf)
    out = Normalizer.of(z, axis).log_prob(z).astype(x.dtype)
    return out, (out, mask)


def _log_softmax_bwd(
    axis: int, res: tuple[jax.Array, jax.Array | None], g: jax.Array
) -> tuple[jax.Array, None]:
    r"""Log-softmax vector-Jacobian product.

    From :math:`\partial \log a_j / \partial z_i = \delta_{ij} - a_i`:
    :math:`\bar z = \bar g - a \sum_j \bar g_j`, with :math:`a = e^{\log a}` recomputed from the
    saved output. Masked entries neither receive nor contribute cotangent.
    """
    out, mask = res
    ct = _v.compute_dtype(out.dtype)
    g = masked_fill(g.astype(ct), mask, 0.0)
    a = jnp.exp(out.astype(ct))
    dx = masked_fill(g - a * jnp.sum(g, axis=axis, keepdims=True), mask, 0.0)
    return dx.astype(out.dtype), None


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)
_log_softmax_jit = jax.jit(_log_softmax, static_argnums=(1,))


def log_softmax(
    x: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Log of the softmax along ``axis``, without ever forming the softmax itself.

    .. math::
        \log a_j = x_j - \log\sum_k e^{x_k} = (x_j - m) - \log\sum_k e^{x_k - m}.

    Gradient (a ``custom_vjp``): :math:`\bar x = \bar g - a \sum_j \bar g_j`.

    Args:
      x: floating-point array of logits.
      axis: the axis to normalise over, or a tuple of axes normalised over together.
      where: optional boolean mask (``x``'s shape, or that shape without ``axis``); masked
        entries come out as :math:`-\infty` and get zero gradient.

    Returns:
      An array of ``x``'s shape and dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> print(sj.log_softmax(jnp.array([2.0, 3.0, 4.0])))
      [-2.4076 -1.4076 -0.4076]
    """
    x = _v.as_float_array("x", x)
    axis = _axes.class_axes(axis, x.ndim)
    if isinstance(axis, tuple):
        flat = _axes.Flattening.of(x.shape, axis)
        out = log_softmax(flat.flatten(x), -1, flat.where(where))
        return flat.unflatten(out)
    return _log_softmax_jit(x, axis, _v.prepare_where(where, x.shape, axis))


# --------------------------------------------------------------------------------------------
# logsumexp
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _logsumexp(x: jax.Array, axis: int, mask: jax.Array | None) -> jax.Array:
    return _logsumexp_fwd(x, axis, mask)[0]


def _logsumexp_fwd(
    x: jax.Array, axis: int, mask: jax.Array | None
) -> tuple[jax.Array, tuple[jax.Array, Normalizer, jax.Array | None]]:
    norm = Normalizer.of(masked_fill(x.astype(_v.compute_dtype(x.dtype)), mask, -jnp.inf), axis)
    # The input is live anyway; saving it and the normaliser costs O(rows) extra.
    return jnp.squeeze(norm.lse(), axis).astype(x.dtype), (x, norm, mask)


def _logsumexp_bwd(
    axis: int, res: tuple[jax.Array, Normalizer, jax.Array | None], g: jax.Array
) -> tuple[jax.Array, None]:
    r"""Log-sum-exp vector-Jacobian product.

    From :math:`\partial\,\mathrm{lse}(x) / \partial x_i = a_i` (the softmax):
    :math:`\bar x = \bar g\, a` with :math:`a = e^{(x - m) - \log s}` recomputed from the input.
    """
    x, norm, mask = res
    ct = norm.m.dtype
    a = norm.prob(masked_fill(x.astype(ct), mask, -jnp.inf))
    return (jnp.expand_dims(g.astype(ct), axis) * a).astype(x.dtype), None


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)
_logsumexp_jit = jax.jit(_logsumexp, static_argnums=(1,))


def logsumexp(
    x: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Stable :math:`\log\sum_k e^{x_k}` along ``axis`` (the axis is reduced away).

    .. math::
        \mathrm{lse}(x) = m + \log\sum_k e^{x_k - m}, \qquad m = \max_k x_k .

    Gradient (a ``custom_vjp``): :math:`\bar x = \bar g\,\mathrm{softmax}(x)`.

    Args:
      x: floating-point array.
      axis: the axis to reduce, or a tuple of axes.
      where: optional boolean mask; masked entries are left out of the sum. A fully masked
        row (or a row of :math:`-\infty`) gives :math:`-\infty`.

    Returns:
      ``x``'s shape without ``axis``, in ``x``'s dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> x = jnp.array([1000.0, 1000.0])  # exp(1000) overflows; the shifted form does not
      >>> print(sj.logsumexp(x) - 1000.0)
      0.6931
    """
    x = _v.as_float_array("x", x)
    axis = _axes.class_axes(axis, x.ndim)
    if isinstance(axis, tuple):
        flat = _axes.Flattening.of(x.shape, axis)
        return logsumexp(flat.flatten(x), -1, flat.where(where))
    return _logsumexp_jit(x, axis, _v.prepare_where(where, x.shape, axis))


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
    """
    ct = _v.compute_dtype(x.dtype)
    z = x.astype(ct)
    return ((g.astype(ct) * jax.lax.logistic(z) * jax.lax.logistic(-z)).astype(x.dtype),)


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
