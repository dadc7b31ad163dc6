r"""Per-token log-probabilities and entropies of a linear head: its per-block rule and
:func:`linear_log_probs`.

With :math:`z = c / T`, :math:`c` the (soft-capped) logits of ``x @ w + b`` and :math:`T`
the temperature, per token

.. math::
    \log p_y = z_y - \mathrm{lse}(z), \qquad H = \mathrm{lse}(z) - \sum_j p_j z_j .

One pass over the vocabulary gives both: the online log-sum-exp of :math:`z`, the gathered
:math:`z_y`, and the online expectation of :math:`z` that the engine keeps for a KL
(:func:`~softmax_jax.fused.blocks.log_ratio_step`), here against a constant stream (a
``[tokens, 1]`` block of zeros, whose normaliser :math:`S_0` counts the blocks): the engine
hands back :math:`\mathrm{KL} = E_p[z - m] - \log S + \log S_0` with both streams centred,
so :math:`H = \log S_0 - \mathrm{KL}` has no cancellation against :math:`\log V`.

The gradient pass recomputes each block once and, for the cotangents :math:`\bar g` of
:math:`\log p_y` and :math:`\bar h` of :math:`H`, forms

.. math::
    \frac{\partial\ell}{\partial c} = \frac{1}{T}\Big(\bar g\,(\mathrm{onehot}(y) - p)
        - \bar h\,p\,(\log p + H)\Big),

from :math:`\partial \log p_y/\partial z = \mathrm{onehot}(y) - p` and
:math:`\partial H/\partial z = -p(\log p + H)` (:func:`softmax_jax.softmax_entropy`). Both
sum to 0 over the row, so the temperature's cotangent, :math:`-\frac{1}{T}\sum_j
\frac{\partial\ell}{\partial z_j} z_j`, is formed with :math:`\log p_j` in place of
:math:`z_j` (the same sum, of the size of the logits' spread).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax import _cross_entropy_terms as _ce
from softmax_jax import _distillation_terms as _dt
from softmax_jax import _validation as _v

from . import args, auto, blocks, interface, vjp, vma
from .layout import BlockLayout
from .linear_cross_entropy import label_hit, label_logit

__all__ = ["linear_log_probs"]


class Params(NamedTuple):
    temperature: jax.Array


# token ids [N] and the ``where`` mask [N] (None: every token counts)
Consts = tuple[jax.Array, jax.Array | None]


@dataclasses.dataclass(frozen=True)
class Rule(interface.Rule):
    r"""The log-probability (and entropy) rule. consts: ``(tokens, keep)``. Its stream 0 is
    :math:`z = c/T`, with the entropy stream 1 a ``[tokens, 1]`` block of zeros whose KL
    against stream 0 the engine keeps online; its first sum is :math:`z_y`. Its per-row
    output is ``[N, k]``: the log-probability, then the entropy when asked for, each with
    its own cotangent column in ``r``."""

    num_classes: int  # global vocabulary size
    entropy: bool
    ignore_index: int | None
    # The temperature is traced, so its cotangent may be used (a constant one skips the
    # gradient pass's row sum).
    temperature_grad: bool

    def sizes(self) -> interface.Sizes:
        return interface.Sizes(2, 2, 0) if self.entropy else interface.Sizes(1, 1, 0)

    def expectation_streams(self) -> tuple[tuple[int, int], ...]:
        return ((0, 1),) if self.entropy else ()

    def grad_sizes(self) -> int:
        return 1 if self.temperature_grad else 0

    def heads(self, x: jax.Array, w: jax.Array, b: jax.Array | None,
              consts: Consts) -> tuple[interface.Head, ...]:
        return (interface.Head(x, w, b),)

    def rows(self, consts: Consts) -> tuple[jax.Array, ...]:
        return (consts[0],)

    def scale(self, consts: Consts, num_classes: int | jax.Array, ct: np.dtype) -> jax.Array:
        tokens, keep = consts
        return _ce.row_scale(tokens, num_classes, self.ignore_index, keep, dtype=ct)[0]

    def weights(self, consts: Consts, scale: jax.Array, factor: jax.Array) -> jax.Array:
        """``[N, k]``: each output's cotangent, 0 on masked tokens, NaN on bad ones."""
        return _ce.times(scale[:, None], factor.reshape(scale.shape[0], -1))

    def valid(self, params: Params) -> jax.Array:
        t = params.temperature
        return (t > 0) & (t < jnp.inf)

    def streams(self, blk: interface.Block, params: Params) -> tuple[jax.Array, ...]:
        z = blk.logits[0] / params.temperature
        if not self.entropy:
            return (z,)
        return z, jnp.zeros((z.shape[0], 1), z.dtype)

    def first_sums(self, blk: interface.Block, params: Params) -> tuple[jax.Array, ...]:
        return (label_logit(blk, blk.logits[0] / params.temperature, blk.rows[0]),)

    def _entropy(self, stats: interface.RowStats) -> jax.Array:
        r"""Per row :math:`H = \log S_0 - \mathrm{KL}` (0 for a row with no class above
        :math:`-\infty`)."""
        h = stats.norms[1].log_s[:, 0] - stats.first[-1]
        return jnp.where(stats.norms[0].log_s[:, 0] == -jnp.inf, 0.0, h)

    def row_loss(self, consts: Consts, scale: jax.Array, stats: interface.RowStats,
                 params: Params) -> jax.Array:
        out = [stats.norms[0].log_prob(stats.first[0][:, None])[:, 0]]
        if self.entropy:
            out.append(self._entropy(stats))
        return _ce.times(scale[:, None], jnp.stack(out, axis=1))

    def dlogits(self, blk: interface.Block, stats: interface.RowStats, r: jax.Array,
                params: Params) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        temp, norm = params.temperature, stats.norms[0]
        z = blk.logits[0] / temp
        log_p = norm.log_prob(z)
        r_lp = r[:, :1]
        coef = r_lp
        if self.entropy:
            coef = r_lp + _ce.times(r[:, 1:], log_p + self._entropy(stats)[:, None])
        dz = jnp.where(label_hit(blk, blk.rows[0]), r_lp, 0.0) - _ce.times(norm.prob(z), coef)
        # A masked token: exactly 0, whatever its logits hold (the double where).
        dz = jnp.where(jnp.any(r != 0, axis=1, keepdims=True), dz, 0.0)
        sums = (jnp.sum(_ce.times(dz, log_p), axis=1),) if self.temperature_grad else ()
        return dz / temp, sums

    def cotangents(self, consts: Consts, scale: jax.Array, stats: interface.RowStats,
                   row_sums: tuple[jax.Array, ...], r: jax.Array, params: Params) -> Params:
        if not self.temperature_grad:
            return Params(jnp.zeros_like(params.temperature))
        return Params(-jnp.sum(row_sums[0]) / params.temperature)


