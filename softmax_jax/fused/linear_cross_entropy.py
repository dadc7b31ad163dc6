r"""The fused cross-entropy: its per-block rule and :func:`linear_softmax_cross_entropy`.

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
from collections.abc import Hashable
from typing import Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from softmax_jax import _cross_entropy_terms as _ce
from softmax_jax import _validation as _v

from . import args, auto, blocks, interface, vjp, vma
from .layout import BlockLayout

__all__ = ["FusedStats", "linear_softmax_cross_entropy"]

# labels [N], the label's class weight w_y [N] and the class weights [V] (both None unweighted)
Consts = tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]


class FusedStats(NamedTuple):
    r"""Per-token statistics from the loss's own pass.

    Attributes:
      lse: ``[N]`` log-sum-exp of each token's (soft-capped) logits over the global
        vocabulary, in the compute dtype (float32; float64 for float64 inputs).
        Differentiable: its cotangent :math:`\bar g` adds :math:`\bar g\,a` (the softmax)
        to the logit gradient in the loss's own backward pass, so a loss built on it, such
        as the selective log-softmax ``z_y - lse``, has its true gradient.
      argmax: ``[N]`` int32 predicted class (global id; the first of equal maxima; no
        gradient).
    """

    lse: jax.Array
    argmax: jax.Array


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
    r"""The cross-entropy's per-block rule. consts: ``(labels, w_y, class_weights, keep)``
    (``keep``: the per-token ``where``, or None); its
    stream 0 is head 0's logits, its first sums :math:`z_y` and, under smoothing,
    :math:`\sum_c w_c z_c / V`."""

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
        labels, w_y = consts[:2]
        return (labels,) if w_y is None else (labels, w_y)

    def classes(self, consts: Consts) -> tuple[jax.Array, ...]:
        return () if consts[2] is None else (consts[2],)

    def scale(self, consts: Consts, num_classes: int | jax.Array, ct: np.dtype) -> jax.Array:
        return _ce.row_scale(consts[0], num_classes, self.options.ignore_index, consts[3],
                             ct)[0]

    def denominator(self, consts: Consts, scale: jax.Array) -> jax.Array:
        w_y = consts[1]
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
        half_nll, half_uniform, lse, w_y = label_terms(self, stats, consts[1],
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
        half_nll, half_uniform, lse, w_y = label_terms(self, stats, consts[1],
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


@overload
def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    soft_cap: float | jax.typing.ArrayLike | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    return_stats: Literal[False] = False,
    axis_name: Hashable | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
) -> jax.Array: ...


@overload
def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    soft_cap: float | jax.typing.ArrayLike | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    return_stats: Literal[True],
    axis_name: Hashable | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
) -> tuple[jax.Array, FusedStats]: ...


def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    soft_cap: float | jax.typing.ArrayLike | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    return_stats: bool = False,
    axis_name: Hashable | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
) -> jax.Array | tuple[jax.Array, FusedStats]:
    r"""Softmax cross-entropy of a linear layer's logits, without materialising the logits.

    With logits :math:`z = x W + b` (capped to :math:`\mathrm{cap}\,\tanh(z/\mathrm{cap})`
    when ``soft_cap`` is set) and class weights :math:`w_c` (1 without ``class_weights``),
    per token

    .. math::
        \ell = (1 - \epsilon)\,w_y\,(\mathrm{lse}(z) - z_y)
             + \frac{\epsilon}{V} \sum_{c=1}^{V} w_c\,(\mathrm{lse}(z) - z_c)
             + \lambda\,\mathrm{lse}(z)^2 ,

    exactly :func:`softmax_jax.softmax_cross_entropy_with_integer_labels` applied to
    ``x @ w + b``, with :math:`V` the full (global) vocabulary. The gradients follow the
    notes' output-layer rules with
    :math:`\delta = \partial\ell/\partial z = c\,a - (1 - \epsilon)\,w_y\,
    \mathrm{onehot}(y) - \epsilon w/V`, :math:`c = (1 - \epsilon) w_y + \epsilon W/V +
    2\lambda\,\mathrm{lse}` (:math:`a - y` unweighted without smoothing or z-loss; times
    :math:`1 - \tanh^2(z/\mathrm{cap})` under a soft cap):

    .. math::
        \frac{\partial\ell}{\partial x} = \delta W^\top, \qquad
        \frac{\partial\ell}{\partial W} = x^\top \delta, \qquad
        \frac{\partial\ell}{\partial b} = \textstyle\sum_i \delta_i .

    The derivatives with respect to ``label_smoothing``, ``z_loss`` and ``soft_cap`` are
    exact too; ``class_weights`` are constants: their cotangent is 0, unlike the core
    losses' (use :func:`softmax_jax.softmax_cross_entropy_with_integer_labels` to learn
    them). Only
    ``token_block x vocab_block`` logits exist at any time (:mod:`softmax_jax.fused.engine`).
    Reverse mode only: ``jax.jvp`` of the loss raises.

    Args:
      x: ``[N, D]`` floating-point inputs of the output layer (hidden states), or
        ``[..., D]`` with any leading token axes (``[B, T, D]``, as a language model hands
        them over; flattened inside, so the gradient comes back in ``x``'s shape).
      w: ``[D, V]`` weights (the ``x @ w`` convention of JAX dense layers); under
        ``axis_name``, this device's ``[D, V / shards]`` slice of the vocabulary.
      labels: integer class ids in ``[0, V)`` of ``x``'s leading shape (``[N]``,
        ``[B, T]``; global ids under ``axis_name``).
      b: optional ``[V]`` bias (this device's slice under ``axis_name``).
      reduction: ``"mean"`` (over the tokens that are not ignored, or, with class weights,
        divided by their summed label weights as PyTorch does, so NaN, as in PyTorch, when
        the kept tokens' label weights add up to 0; 0 when no token is kept, where PyTorch
        gives NaN), ``"sum"`` or ``"none"`` (per-token losses, ``x``'s leading shape).
      ignore_index: a label value (e.g. ``-100``, a Python or NumPy int) whose tokens get
        loss 0 and gradient 0 and are left out of the mean; checked against the labels' own
        dtype (``uint8`` labels with ``-100`` raise).
      where: optional boolean mask of ``x``'s leading shape, or one that broadcasts to it
        (NumPy broadcasting: ``[T]`` for the same positions of every sequence, ``[B, 1]``
        for whole sequences), one flag per token: a token whose flag is False is an ignored
        one (loss 0, gradient 0, left out of the mean), whatever its label holds. Another
        dtype raises ``TypeError``, another shape ``ValueError``.
      label_smoothing: :math:`\epsilon \in [0, 1]`, PyTorch's convention, over the global
        vocabulary.
      z_loss: finite :math:`\lambda \ge 0`, weight of the :math:`\mathrm{lse}^2` penalty.
      soft_cap: optional :math:`\mathrm{cap} > 0` for Gemma-style logit soft-capping;
        ``float("inf")`` means no cap.
      class_weights: optional ``[V]`` float weights, PyTorch's ``weight`` (this device's
        slice under ``axis_name``); treated as constants.
      return_stats: also return :class:`FusedStats` (per-token log-sum-exp and argmax) from
        the same pass; the log-sum-exp is differentiable (its gradient joins the loss's
        backward pass).
      axis_name: the ``shard_map`` mesh axis (or tuple of axes) over which ``w``, ``b`` and
        ``class_weights`` are sharded along the vocabulary (``check_vma=True``, the default,
        is required); None when the vocabulary is not sharded. ``labels`` stay global ids;
        any other mesh axis (a data axis) is left alone, so ``"mean"`` is over this device's
        tokens.
      token_block, vocab_block: block sizes; by default
        :meth:`softmax_jax.fused.BlockLayout.default`. ``vocab_block >= V`` holds whole rows
        (three matrix products); smaller recomputes each block in the gradient pass.

    Returns:
      The loss: for ``"mean"``/``"sum"`` a scalar in the compute dtype, float32 for
      bfloat16, float16 and float32 inputs and float64 for float64 ones (under x64, as
      optax's loss of float32 inputs stays float32), accumulated in it; for ``"none"``
      per-token losses of ``x``'s leading shape, in the same compute dtype (float32 for
      bfloat16 inputs: they are weighted and summed downstream). With ``return_stats``,
      ``(loss, stats)`` (``stats`` of ``x``'s leading shape). A label outside ``[0, V)``
      that is not ``ignore_index`` gives NaN for its token (and, for ``"none"``, NaN
      gradients where its cotangent is non-zero, exactly 0 where it is 0), a traced
      hyper-parameter out of range NaN for the loss and every derivative. Gradients come
      back in each input's dtype, accumulated in float32 (at least); with mixed dtypes
      (float32 ``x``, bfloat16 ``w``) the wider input's gradient keeps its own dtype's accuracy.

    Raises:
      TypeError: non-floating ``x``/``w``/``b``/``class_weights`` or non-integer ``labels``.
      ValueError: inconsistent shapes, an unknown ``reduction``, a hyper-parameter out of
        range, bad block sizes, or a vocabulary-sharded ``w`` inside ``shard_map`` without
        ``axis_name``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> from softmax_jax.fused import linear_softmax_cross_entropy
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[2.0, 3.0, 4.0], [1.0, 1.0, 1.0]])  # logits x @ w: the notes' rows
      >>> labels = jnp.array([1, 0])
      >>> print(linear_softmax_cross_entropy(x, w, labels, reduction="none"))
      [1.4076 1.0986]
      >>> print(sj.softmax_cross_entropy_with_integer_labels(x @ w, labels))
      [1.4076 1.0986]
      >>> print(jax.grad(linear_softmax_cross_entropy, argnums=1)(x, w, labels))  # x^T (a - y) / N
      [[ 0.0450 -0.3776  0.3326]
       [-0.3333  0.1667  0.1667]]
      >>> loss, stats = linear_softmax_cross_entropy(x, w, labels, return_stats=True)
      >>> print(stats.lse, stats.argmax)
      [4.4076 2.0986] [2 0]
    """
    if axis_name is None:  # jit with sharded inputs: the axis_name path, laid out for you
        routed = auto.fused_call(
            linear_softmax_cross_entropy,
            {"x": ("tokens", x), "w": ("weights", w), "labels": ("rows", labels),
             "b": ("classes", b), "class_weights": ("classes", class_weights),
             "where": ("rows", _v.where_like(where, jnp.shape(x)[:-1]))},
            reduction, (lambda r: FusedStats(r, r)) if return_stats else None,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            soft_cap=soft_cap, return_stats=return_stats, token_block=token_block,
            vocab_block=vocab_block)
        if routed is not None:
            return routed
    x, w, b, lead = args.head(x, w, b)
    label_arr, ignore_index = _ce.labels_and_ignore(labels, ignore_index)
    labels = args.labels_for(label_arr, lead)
    n, v = x.shape[0], w.shape[1]
    reduction = args.reduction(reduction)
    weights = _ce.check_class_weights(class_weights, v)
    params, options = _ce.hyperparameters(
        label_smoothing, z_loss, ignore_index, weights is not None)
    cap, capped = args.soft_cap(soft_cap)
    vma.check_vocab_axes(axis_name, x, {"w": w, "b": b, "class_weights": weights})
    layout = BlockLayout.resolve(n, x.shape[1], v, w.dtype.itemsize, token_block, vocab_block)
    ct = args.compute_dtype(x, w)
    w_y = weight_sum = None
    if weights is not None:
        weights = lax.stop_gradient(weights)
        w_y = args.local_gather(weights.astype(ct), labels, axis_name)
        weight_sum = jnp.sum(weights.astype(ct))
        if axis_name is not None:
            weight_sum = lax.psum(weight_sum, axis_name)
    rule = Rule(options, blocks.num_classes(v, axis_name), bool(return_stats))
    static = args.static(rule, axis_name, layout, capped, reduction, bool(return_stats), x, w, b)
    full = Params(params.astype(ct), jnp.zeros((), ct) if weight_sum is None else weight_sum)
    keep = _v.token_where(where, lead)
    loss, aux = vjp.dispatch(static, x, w, b, (labels, w_y, weights, keep), full,
                             cap.astype(ct))
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_stats:
        return loss
    lse, argmax = aux
    return loss, FusedStats(lse.reshape(lead), argmax.reshape(lead))
