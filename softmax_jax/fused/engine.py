r"""The blockwise engine of the fused large-vocabulary losses, generic over a per-block rule.

The engine owns everything that is the same for every loss on a linear head: it produces
logit blocks ``x @ w + b`` (optionally soft-capped) for one or more heads (the student and,
for distillation, a constant teacher), keeps each row's online log-sum-exp of the streams
the rule names (Milakov & Gimelshein, 2018),

.. math::
    m' = \max(m, \max_{c \in B} z_c), \qquad
    s' = s\,e^{m - m'} + \sum_{c \in B} e^{z_c - m'},

with every rescaling of an empty part (:math:`s = 0`, :math:`m = -\infty`) read as 0, so an
all :math:`-\infty` block or shard adds nothing instead of NaN, merges it across vocabulary
shards (``pmax`` then ``psum`` under ``axis_name``), and accumulates ``dx``, ``dW`` and
``db`` from the rule's ``dlogits`` with the notes' output-layer rules
:math:`\bar x = \delta W^\top`, :math:`\bar W = x^\top \delta`, :math:`\bar b = \sum_i
\delta_i`.

A rule (:class:`~softmax_jax.fused.interface.Rule`, where every method a rule provides is
declared) says what one block contributes: the streams to normalise, additive per-row sums
(a first pass, and optionally a second pass that needs the finished normalisers, as the
generalised JSD does), and ``dlogits`` with any per-row sums the hyper-parameter cotangents
need.

Layouts (:class:`~softmax_jax.fused.layout.BlockLayout`): with held rows each token block's
logits are computed once and reused by every pass and the gradient; with two-level blocks
every pass recomputes them, and the gradient pass walks the tokens inside each vocabulary
block so that ``dW`` is accumulated in float32 one vocabulary block at a time.

This module is the entry point, :func:`run`; the pieces live in
:mod:`.call` (what a run closes over, and the logit tiles), :mod:`.stats_pass` (the
statistics passes), :mod:`.grad_pass` (the gradient pass, and the held-rows loop that
serves both) and :mod:`.blocks` (the block helpers: the online log-sum-exp and KL, token
views, column slices).

Losses over a similarity matrix ``s * x @ y.T`` (CLIP, SigLIP) need each column's
normaliser too: :mod:`.columns` extends these passes with column statistics from the same
tiles (and the same helpers of :mod:`.blocks`), and :mod:`.ring` moves the blocks of ``y``
around a device axis with ``ppermute``.
"""

from __future__ import annotations

import jax
from jax import lax

from softmax_jax import _validation as _v

from . import vma
from .blocks import Tokens, num_classes, shard_start
from .call import Call, Outs, Views
from .grad_pass import held_loop, tiled_grads
from .interface import Block, Grads, Head, Options, RowStats, Rule, Sizes, Tree
from .stats_pass import stats_loop

__all__ = ["Block", "Grads", "Head", "Options", "RowStats", "Rule", "Sizes", "Tree", "run"]


def run(rule: Rule, opt: Options, heads: tuple[Head, ...], rows: tuple[jax.Array, ...],
        classes: tuple[jax.Array, ...], params: Tree, cap: jax.Array,
        r: jax.Array | None = None, saved: RowStats | None = None,
        ) -> tuple[RowStats | None, Grads | None]:
    """Runs the statistics passes (unless ``saved`` holds them) and, when ``r`` (the
    per-token weight of the gradient) is given, the gradient pass.

    Returns ``(stats, grads)``: ``stats`` per token (``[N]``, norms ``[N, 1]``; None when
    ``saved`` was given) and :class:`Grads` (None without ``r``).
    """
    x0, w0 = heads[0].x, heads[0].w
    n, v = x0.shape[0], w0.shape[1]
    ct = _v.compute_dtype(*(h.x.dtype for h in heads), *(h.w.dtype for h in heads))
    axis = opt.axis_name
    leaves = [a for h in heads for a in h if a is not None] + list(rows) + list(classes)
    leaves += [] if r is None else [r]
    axes = frozenset().union(*(vma.varying(a) for a in leaves))
    if saved is not None:
        axes |= frozenset().union(*(vma.varying(a) for a in jax.tree.leaves(saved)))
    call = Call(rule, opt, heads, classes, params, cap, ct, shard_start(v, axis),
                num_classes(v, axis), axes)
    tokens = Tokens(n, opt.layout.token_block)
    views = Views(tuple(tokens.view(h.x) for h in heads), tuple(tokens.view(a) for a in rows),
                  None if r is None else tokens.view(r),
                  None if saved is None else jax.tree.map(tokens.view, saved))
    want_stats, want_grad = saved is None, r is not None
    if opt.layout.holds_rows(v):
        outs, dw, db, dcap = held_loop(call, tokens, views, want_stats, want_grad)
        if want_grad:
            dw = dw.astype(w0.dtype)
    else:
        outs, dw, db, dcap = Outs(), None, None, None
        if want_stats:
            outs = outs._replace(stats=stats_loop(call, tokens, views))
            views = views._replace(stats=outs.stats)
        if want_grad:
            grad_outs, dw, db, dcap = tiled_grads(call, tokens, views)
            outs = outs._replace(dx=grad_outs.dx, grad_sums=grad_outs.grad_sums)
    stats = jax.tree.map(tokens.unview, outs.stats) if want_stats else None
    grads = None
    if want_grad:
        row_sums = tuple(tokens.unview(g) for g in outs.grad_sums)
        if axis is not None:
            row_sums = tuple(lax.psum(g, axis) for g in row_sums)
            dcap = lax.psum(dcap, axis)
        assert outs.dx is not None
        grads = Grads(tokens.unview(outs.dx), dw, db, dcap, row_sums)
    return stats, grads
