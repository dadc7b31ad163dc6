r"""The fused cross-entropy's per-block rule (the public function,
:func:`~softmax_jax.fused.linear_softmax_cross_entropy`, checks its arguments and calls the
engine in :mod:`.linear_cross_entropy_api`).

The per-row semantics (smoothing, z-loss, class weights, ignored and invalid labels, the
logit gradient and the hyper-parameter cotangents) are those of the core loss, from
:mod:`softmax_jax._cross_entropy_terms`; this rule only says how one block feeds them: the label's
logit :math:`z_y` and, under smoothing, :math:`\sum_c w_c z_c` are additive over blocks, so
with :math:`W = \sum_c w_c` (:math:`= V` unweighted)

.. math::
    \mathrm{nll} = \mathrm{lse} - z_y, \qquad
    \mathrm{uniform} = \frac{1}{V}\sum_c w_c(\mathrm{lse} - z_c)
                     = \frac{W}{V}\,\mathrm{lse} - \sum_c \frac{w_c z_c}{V},

each term scaled by :math:`1/V` before it is added, so that logits near the float range
(:math:`\pm 2 \times 10^{38}`) give the finite smoothing term the unfused losses give. Both
terms are handed over halved, as the shared module combines them.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from softmax_jax import _cross_entropy_terms as _ce

from . import interface


class Consts(NamedTuple):
    """The rule's constant inputs."""

    labels: jax.Array  # [N]
    w_y: jax.Array | None  # [N] the label's class weight (None unweighted)
    class_weights: jax.Array | None  # [V] (None unweighted)
    keep: jax.Array | None  # [N] the per-token where (None: every token)


class Params(NamedTuple):
    ce: _ce.Params
    weight_sum: jax.Array  # W, a derived constant (class weights carry no gradient)


class LabelTerms(NamedTuple):
    """Per token, the label terms of the cross-entropy from the finished statistics, halved
    as :mod:`softmax_jax._cross_entropy_terms` combines them (:func:`_ce.loss`)."""

    half_nll: jax.Array
    half_uniform: jax.Array | None  # None without smoothing
    lse: jax.Array
    w_y: jax.Array | None  # the label's class weight (None unweighted)


def label_hit(blk: interface.Block, labels: jax.Array) -> jax.Array:
    """``[tokens, width]``: is the column the token's label?"""
    loc = labels - jnp.asarray(blk.first_class).astype(labels.dtype)
    width = blk.logits[0].shape[1]
    return lax.broadcasted_iota(loc.dtype, (loc.shape[0], width), 1) == loc[:, None]


def label_logit(blk: interface.Block, z: jax.Array, labels: jax.Array) -> jax.Array:
    """``[tokens]``: each token's entry of the block ``z`` at its label's column, 0 where
    the label lies in another block (additive over blocks)."""
    # A gather of one entry per row: a where-and-sum over the block would be materialised
    # as a second block-sized array on CPU.
    loc = labels - jnp.asarray(blk.first_class).astype(labels.dtype)
    inside = (loc >= 0) & (loc < z.shape[1])
    picked = jnp.take_along_axis(z, jnp.clip(loc, 0, z.shape[1] - 1)[:, None], axis=1)
    return jnp.where(inside, picked[:, 0], 0.0)