@overload
def linear_log_probs(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    tokens: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike | None = None,
    *,
    temperature: float | jax.typing.ArrayLike = 1.0,
    return_entropy: Literal[False] = False,
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    soft_cap: float | jax.typing.ArrayLike | None = None,
    axis_name: Hashable | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
) -> jax.Array: ...


@overload
def linear_log_probs(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    tokens: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike | None = None,
    *,
    temperature: float | jax.typing.ArrayLike = 1.0,
    return_entropy: Literal[True],
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    soft_cap: float | jax.typing.ArrayLike | None = None,
    axis_name: Hashable | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
) -> tuple[jax.Array, jax.Array]: ...


def linear_log_probs(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    tokens: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike | None = None,
    *,
    temperature: float | jax.typing.ArrayLike = 1.0,
    return_entropy: bool = False,
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    soft_cap: float | jax.typing.ArrayLike | None = None,
    axis_name: Hashable | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Per-token log-probabilities (and entropies) of a linear head's softmax, without
    materialising the logits: the quantities RL post-training (GRPO, PPO, DPO) builds on.

    With logits :math:`z = c / T`, :math:`c = x W + b` (capped to
    :math:`\mathrm{cap}\,\tanh(c/\mathrm{cap})` first when ``soft_cap`` is set) and
    :math:`p = \mathrm{softmax}(z)`, per token

    .. math::
        \log p_y = z_y - \mathrm{lse}(z), \qquad
        H = -\sum_j p_j \log p_j = \mathrm{lse}(z) - \sum_j p_j z_j,

    exactly ``jnp.take_along_axis(log_softmax(z), y[..., None], -1)[..., 0]`` and
    ``softmax_entropy(z)`` of the full logits. Both are differentiable under any cotangents
    :math:`\bar g, \bar h` (a clipped ratio, a KL penalty, an entropy bonus, sums over
    sequences), with the logit gradient :math:`\frac{1}{T}(\bar g(\mathrm{onehot}(y) - p)
    - \bar h\,p(\log p + H))`, and :math:`\bar x = \delta W^\top`,
    :math:`\bar W = x^\top\delta`, :math:`\bar b = \sum_i \delta_i`; the derivatives with
    respect to a traced ``temperature`` and ``soft_cap`` are exact too. One pass over the
    vocabulary gives both outputs, one recomputing pass their gradients.

    A KL penalty to a reference policy is two calls (``ref`` from the reference's head),
    e.g. the k3 estimator ``jnp.exp(ref - logp) - (ref - logp) - 1``; the fused
    full-distribution KL is :func:`~softmax_jax.fused.linear_softmax_distillation` with
    ``beta=1.0, reduction="none"``.

    Args:
      x: ``[N, D]`` hidden states, or ``[..., D]`` with any leading token axes
        (``[B, T, D]``).
      w: ``[D, V]`` weights (this device's vocabulary slice under ``axis_name``).
      tokens: integer token ids in ``[0, V)`` of ``x``'s leading shape (global ids under
        ``axis_name``).
      b: optional ``[V]`` bias (this device's slice under ``axis_name``).
      temperature: :math:`T > 0` and finite; the logits are divided by it (after the soft
        cap), as a sampler at temperature :math:`T` does.
      return_entropy: also return the entropy of each token's distribution.
      ignore_index: a token value (e.g. ``-100``) whose tokens are masked.
      where: optional boolean mask broadcasting to ``x``'s leading shape (``True``: the
        token counts), e.g. the completion tokens of a prompt-and-completion batch.
      soft_cap: optional :math:`\mathrm{cap} > 0` for Gemma-style logit soft-capping.
      axis_name: the ``shard_map`` mesh axis over which ``w`` and ``b`` are sharded along
        the vocabulary, as for :func:`~softmax_jax.fused.linear_softmax_cross_entropy`.
      token_block, vocab_block: block sizes; by default
        :meth:`softmax_jax.fused.BlockLayout.default`.

    Returns:
      ``logp`` of ``x``'s leading shape, or ``(logp, entropy)`` with ``return_entropy``,
      float32 whatever the inputs' dtype (float64 for float64 inputs under x64), because
      ratios of probabilities are taken from them. A masked token (``where`` False, or
      ``ignore_index``) gets 0 for both and an exactly zero gradient; a token id outside
      ``[0, V)`` otherwise gives NaN for its row (both outputs, and its gradient); a traced
      temperature or soft cap out of range gives NaN everywhere.

    Raises:
      TypeError: non-floating ``x``/``w``/``b`` or non-integer ``tokens``.
      ValueError: inconsistent shapes, a concrete temperature that is not positive and
        finite, a concrete soft cap <= 0, bad block sizes, or a vocabulary-sharded ``w``
        inside ``shard_map`` without ``axis_name``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[2.0, 3.0, 4.0], [1.0, 1.0, 1.0]])  # logits x @ w: the notes' rows
      >>> tokens = jnp.array([1, 0])
      >>> logp, entropy = sj.linear_log_probs(x, w, tokens, return_entropy=True)
      >>> print(logp, entropy)
      [-1.4076 -1.0986] [0.8323 1.0986]
      >>> print(sj.log_softmax(x @ w)[jnp.arange(2), tokens], sj.softmax_entropy(x @ w))
      [-1.4076 -1.0986] [0.8323 1.0986]
    """
    if axis_name is None:  # jit with sharded inputs: the axis_name path, laid out for you
        routed = auto.fused_call(
            linear_log_probs,
            {"x": ("tokens", x), "w": ("weights", w), "tokens": ("rows", tokens),
             "b": ("classes", b), "where": ("rows", _v.where_like(where, jnp.shape(x)[:-1]))},
            None, (lambda r: r) if return_entropy else None, temperature=temperature,
            return_entropy=return_entropy, ignore_index=ignore_index, soft_cap=soft_cap,
            token_block=token_block, vocab_block=vocab_block)
        if routed is not None:
            return routed
    x, w, b, lead = args.head(x, w, b)
    token_arr, ignore_index = _ce.labels_and_ignore(tokens, ignore_index)
    ids = args.labels_for(token_arr, lead)
    n, v = x.shape[0], w.shape[1]
    temp = _dt.hyperparameters(temperature, 0.0)[0]
    cap, capped = args.soft_cap(soft_cap)
    keep = _v.token_where(where, lead)
    vma.check_vocab_axes(axis_name, x, {"w": w, "b": b})
    layout = BlockLayout.resolve(n, x.shape[1], v, w.dtype.itemsize, token_block, vocab_block,
                                 per_token=True)
    ct = args.compute_dtype(x, w)
    rule = Rule(blocks.num_classes(v, axis_name), bool(return_entropy), ignore_index,
                isinstance(temperature, jax.core.Tracer))
    static = args.static(rule, axis_name, layout, capped, "none", False, x, w, b)
    out, _ = vjp.dispatch(static, x, w, b, (ids, keep), Params(temp.astype(ct)),
                          cap.astype(ct))
    logp = out[:, 0].reshape(lead)
    return (logp, out[:, 1].reshape(lead)) if return_entropy else logp
