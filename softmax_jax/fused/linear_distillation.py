r"""The fused distillation: its per-block rule and :func:`linear_softmax_distillation`.

The per-element and per-row divergence terms come from :mod:`softmax_jax._distillation_terms`
(shared with :func:`softmax_jax.distillation_loss`), the hard-label part from the fused
cross-entropy's rule. With :math:`s = z_s/T` and :math:`t = z_t/T` the engine keeps the
online normalisers of both (and of :math:`z_s` itself when the hard-label term is on). For
the generalised JSD a second pass over the blocks, with both normalisers known, adds up each
row's :math:`K_P = \mathrm{KL}(P\|M)` and :math:`K_Q = \mathrm{KL}(Q\|M)`; for the two KL
cases the first pass keeps the KL itself online, as the expectation of the centred
log-ratio :math:`(t - m_t) - (s - m_s)` against the running maxima, so it needs no second
pass and keeps float32 accuracy however far apart the two heads' logits are
(:math:`E_P[t - s] - (\mathrm{lse}\,t - \mathrm{lse}\,s)` would cancel). The gradient
pass then gives the student's logit gradient

.. math::
    \frac{\partial\ell}{\partial z_s} = h\,\delta_{\mathrm{CE}}
        + (1 - h)\,T\,\frac{\partial D}{\partial s},

and the row sums the temperature's cotangent needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from softmax_jax import _cross_entropy_terms as _ce
from softmax_jax import _distillation_terms as _dt
from softmax_jax import _validation as _v

from . import args, auto, blocks, interface, vjp, vma
from . import linear_cross_entropy as _fce
from .layout import BlockLayout

__all__ = ["linear_softmax_distillation"]


class Params(NamedTuple):
    temperature: jax.Array
    beta: jax.Array
    hard_weight: jax.Array
    ce: _ce.Params


class Consts(NamedTuple):
    """The rule's constant inputs: the labels and the teacher's head."""

    labels: jax.Array | None  # [N]; None when neither the hard term nor ignore_index is used
    teacher_x: jax.Array  # [N, D_t]
    teacher_w: jax.Array  # [D_t, V]
    teacher_b: jax.Array | None  # [V]
    keep: jax.Array | None  # [N] the per-token where (None: every token)


@dataclasses.dataclass(frozen=True)
class Rule(interface.Rule):
    """The distillation's per-block rule, on :class:`Consts`. Streams: the student's and the
    teacher's logits over :math:`T`, and with the hard term the student's logits (the
    cross-entropy rule's stream 0)."""

    kind: _dt.Kind
    hard: bool  # the hard-label term is on (hard_weight traced or nonzero)
    ce: _fce.Rule  # the hard-label rule (its streams are stream 2 here)
    # The temperature is traced, so its cotangent may be used. A constant temperature
    # skips the per-element temperature term of the gradient pass (its cotangent is 0).
    temperature_grad: bool = True

    def _one_pass(self) -> bool:
        r"""Forward and reverse KL need no second pass: the engine keeps them online
        (:func:`~softmax_jax.fused.blocks.log_ratio_step`)."""
        return self.kind in ("forward", "reverse")

    def sizes(self) -> interface.Sizes:
        n_first = (self.ce.sizes().first if self.hard else 0) + (1 if self._one_pass() else 0)
        return interface.Sizes(3 if self.hard else 2, n_first, 0 if self._one_pass() else 2)

    def expectation_streams(self) -> tuple[tuple[int, int], ...]:
        if not self._one_pass():
            return ()
        return ((1, 0),) if self.kind == "forward" else ((0, 1),)

    def grad_sizes(self) -> int:
        return 1

    def heads(self, x: jax.Array, w: jax.Array, b: jax.Array | None,
              consts: Consts) -> tuple[interface.Head, ...]:
        teacher = interface.Head(consts.teacher_x, consts.teacher_w, consts.teacher_b)
        return interface.Head(x, w, b), teacher

    def rows(self, consts: Consts) -> tuple[jax.Array, ...]:
        return () if consts.labels is None else (consts.labels,)

    def scale(self, consts: Consts, num_classes: int | jax.Array, ct: np.dtype) -> jax.Array:
        labels, keep = consts.labels, consts.keep
        if labels is None:
            return jnp.ones(consts.teacher_x.shape[:1], ct) if keep is None else keep.astype(ct)
        return self.ce.scale(_fce.Consts(labels, None, None, keep), num_classes, ct)

    def valid(self, params: Params) -> jax.Array:
        r"""Whether the traced hyper-parameters are in range: the unfused loss's check of
        :math:`T` and :math:`\beta` (:func:`_dt.valid_hyperparameters`), and the NaN that the
        shared validation puts in for the others."""
        ok = _dt.valid_hyperparameters(params.temperature, params.beta)
        return ok & ~jnp.isnan(params.hard_weight) & self.ce.valid(params)

    def streams(self, blk: interface.Block, params: Params) -> tuple[jax.Array, ...]:
        z, t = blk.logits
        out = (z / params.temperature, t / params.temperature)
        return out + (z,) if self.hard else out

    def _ce_view(self, blk, stats):
        """The block and statistics as the cross-entropy rule sees them."""
        sub_blk = blk._replace(logits=blk.logits[:1], classes=())
        sub_stats = None if stats is None else stats._replace(norms=stats.norms[2:])
        return sub_blk, sub_stats

    def first_sums(self, blk: interface.Block, params: Params) -> tuple[jax.Array, ...]:
        if not self.hard:
            return ()
        return self.ce.first_sums(self._ce_view(blk, None)[0], None)

    def _logs(self, blk, stats, params):
        """``(log_q, log_p, log_m)`` of a block."""
        z, t = blk.logits
        log_q = stats.norms[0].log_prob(z / params.temperature)
        log_p = stats.norms[1].log_prob(t / params.temperature)
        return log_q, log_p, _dt.log_mixture(log_p, log_q, params.beta, self.kind)

    def second_sums(self, blk: interface.Block, stats: interface.RowStats,
                    params: Params) -> tuple[jax.Array, ...]:
        log_q, log_p, log_m = self._logs(blk, stats, params)
        rows = _dt.RowSums.of(_dt.element_terms(log_p, log_q, log_m, self.kind), axis=1)
        return rows.kl_p[:, 0], rows.kl_q[:, 0]

    def _row_sums(self, stats) -> _dt.RowSums:
        """Per row :math:`(K_P, K_Q)`, from the second pass or the online expectation."""
        if not self._one_pass():
            return _dt.RowSums(*stats.second)
        kl = stats.first[-1]
        if self.kind == "forward":
            return _dt.RowSums(kl, jnp.zeros_like(kl))
        return _dt.RowSums(jnp.zeros_like(kl), kl)

    def _parts(self, consts, stats, params):
        """Per row: ``(divergence D, CE terms, CE loss)``, the last two None without the
        hard term."""
        div = _dt.divergence(self._row_sums(stats), params.beta, self.kind)
        if not self.hard:
            return div, None, None
        terms = _fce.label_terms(self.ce, stats._replace(norms=stats.norms[2:]))
        ce = _ce.loss(terms.half_nll, terms.half_uniform, terms.lse, jnp.ones_like(terms.lse),
                      None, params.ce, self.ce.options)
        return div, terms, ce

    def row_loss(self, consts: Consts, scale: jax.Array, stats: interface.RowStats,
                 params: Params) -> jax.Array:
        div, _, ce = self._parts(consts, stats, params)
        loss = _dt.times(jnp.square(params.temperature), div)
        if ce is not None:
            loss = _ce.times(params.hard_weight, ce) + _ce.times(1.0 - params.hard_weight, loss)
        return _ce.times(scale, loss)

    def dlogits(self, blk: interface.Block, stats: interface.RowStats, r: jax.Array,
                params: Params) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        temp, beta = params.temperature, params.beta
        log_q, log_p, log_m = self._logs(blk, stats, params)
        rows = _dt.RowSums(*(a[:, None] for a in self._row_sums(stats)))
        ds = _dt.student_grad(log_p, log_q, log_m, rows, beta, self.kind)
        t_sum = jnp.zeros(ds.shape[:1], ds.dtype)
        if self.temperature_grad:
            dt = _dt.teacher_grad(log_p, log_q, log_m, rows, beta, self.kind)
            t_sum = jnp.sum(_dt.temperature_term(ds, log_q, dt, log_p), axis=1)
        dz = temp * ds
        if self.hard:
            sub_blk, sub_stats = self._ce_view(blk, stats)
            sub_params = _fce.Params(params.ce, jnp.zeros((), r.dtype))
            dce, _ = self.ce.dlogits(sub_blk, sub_stats, jnp.ones_like(r), sub_params)
            dz = _ce.times(params.hard_weight, dce) + _ce.times(1.0 - params.hard_weight, dz)
        return _ce.times(r[:, None], dz), (t_sum,)

    def cotangents(self, consts: Consts, scale: jax.Array, stats: interface.RowStats,
                   row_sums: tuple[jax.Array, ...], r: jax.Array, params: Params) -> Params:
        temp, beta, hw = params.temperature, params.beta, params.hard_weight
        div, terms, ce = self._parts(consts, stats, params)
        soft = 1.0 - hw if self.hard else jnp.ones((), r.dtype)
        r_soft = _ce.times(r, soft)
        d_temp = (_dt.temperature_cotangent(temp, div, row_sums[0]) if self.temperature_grad
                  else jnp.zeros_like(div))
        d_beta = _dt.beta_cotangent(temp, self._row_sums(stats), beta, self.kind)
        d_hw = jnp.zeros((), r.dtype)
        d_ce = _ce.Params(jnp.zeros((), r.dtype), jnp.zeros((), r.dtype))
        if terms is not None and ce is not None:
            half_nll, half_uniform, lse, _ = terms
            d_hw = jnp.sum(_ce.times(r, ce - _dt.times(jnp.square(temp), div)))
            d_ce = _ce.hyper_cotangents(_ce.times(r, hw), half_nll, half_uniform, lse, None,
                                        params.ce, self.ce.options)
        return Params(jnp.sum(_ce.times(r_soft, d_temp)), jnp.sum(_ce.times(r_soft, d_beta)),
                      d_hw, d_ce)


def linear_softmax_distillation(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    teacher_x: jax.typing.ArrayLike,
    teacher_w: jax.typing.ArrayLike,
    *,
    labels: jax.typing.ArrayLike | None = None,
    b: jax.typing.ArrayLike | None = None,
    teacher_b: jax.typing.ArrayLike | None = None,
    temperature: float | jax.typing.ArrayLike = 1.0,
    beta: float | jax.typing.ArrayLike = 0.0,
    hard_weight: float | jax.typing.ArrayLike = 0.0,
    reduction: str = "mean",
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    axis_name: Hashable | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
) -> jax.Array:
    r"""Knowledge distillation from a teacher's linear head, without materialising logits.

    With student logits :math:`z_s = x W + b` and teacher logits :math:`z_t = x_t W_t +
    b_t` (the teacher's width :math:`D_t` may differ from the student's), per token

    .. math::
        \ell = h\,\mathrm{CE}(z_s, y) + (1 - h)\,T^2 D\big(P(z_t/T), Q(z_s/T)\big),

    where :math:`D` is :math:`\mathrm{KL}(P\|Q)` at :math:`\beta = 0`,
    :math:`\mathrm{KL}(Q\|P)` at :math:`\beta = 1` and the generalised JSD
    :math:`\beta\,\mathrm{KL}(P\|M) + (1 - \beta)\,\mathrm{KL}(Q\|M)`,
    :math:`M = \beta P + (1 - \beta) Q`, in between: exactly
    ``h * softmax_cross_entropy_with_integer_labels(z_s, y, label_smoothing=eps) + (1 - h) *
    distillation_loss(z_s, z_t, temperature=T, beta=beta)``. The student's logit gradient is
    :math:`h\,\delta_{\mathrm{CE}} + (1 - h)\,T\,\partial D/\partial s` (forward KL:
    :math:`T(q - p)`, the notes' :math:`a - y` against the teacher's soft targets), and
    :math:`\bar x = \delta W^\top`, :math:`\bar W = x^\top\delta`, :math:`\bar b = \sum_i
    \delta_i`. The derivatives with respect to ``temperature``, ``beta`` (NaN at 0 and 1,
    where the loss jumps), ``hard_weight`` and ``label_smoothing`` are exact.

    With ``beta=1.0, reduction="none"`` this is the fused full-distribution KL
    :math:`\mathrm{KL}(Q \| P)` per token of the student's distribution to the teacher's:
    the KL penalty of RL post-training to a frozen reference policy (the policy as the
    student, the reference as the teacher), where
    :func:`~softmax_jax.fused.linear_log_probs` gives the sampled tokens' k3 estimate.

    The teacher's arguments are constants: their cotangents are zero (wrap them in
    ``jax.lax.stop_gradient`` to say so in your own code; to train the teacher, use the
    unfused :func:`softmax_jax.distillation_loss`).

    Args:
      x: ``[N, D]`` student hidden states, or ``[..., D]`` with any leading token axes
        (``[B, T, D]``). w: ``[D, V]`` student weights (this device's vocabulary slice
        under ``axis_name``).
      teacher_x: ``[..., D_t]`` teacher hidden states of ``x``'s leading shape. teacher_w:
        ``[D_t, V]`` teacher weights (sharded like ``w``).
      labels: integer labels of ``x``'s leading shape; required when ``hard_weight`` is
        nonzero (or traced) or ``ignore_index`` is given.
      b, teacher_b: optional ``[V]`` biases (vocabulary slices under ``axis_name``).
      temperature: :math:`T > 0`. beta: :math:`\beta \in [0, 1]`. hard_weight:
        :math:`h \in [0, 1]`, weight of the hard-label cross-entropy.
      reduction: ``"mean"`` (over kept tokens; 0 when none is), ``"sum"`` or ``"none"``
        (``x``'s leading shape).
      ignore_index: a label value whose tokens get loss 0 and gradient 0 and are left out
        of the mean; checked against the labels' own dtype.
      where: optional boolean mask of ``x``'s leading shape, or one that broadcasts to it
        (NumPy broadcasting), one flag per token, as for
        :func:`~softmax_jax.fused.linear_softmax_cross_entropy`: a token whose flag is False
        is an ignored one (loss 0, gradient 0, left out of the mean), with or without
        ``labels``.
      label_smoothing: :math:`\epsilon \in [0, 1]` of the hard-label term.
      axis_name, token_block, vocab_block: as for
        :func:`~softmax_jax.fused.linear_softmax_cross_entropy`.

    Returns:
      ``"mean"``/``"sum"``: a scalar in the compute dtype (float32 for bfloat16, float16
      and float32 inputs, float64 for float64 ones under x64); ``"none"``: ``x``'s leading
      shape, in the same compute dtype. A teacher class with probability where the student has
      none makes the loss infinite (its true value); a traced out-of-range hyper-parameter
      gives NaN for the loss and every derivative.

    Raises:
      TypeError, ValueError: bad dtypes or shapes, hyper-parameters out of range, missing
        ``labels``, bad block sizes, or a vocabulary-sharded ``w`` without ``axis_name``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[2.0, 3.0, 4.0], [1.0, 1.0, 1.0]])
      >>> tx = jnp.array([[1.0], [2.0]])
      >>> tw = jnp.array([[1.0, 0.0, -1.0]])
      >>> print(sj.linear_softmax_distillation(x, w, tx, tw, temperature=2.0, reduction="none"))
      [1.2806 1.0649]
      >>> print(sj.distillation_loss(x @ w, tx @ tw, temperature=2.0))
      [1.2806 1.0649]
    """
    if axis_name is None:  # jit with sharded inputs: the axis_name path, laid out for you
        routed = auto.fused_call(
            linear_softmax_distillation,
            {"x": ("tokens", x), "w": ("weights", w), "teacher_x": ("tokens", teacher_x),
             "teacher_w": ("weights", teacher_w), "labels": ("rows", labels),
             "b": ("classes", b), "teacher_b": ("classes", teacher_b),
             "where": ("rows", _v.where_like(where, jnp.shape(x)[:-1]))},
            reduction, temperature=temperature, beta=beta, hard_weight=hard_weight,
            ignore_index=ignore_index, label_smoothing=label_smoothing,
            token_block=token_block, vocab_block=vocab_block)
        if routed is not None:
            return routed
    x, w, b, lead = args.head(x, w, b)
    tx, tw, tb, teacher_lead = args.head(teacher_x, teacher_w, teacher_b, "teacher_")
    args.tokens_like("teacher_x.shape[:-1]", teacher_lead, lead)
    n, v = x.shape[0], w.shape[1]
    if tw.shape[1] != v:
        raise ValueError(
            f"teacher_w must have V = {v} columns (this device's vocabulary), got"
            f" teacher_w.shape={tuple(tw.shape)}")
    reduction = args.reduction(reduction)
    temp, beta_arr, kind = _dt.hyperparameters(temperature, beta)
    hw, hard = _v.hyperparameter("hard_weight", hard_weight, 0.0, 1.0)
    label_arr = None
    if labels is not None:
        widened, ignore_index = _ce.labels_and_ignore(labels, ignore_index)
        label_arr = args.labels_for(widened, lead)
    ce_params, ce_options = _ce.hyperparameters(label_smoothing, 0.0, ignore_index, False)
    ignore = ce_options.ignore_index
    if labels is None and (hard or ignore is not None):
        raise ValueError("labels are required when hard_weight is nonzero (or traced) or"
                         f" ignore_index is given (hard_weight={hard_weight!r},"
                         f" ignore_index={ignore_index!r})")
    vma.check_vocab_axes(axis_name, x, {"w": w, "b": b, "teacher_w": tw, "teacher_b": tb})
    layout = BlockLayout.resolve(n, max(x.shape[1], tx.shape[1]), v,
                                 min(w.dtype.itemsize, tw.dtype.itemsize), token_block,
                                 vocab_block, heads=2, per_token=reduction == "none")
    ct = args.compute_dtype(x, w, tx, tw)
    ce_options = ce_options._replace(smoothing=hard and ce_options.smoothing)
    ce_rule = _fce.Rule(ce_options, blocks.num_classes(v, axis_name), False)
    rule = Rule(kind, hard, ce_rule, isinstance(temperature, jax.core.Tracer))
    static = args.static(rule, axis_name, layout, False, reduction, False, x, w, b)
    params = Params(temp.astype(ct), beta_arr.astype(ct), hw.astype(ct), ce_params.astype(ct))
    keep = _v.token_where(where, lead)
    consts = Consts(label_arr, lax.stop_gradient(tx), lax.stop_gradient(tw),
                    None if tb is None else lax.stop_gradient(tb), keep)
    loss, _ = vjp.dispatch(static, x, w, b, consts, params, jnp.ones((), ct))
    return loss.reshape(lead) if reduction == "none" else loss
