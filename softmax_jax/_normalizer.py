"""The shared pieces of the softmax family: reading ``axis``, masking (the ``where`` mask is
checked by :func:`softmax_jax._validation.prepare_where`), and the per-row normaliser.

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


def reduction_axes(axis: object, ndim: int, name: str = "x") -> Axes:
    """``axis`` as a tuple of distinct non-negative ints. ``None`` is every axis, and so no
    axis at all for a scalar, which is then its own one-entry row (as in ``jax.nn``)."""
    if axis is None and ndim == 0:
        return ()
    axes = _axes.class_axes(axis, ndim, name)
    return axes if isinstance(axes, tuple) else (axes,)


def masked_fill(x: jax.Array, mask: _v.Mask, fill: float) -> jax.Array:
    """``x`` with masked-out entries replaced by ``fill`` (the identity when there is no mask).

    Replacing before any arithmetic is the first half of the "double where": a masked NaN or
    inf never reaches an ``exp`` and so can never leak into a value or a gradient.
    """
    return x if mask is None else jnp.where(mask, x, fill)


class Normalizer(NamedTuple):
    r"""The softmax normaliser of each row, kept as two parts: :math:`\mathrm{lse} = m + \log s`.

    ``m`` is the row shift (the row maximum; the most negative finite number for a row with
    no entry above :math:`-\infty`) and ``log_s`` is :math:`\log\sum_k e^{z_k - m}`. Keeping
    the parts apart matters at large magnitudes: for a row of four entries of
    :math:`-3 \times 10^{38}`, ``m + log_s`` rounds to ``m`` and :math:`e^{z - \mathrm{lse}}`
    would give 1 for every entry, whereas :math:`e^{z - m} / s` gives the right 1/4. Both
    arrays keep ``axis`` as size 1. A normaliser computed from ``z`` (:meth:`of`) keeps the
    sum ``s`` too, from which :meth:`prob` and :meth:`log_prob` take their per-row factor.

    Every row-level decision (an empty row, a :math:`+\infty` logit) is taken on these
    O(rows) numbers, never by a select over the row's entries, so that each N x V result
    (:meth:`prob`, :meth:`log_prob`) is one element-wise pass over ``z`` that XLA fuses with
    the two reductions (on CPU, into the single YNNPACK fusion it makes of
    ``jax.nn.softmax``, which reads each row from memory once).

    A :math:`+\infty` logit is an overflow upstream, with no softmax (:math:`\infty/\infty`):
    everything computed from its row's normaliser (probabilities, log-probabilities, the
    log-sum-exp itself, every loss and gradient) is NaN, as for a NaN logit.
    """

    m: jax.Array
    log_s: jax.Array
    # The sum s itself, where the normaliser was computed from z (:meth:`of`).
    s: jax.Array | None = None

    @staticmethod
    def of(z: jax.Array, axis: int | tuple[int, ...]) -> Normalizer:
        r"""Normaliser of ``z`` along ``axis``; masked entries must already be :math:`-\infty`.

        Two passes over ``z``: :math:`m = \max_k z_k`, then :math:`\log\sum_k e^{z_k - m}`.
        Every row is shifted by its own maximum, whatever the other rows hold, so a row's
        result does not depend on the rest of the batch, and :math:`z_k - m` is exact at the
        largest logit, so :math:`\log a_k` there is :math:`-\log s` with no cancellation
        between two large numbers. A row of only :math:`-\infty` (or an empty row) gets
        ``log_s = -inf`` and a finite ``m`` rather than NaN. A row holding :math:`+\infty`
        is shifted by :math:`+\infty`, so that its sum, and everything computed from it, is
        NaN; NaN entries propagate likewise. ``m`` carries no derivative: any shift gives
        the same normaliser.
        """
        m = Normalizer.shift(z, axis)
        s = jnp.sum(jnp.exp(z - m), axis=axis, keepdims=True)
        return Normalizer(m, jnp.log(s), s)

    @staticmethod
    def shift(z: jax.Array, axis: int | tuple[int, ...]) -> jax.Array:
        r""":math:`m`: the row maximum, or the most negative finite number where that is
        :math:`-\infty` (an empty row), so that :math:`z - m` is :math:`-\infty` there, not
        NaN."""
        # The floor is the reduction's initial value rather than a select on its result: a
        # select between the maximum and its uses splits XLA:CPU's fused softmax, which then
        # reads z from memory once more for the maximum alone.
        floor = -jnp.finfo(z.dtype).max
        return jax.lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True, initial=floor))

    def fenced(self) -> Normalizer:
        r"""The same normaliser behind an ``optimization_barrier`` (on O(rows) numbers only).

        For a backward pass that recomputes :meth:`prob` or :meth:`log_prob` from ``z``: it
        then no longer holds the forward pass's own ``z - m``, which XLA would otherwise
        share between the forward reduction and the backward element-wise pass and, on CPU,
        write out as an N x V array (the YNNPACK reduce fusion does not take a producer with
        a second consumer). Fenced, each pass computes ``z - m`` inside its own fusion.
        """
        return Normalizer(*jax.lax.optimization_barrier(tuple(self)))

    def lse(self) -> jax.Array:
        r""":math:`\log\sum_k e^{z_k}`: :math:`-\infty` for an empty (fully masked) row, NaN
        for a row holding :math:`+\infty`."""
        return self.m + self.log_s

    def _finite_log_s(self) -> jax.Array:
        # log s >= 0 in a row with an entry above -inf (the maximum adds e^0 = 1), so only an
        # empty row's -inf, which would meet z - m = -inf there, must be made finite.
        if self.s is not None:
            # log(s + eps/4) is log s bit for bit wherever s >= 1 (eps/4 is below half an
            # ulp of 1), finite for s = 0 (log(2^-25) = -17.3 in float32), and NaN for a
            # NaN row, in one chain of ops on the reduction's output, which XLA:CPU keeps in
            # its fusion of the reductions with the element-wise pass. A clamp of log s does
            # not do: XLA:CPU's vectorised (YNNPACK) max skips NaN, so a NaN row would come
            # out as plausible numbers; and a select, or a second use of log s, splits the
            # fusion and writes z - m out as an extra N x V array. An empty row's per-row
            # factor e^{-log(eps/4)} = 2^25 then meets its zero exponentials: the product is
            # 0 for a cotangent up to 1e31 in float32 (the smallest offset, float32's tiny,
            # made it 8e37 and a cotangent above 4 gave NaN).
            return jnp.log(self.s + jnp.finfo(self.s.dtype).eps / 4)
        # A normaliser assembled from per-row statistics (the fused engine's) is not inside
        # such a fusion: the clamp is enough. -1 rather than 0 keeps log s = 0 off the
        # clamp's tie, whose derivative would be halved.
        return jnp.maximum(self.log_s, -1.0)

    def log_prob(self, z: jax.Array) -> jax.Array:
        r""":math:`\log a = (z - m) - \log s`; an empty row gives :math:`-\infty`, not NaN."""
        return (z - self.m) - self._finite_log_s()

    def prob(self, z: jax.Array) -> jax.Array:
        r""":math:`a = e^{z - m} / s`: the softmax, 0 on masked entries and empty rows.

        Computed as :math:`e^{z - m} \cdot e^{-\log s}`, the per-row factor taken once: one
        exponential per entry, the same one the sum took (XLA keeps it from that pass),
        and more accurate than :math:`e^{(z - m) - \log s}`, whose subtraction rounds to
        the precision of :math:`|z - m|`.
        """
        return self.scaled_prob(z, 1.0)

    def scaled_prob(self, z: jax.Array, factor: jax.Array | float) -> jax.Array:
        r""":math:`c\,a = e^{z - m} \cdot (c\,e^{-\log s})` for a per-row factor :math:`c`
        (``axis`` kept as size 1), such as a cotangent: the factor joins the row's
        :math:`e^{-\log s}` first, so each entry costs one multiply, not two (about 5%
        of a cross-entropy gradient on CPU). :math:`c = 1` is :meth:`prob`, bit for bit.
        An infinite :math:`c` gives NaN where :math:`a = 0` (:math:`0 \cdot \infty`), as
        :math:`c \cdot a` does.
        """
        return jnp.exp(z - self.m) * (factor * jnp.exp(-self._finite_log_s()))


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
