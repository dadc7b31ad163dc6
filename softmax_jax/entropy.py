r"""The entropy of the softmax, with its analytic ``custom_vjp`` rule.

A member of the softmax family (:mod:`softmax_jax.activations`): it reads ``axis`` and
``where`` the same way, normalises each row by the same :class:`Normalizer`, and treats
:math:`-\infty` entries, masked entries and fully masked rows as that family does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from softmax_jax import _validation as _v
from softmax_jax._cross_entropy_terms import (  # the shared 0-times-inf and zero-row rules
    times,
    zero_without_cotangent,
)
from softmax_jax._normalizer import Axes, Normalizer, masked_fill, reduction_axes
from softmax_jax._validation import Mask

__all__ = ["softmax_entropy"]


def _row_entropy(norm: Normalizer, z: jax.Array, axis: Axes) -> jax.Array:
    r""":math:`H = -\sum_j a_j \log a_j` per row (``axis`` kept as size 1); an entry with
    :math:`a_j = 0` (a :math:`-\infty` or masked logit, an empty row) adds exactly 0."""
    # 0 - sum rather than -sum: a row whose every term is 0 has entropy +0, not -0.
    return 0.0 - jnp.sum(times(norm.prob(z), norm.log_prob(z)), axis=axis, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax_entropy(x: jax.Array, axis: Axes, mask: Mask) -> jax.Array:
    return _softmax_entropy_fwd(x, axis, mask)[0]


def _softmax_entropy_fwd(x: jax.Array, axis: Axes, mask: Mask):
    z = masked_fill(x.astype(_v.compute_dtype(x.dtype)), mask, -jnp.inf)
    norm = Normalizer.of(z, axis)
    h = _row_entropy(norm, z, axis)
    # The input is live anyway; beyond it only O(rows) numbers are saved.
    return jnp.squeeze(h, axis).astype(x.dtype), (x, norm, h, mask)


def _softmax_entropy_bwd(axis: Axes, res, g: jax.Array) -> tuple[jax.Array, None]:
    r"""Entropy vector-Jacobian product.

    From :math:`H = \mathrm{lse}(z) - \sum_j a_j z_j` and :math:`\partial a_j/\partial z_i =
    a_j(\delta_{ij} - a_i)`: :math:`\partial H/\partial z_i = a_i - a_i - a_i z_i + a_i
    \sum_j a_j z_j = -a_i(\log a_i + H)`, so :math:`\bar z = -\bar g\,a(\log a + H)`. An
    entry with :math:`a_i = 0` (a :math:`-\infty` or masked logit, a fully masked row)
    gets exactly 0, although :math:`\log a_i = -\infty` there; so does a row whose
    cotangent is 0, even where it is NaN.
    """
    x, norm, h, mask = res
    ct = norm.m.dtype
    z = masked_fill(x.astype(ct), mask, -jnp.inf)
    norm = norm.fenced()
    g_k = jnp.expand_dims(g.astype(ct), axis)
    a = norm.scaled_prob(z, -g_k)
    dx = zero_without_cotangent(times(a, norm.log_prob(z) + h), g_k)
    dx = masked_fill(dx, mask, 0.0)
    return dx.astype(x.dtype), None


_softmax_entropy.defvjp(_softmax_entropy_fwd, _softmax_entropy_bwd)
_softmax_entropy_jit = jax.jit(_softmax_entropy, static_argnums=(1,))


def softmax_entropy(
    logits: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Entropy of the softmax of ``logits`` along ``axis``.

    .. math::
        H = -\sum_j a_j \log a_j = \mathrm{lse}(z) - \sum_j a_j z_j,
        \qquad a = \mathrm{softmax}(z).

    Gradient (a ``custom_vjp``): :math:`\partial H/\partial z_i = -a_i(\log a_i + H)`.

    Args:
      logits: floating-point array of logits.
      axis: the axis to normalise over, a tuple of axes normalised over together, or
        ``None`` for all axes (as in :func:`softmax_jax.softmax`).
      where: optional boolean mask that broadcasts to ``logits``' shape, ``jax.nn``'s
        convention (a per-row mask is ``(N, 1)``); masked entries take no part and get
        gradient 0.

    Returns:
      ``logits``' shape without ``axis``, in its dtype (computed in at least float32). A
      :math:`-\infty` (or masked) entry adds 0 and gets gradient 0; a fully masked row has
      entropy 0 and gradient 0; a row holding :math:`+\infty` or NaN gives NaN.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> print(sj.softmax_entropy(jnp.array([[0.0, 0.0], [2.0, -jnp.inf]])))  # log 2, 0
      [0.6931 0.0000]
      >>> print(jax.grad(lambda z: sj.softmax_entropy(z))(jnp.array([2.0, 3.0, 4.0])))
      [ 0.1418  0.1408 -0.2826]
    """
    x = _v.as_float_array("logits", logits)
    axes = reduction_axes(axis, x.ndim, "logits")
    return _softmax_entropy_jit(x, axes, _v.prepare_where(where, x.shape, axes))
