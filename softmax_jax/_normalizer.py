"""The shared pieces of the softmax family: reading ``axis`` and ``where``, masking, and the
per-row normaliser.

Plain ``jnp`` with no rules of their own; :mod:`softmax_jax.activations`, ``logsumexp`` and
the losses build their ``custom_vjp`` rules on them. A normaliser is computed row by row
(a row being everything along the normalised axes), so a row's result never depends on what
the other rows hold.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from softmax_jax import _axes
from softmax_jax import _validation as _v

Axes = tuple[int, ...]
Mask = jax.Array | None


def reduction_axes(axis: object, ndim: int, name: str = "x") -> Axes:
    """``axis`` as a tuple of distinct non-negative ints. ``None`` is every axis, and so no
    axis at all for a scalar, which is then its own one-entry row (as in ``jax.nn``)."""
    if axis is None and ndim == 0:
        return ()
    axes = _axes.class_axes(axis, ndim, name)
    return axes if isinstance(axes, tuple) else (axes,)


def broadcast_mask(where: jax.typing.ArrayLike | None, shape: tuple[int, ...], axes: Axes) -> Mask:
    """The ``where`` mask, checked (NumPy broadcasting only) and given ``shape``'s rank."""
    if where is None:
        return None
    mask = _v.check_where(where, shape, axes)
    return jnp.reshape(mask, (1,) * (len(shape) - mask.ndim) + mask.shape)


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
    def of(z: jax.Array, axis: int | tuple[int, ...]) -> Normalizer:
        r"""Normaliser of ``z`` along ``axis``; masked entries must already be :math:`-\infty`.

        Two passes over ``z``: :math:`m = \max_k z_k`, then :math:`\log\sum_k e^{z_k - m}`.
        Every row is shifted by its own maximum, whatever the other rows hold, so a row's
        result does not depend on the rest of the batch, and :math:`z_k - m` is exact at the
        largest logit, so :math:`\log a_k` there is :math:`-\log s` with no cancellation
        between two large numbers. A row of only :math:`-\infty` (or an empty row) gets
        ``m = 0`` and ``log_s = -inf`` rather than NaN; NaN entries propagate through the
        sum. ``m`` carries no derivative: any shift gives the same normaliser.
        """
        m = Normalizer.shift(z, axis)
        return Normalizer(m, jnp.log(jnp.sum(jnp.exp(z - m), axis=axis, keepdims=True)))

    @staticmethod
    def shift(z: jax.Array, axis: int | tuple[int, ...]) -> jax.Array:
        """:math:`m`: the row maximum, or 0 where it is not finite (an empty row, say)."""
        m = jax.lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True, initial=-jnp.inf))
        return jnp.where(jnp.isfinite(m), m, 0.0)

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
