r"""What one run of the fused engine (:mod:`.engine`) closes over, and the logit tiles it
produces: the static and traced facts of the run (:class:`Call`), the per-token inputs and
outputs viewed in token blocks (:class:`Views`, :class:`Outs`), and the logits of columns
``start:start+width`` of a token block,

.. math::
    z = x\,W_{:, c} + b_c, \qquad \text{optionally } \mathrm{cap}\tanh(z / \mathrm{cap}),

handed to the rule as a :class:`~.interface.Block`. The statistics passes
(:mod:`.stats_pass`) and the gradient pass (:mod:`.grad_pass`) build on these.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax._normalizer import Normalizer

from . import vma
from .blocks import Tokens, cols, matmul, weight_cols
from .interface import Block, Head, Options, RowStats, Rule, Tree


class Call(NamedTuple):
    """Everything one engine run closes over (traced arrays and static facts)."""

    rule: Rule
    opt: Options
    heads: tuple[Head, ...]
    classes: tuple[jax.Array, ...]
    params: Tree
    cap: jax.Array
    ct: np.dtype
    offset: Any  # global class id of this shard's column 0
    num_classes: int | jax.Array
    axes: frozenset  # every mesh axis an input varies over

    def token_axes(self) -> frozenset:
        """The mesh axes a per-token statistic varies over (all but the vocabulary's)."""
        return self.axes - vma.axis_set(self.opt.axis_name)


class Views(NamedTuple):
    """The per-token inputs of one run, viewed ``[tb, nt, ...]`` (see :class:`Tokens`)."""

    x: tuple[jax.Array, ...]  # per head
    rows: tuple[jax.Array, ...]  # the rule's per-token arrays
    r: jax.Array | None = None  # the gradient's per-row weights (gradient pass only)
    stats: RowStats | None = None  # finished statistics (gradient pass only)

    def at(self, tokens: Tokens, k: Any) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """Token block ``k``'s inputs of each head and rows of the rule."""
        return (tuple(tokens.take(a, k) for a in self.x),
                tuple(tokens.take(a, k) for a in self.rows))


class Outs(NamedTuple):
    """The per-token outputs of one run, viewed ``[tb, nt, ...]``; None (or ``()``) for those
    not asked for."""

    dx: jax.Array | None = None
    grad_sums: tuple[jax.Array, ...] = ()
    stats: RowStats | None = None


def soft_capped(z: jax.Array, cap: jax.Array) -> jax.Array:
    r""":math:`\mathrm{cap}\tanh(z/\mathrm{cap})`, exactly :math:`z` where
    :math:`|z/\mathrm{cap}| < 2^{-12}` (there :math:`z(1 - u^2/3)` rounds to :math:`z`) and
    for an infinite cap. A cap far above the logits (``1e38``) then changes nothing: else
    :math:`z/\mathrm{cap}` is subnormal, flushed to 0, and every logit becomes 0."""
    u = z / cap
    return jnp.where(jnp.isinf(cap) | (jnp.abs(u) < 2.0**-12), z, cap * jnp.tanh(u))


def logits(call: Call, xs: tuple[jax.Array, ...], start: Any, width: int):
    """Per-head logits of columns ``start:start+width`` and head 0's uncapped logits (None
    without a soft cap)."""
    out, raw = [], None
    for i, (head, x_c) in enumerate(zip(call.heads, xs, strict=True)):
        z = matmul(x_c, weight_cols(head.w, start, width, call.ct), (1, 0), call.ct)
        if head.b is not None:
            z = z + cols(head.b, start, width).astype(call.ct)
        if i == 0 and call.opt.capped:
            raw = z
            z = soft_capped(z, call.cap)
        out.append(z)
    return tuple(out), raw


def block(call: Call, zs: tuple[jax.Array, ...], start: Any, rows) -> Block:
    """The rule's view of the logits ``zs`` of columns from ``start``."""
    width = zs[0].shape[1]
    return Block(zs, call.offset + start, call.num_classes,
                 tuple(cols(c, start, width) for c in call.classes), rows)


def outputs(call: Call, tokens: Tokens, want_stats: bool, want_grad: bool) -> Outs:
    """Zero-initialised per-token outputs, viewed ``[tb, nt, ...]``."""
    tb, nt, ct = tokens.tb, tokens.nt, call.ct
    n_streams, n_first, n_second = call.rule.sizes()
    outs = Outs()
    if want_stats:
        col = jnp.zeros((tb, nt, 1), ct)
        row = jnp.zeros((tb, nt), ct)
        outs = outs._replace(stats=vma.vary_all(RowStats(
            tuple(Normalizer(col, col) for _ in range(n_streams)), (row,) * n_first,
            (row,) * n_second,
            jnp.zeros((tb, nt), jnp.int32) if call.opt.want_argmax else None),
            call.token_axes()))
    if want_grad:
        outs = outs._replace(
            dx=vma.vary_all(jnp.zeros((tb, nt, call.heads[0].x.shape[1]), ct), call.axes),
            grad_sums=vma.vary_all(
                tuple(jnp.zeros((tb, nt), ct) for _ in range(call.rule.grad_sizes())),
                call.axes))
    return outs