@dataclasses.dataclass(frozen=True)
class Rule(interface.Rule):
    r"""The cross-entropy's per-block rule, on :class:`Consts`: its stream 0 is head 0's
    logits, its first sums :math:`z_y` and, under smoothing, :math:`\sum_c w_c z_c / V`."""

    options: _ce.Options
    num_classes: int  # global vocabulary size
    want_stats: bool

    def sizes(self) -> interface.Sizes:
        return interface.Sizes(1, 2 if self.options.smoothing else 1, 0)

    def heads(self, x: jax.Array, w: jax.Array, b: jax.Array | None,
              consts: Consts) -> tuple[interface.Head, ...]:
        return (interface.Head(x, w, b),)

    def differentiable_aux(self) -> bool:
        """The statistics' log-sum-exp takes a cotangent (:meth:`aux_weights`)."""
        return self.want_stats

    def aux_weights(self, r: jax.Array, g_aux: tuple[jax.Array, ...]) -> jax.Array:
        r"""``[N, 2]`` row weights: the loss's ``r`` and the log-sum-exp's cotangent
        (:math:`\partial\,\mathrm{lse}/\partial z = a`, added in :meth:`dlogits`)."""
        return jnp.stack([r, g_aux[0].astype(r.dtype)], axis=1)

    def rows(self, consts: Consts) -> tuple[jax.Array, ...]:
        if consts.w_y is None:
            return (consts.labels,)
        return consts.labels, consts.w_y

    def classes(self, consts: Consts) -> tuple[jax.Array, ...]:
        return () if consts.class_weights is None else (consts.class_weights,)

    def scale(self, consts: Consts, num_classes: int | jax.Array, ct: np.dtype) -> jax.Array:
        return _ce.row_scale(consts.labels, num_classes, self.options.ignore_index,
                             consts.keep, ct)[0]

    def denominator(self, consts: Consts, scale: jax.Array) -> jax.Array:
        w_y = consts.w_y
        if w_y is None:
            return jnp.sum(scale != 0).astype(scale.dtype)
        return jnp.sum(_ce.times(scale, w_y.astype(scale.dtype)))

    def valid(self, params: interface.Tree) -> jax.Array:
        """Whether the traced hyper-parameters ``params.ce`` are in range
        (:func:`_ce.hyperparameters` turned those that are not into NaN); another rule's
        params with a ``ce`` field do too."""
        return ~(jnp.isnan(params.ce.eps) | jnp.isnan(params.ce.lam))

    def streams(self, blk: interface.Block, params: Params | None) -> tuple[jax.Array, ...]:
        return (blk.logits[0],)

    def first_sums(self, blk: interface.Block,
                   params: Params | None) -> tuple[jax.Array, ...]:
        z = blk.logits[0]
        z_y = label_logit(blk, z, blk.rows[0])
        if not self.options.smoothing:
            return (z_y,)
        zw = z if not blk.classes else _ce.times(blk.classes[0].astype(z.dtype), z)
        # Each term divided by V before the sum, so that the sum of logits near the float
        # range cannot overflow where the smoothing term itself is finite.
        return z_y, jnp.sum(zw * (1.0 / self.num_classes), axis=1)

    def row_loss(self, consts: Consts, scale: jax.Array, stats: interface.RowStats,
                 params: Params) -> jax.Array:
        half_nll, half_uniform, lse, w_y = label_terms(self, stats, consts.w_y,
                                                       params.weight_sum)
        return _ce.loss(half_nll, half_uniform, lse, scale, w_y, params.ce, self.options)

    def dlogits(self, blk: interface.Block, stats: interface.RowStats, r: jax.Array,
                params: Params) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        if r.ndim == 2:  # the loss's weights and the log-sum-exp's cotangent
            dz, sums = self.dlogits(blk, stats, r[:, 0], params)
            return dz + stats.norms[0].scaled_prob(blk.logits[0], r[:, 1:]), sums
        z, norm = blk.logits[0], stats.norms[0]
        w_y = blk.rows[1] if self.options.weighted else None
        a = norm.prob(z)
        coef = _ce.prob_coefficient(norm.lse()[:, 0], w_y, params.weight_sum,
                                    self.num_classes, params.ce, self.options)
        if coef is not None:
            a = _ce.times(a, coef[:, None])
        w_blk = blk.classes[0].astype(z.dtype) if blk.classes else None
        off = _ce.class_offset(w_blk, self.num_classes, params.ce, self.options)
        grad = a if off is None else a - off
        on_label = jnp.broadcast_to(_ce.label_coefficient(w_y, params.ce, self.options),
                                    r.shape)[:, None]
        grad = grad - jnp.where(label_hit(blk, blk.rows[0]), on_label, 0.0)
        return _ce.times(r[:, None], grad), ()

    def cotangents(self, consts: Consts, scale: jax.Array, stats: interface.RowStats,
                   row_sums: tuple[jax.Array, ...], r: jax.Array, params: Params) -> Params:
        r = r if r.ndim == 1 else r[:, 0]  # the log-sum-exp's cotangent has no share here
        half_nll, half_uniform, lse, w_y = label_terms(self, stats, consts.w_y,
                                                       params.weight_sum)
        d_ce = _ce.hyper_cotangents(r, half_nll, half_uniform, lse, w_y, params.ce,
                                    self.options)
        return Params(d_ce, jnp.zeros_like(params.weight_sum))

    def aux(self, stats: interface.RowStats) -> tuple[jax.Array, ...]:
        if not self.want_stats:
            return ()
        assert stats.argmax is not None
        return stats.norms[0].lse()[:, 0], stats.argmax


def label_terms(rule: Rule, stats: interface.RowStats, w_y: jax.Array | None = None,
                weight_sum: jax.Array | None = None) -> LabelTerms:
    """The label terms of ``rule`` per token, from statistics whose stream 0 and first sums
    are ``rule``'s (another rule passes its own statistics with those in front); ``w_y``
    the label's class weight and ``weight_sum`` :math:`W`, both needed only with class
    weights."""
    norm = stats.norms[0]
    lse = norm.lse()[:, 0]
    half_nll = _ce.half_neg_log_prob(stats.first[0][:, None], norm.m, norm.log_s)[:, 0]
    half_uniform = None
    if rule.options.smoothing:
        total = stats.first[1]
        w_all = weight_sum if rule.options.weighted else jnp.asarray(
            rule.num_classes, lse.dtype)
        assert w_all is not None
        # ((W / V) lse - sum_c w_c z_c / V) / 2: scaled before the difference (W lse
        # alone overflows at lse = 2e38), as the unfused losses' half_uniform is.
        half_uniform = jnp.where(
            total == -jnp.inf, jnp.inf,
            _ce.times(w_all / rule.num_classes, 0.5 * lse) - 0.5 * total)
    return LabelTerms(half_nll, half_uniform, lse,
                      None if w_y is None else w_y.astype(lse.dtype))
