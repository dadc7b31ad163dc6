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

Losses over a similarity matrix ``s * x @ y.T`` (CLIP, SigLIP) need each column's
normaliser too: :mod:`.columns` extends these passes with column statistics from the same
tiles (and the same helpers of :mod:`.blocks`), and :mod:`.ring` moves the blocks of ``y``
around a device axis with ``ppermute``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from softmax_jax import _validation as _v
from softmax_jax._normalizer import Normalizer

from . import vma
from .blocks import (
    Tokens,
    balanced,
    cols,
    finished_shift,
    fold_vocab,
    grad_matmul,
    log_ratio_step,
    matmul,
    merge_log_ratios,
    merge_shards,
    narrow_bits,
    num_classes,
    online_lse,
    put_cols,
    shard_start,
    token_loop,
    transposed,
    weight_cols,
)
from .interface import Block, Grads, Head, Options, RowStats, Rule, Sizes, Tree
from .layout import NARROW_SPAN_BYTES, UPDATE_CHUNK

__all__ = ["Block", "Grads", "Head", "Options", "RowStats", "Rule", "Sizes", "Tree", "run"]


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


class _Call(NamedTuple):
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


class _Views(NamedTuple):
    """The per-token inputs of one run, viewed ``[tb, nt, ...]`` (see :class:`Tokens`)."""

    x: tuple[jax.Array, ...]  # per head
    rows: tuple[jax.Array, ...]  # the rule's per-token arrays
    r: jax.Array | None = None  # the gradient's per-row weights (gradient pass only)
    stats: RowStats | None = None  # finished statistics (gradient pass only)

    def at(self, tokens: Tokens, k: Any) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """Token block ``k``'s inputs of each head and rows of the rule."""
        return (tuple(tokens.take(a, k) for a in self.x),
                tuple(tokens.take(a, k) for a in self.rows))


class _Outs(NamedTuple):
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


def _logits(call: _Call, xs: tuple[jax.Array, ...], start: Any, width: int):
    """Per-head logits of columns ``start:start+width`` and head 0's uncapped logits."""
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


def _block(call: _Call, logits, start: Any, rows) -> Block:
    width = logits[0].shape[1]
    return Block(logits, call.offset + start, call.num_classes,
                 tuple(cols(c, start, width) for c in call.classes), rows)


def _stats_of_tile(call: _Call, tile: Callable[[Any, int], Block], v: int, vb: int,
                   tb: int) -> RowStats:
    """The statistics of one token block: first pass, shard merge, optional second pass."""
    rule, ct = call.rule, call.ct
    n_streams, n_first, n_second = rule.sizes()

    # Online KL(softmax(stream i) || softmax(stream j)) for each pair (i, j) of
    # expectation_streams() (the last entries of ``first``).
    pairs = rule.expectation_streams()
    n_expect = len(pairs)

    def first_body(acc, start, width):
        ms, ss, sums, expects, amax = acc
        blk = tile(start, width)
        new_m, new_s, weights = [], [], []
        streams = rule.streams(blk, call.params)
        for i, z in enumerate(streams):
            bm, m1, s1, e = online_lse(z, ms[i], ss[i])
            new_m.append(m1)
            new_s.append(s1)
            weights.append(e)
            if i == 0 and amax is not None:
                cand = (jnp.argmax(z, axis=1) + blk.first_class).astype(jnp.int32)
                amax = jnp.where(bm > ms[0], cand, amax)
        add = rule.first_sums(blk, call.params)
        sums = tuple(a + b for a, b in zip(sums, add, strict=True))
        expects = tuple(
            log_ratio_step(e, ss[i], weights[i], streams[i], streams[j], (ms[i], ms[j]),
                           (new_m[i], new_m[j]))
            for e, (i, j) in zip(expects, pairs, strict=True))
        return vma.vary_all((tuple(new_m), tuple(new_s), sums, expects, amax), call.axes)

    zeros = jnp.zeros((tb,), ct)
    init = (tuple(jnp.full((tb,), -jnp.inf, ct) for _ in range(n_streams)),
            (zeros,) * n_streams, (zeros,) * (n_first - n_expect), (zeros,) * n_expect,
            jnp.zeros((tb,), jnp.int32) if call.opt.want_argmax else None)
    ms, ss, firsts, expects, amax = fold_vocab(first_body, vma.vary_all(init, call.axes), v, vb)
    expects = merge_log_ratios(call.opt.axis_name, expects, ss, pairs, ms)
    ms, ss, firsts, amax = merge_shards(call.opt.axis_name, ms, ss, firsts, amax)
    logs = tuple(jnp.log(s) for s in ss)
    firsts = firsts + tuple(
        jnp.where(ss[i] == 0, 0.0, e / jnp.where(ss[i] == 0, 1.0, ss[i])) - logs[i] + logs[j]
        for e, (i, j) in zip(expects, pairs, strict=True))
    norms = tuple(Normalizer(finished_shift(m)[:, None], log_s[:, None])
                  for m, log_s in zip(ms, logs, strict=True))
    stats = RowStats(norms, firsts, (), amax)
    if not n_second:
        return stats

    def second_body(acc, start, width):
        add = rule.second_sums(tile(start, width), stats, call.params)
        return vma.vary_all(tuple(a + b for a, b in zip(acc, add, strict=True)), call.axes)

    seconds = fold_vocab(second_body, vma.vary_all((zeros,) * n_second, call.axes), v, vb)
    if call.opt.axis_name is not None:
        seconds = tuple(lax.psum(s, call.opt.axis_name) for s in seconds)
    return stats._replace(second=seconds)


def _dlogits(call: _Call, blk: Block, raw: jax.Array | None, stats: RowStats, r: jax.Array):
    r"""The rule's ``dlogits`` carried through the soft cap: ``(dz, row sums, d cap)``.

    With :math:`c = \mathrm{cap}\tanh(z/\mathrm{cap})` and :math:`t = c/\mathrm{cap}`,
    :math:`\partial c/\partial z = 1 - t^2` and :math:`\partial c/\partial\mathrm{cap} =
    t - (z/\mathrm{cap})(1 - t^2)`.
    """
    dz, row_sums = call.rule.dlogits(blk, stats, r, call.params)
    dcap = jnp.zeros((), call.ct)
    if raw is not None:
        cap = call.cap
        t = jnp.where(jnp.isinf(cap), 0.0, blk.logits[0] / cap)
        slope = 1.0 - jnp.square(t)
        u = jnp.where(jnp.isinf(cap), 0.0, raw / cap)
        dcap = jnp.sum(jnp.where(dz == 0, 0.0, dz * (t - u * slope)))
        dz = dz * slope
    return dz, row_sums, dcap


def _held_loop(call: _Call, tokens: Tokens, views: _Views, want_stats: bool, want_grad: bool):
    """Held rows: each token block's logits are computed once, for every pass and the
    gradient (formed in column chunks of at most ``UPDATE_CHUNK``)."""
    head0, ct, v = call.heads[0], call.ct, call.heads[0].w.shape[1]
    axes_tok = call.axes - vma.axis_set(call.opt.axis_name)

    def token_step(k, carry):
        dw, db, dcap, outs = carry
        xs, rows = views.at(tokens, k)
        held, raw = _logits(call, xs, 0, v)

        def tile(start, width):
            return _block(call, tuple(cols(z, start, width) for z in held), start, rows)

        if want_stats:
            stats = vma.vary_all(_stats_of_tile(call, tile, v, v, tokens.tb), axes_tok)
            outs = outs._replace(
                stats=jax.tree.map(lambda o, u: tokens.put(o, k, u), outs.stats, stats))
        else:
            stats = jax.tree.map(lambda a: tokens.take(a, k), views.stats)
        if want_grad:
            assert views.r is not None and outs.dx is not None
            r = tokens.take(views.r, k)
            x_t = transposed(xs[0])

            def grad_body(acc, start, width):
                dx, dw, db, dcap, gs = acc
                dz, add, dc = _dlogits(call, tile(start, width),
                                       None if raw is None else cols(raw, start, width), stats, r)
                dx = dx + grad_matmul(dz, weight_cols(head0.w, start, width, ct), (1, 1), ct,
                                      True, head0.x.dtype)
                dw = put_cols(dw, start, grad_matmul(dz, x_t, (1, 0), ct, False, head0.w.dtype),
                              add=True)
                if db is not None:
                    db = put_cols(db, start, jnp.sum(dz, axis=0), add=True)
                gs = tuple(a + b for a, b in zip(gs, add, strict=True))
                return vma.vary_all((dx, dw, db, dcap + dc, gs), call.axes)

            zero_rows = tuple(jnp.zeros((tokens.tb,), ct) for _ in outs.grad_sums)
            init = vma.vary_all((jnp.zeros((tokens.tb, head0.x.shape[1]), ct), dw, db, dcap,
                                 zero_rows), call.axes)
            dx, dw, db, dcap, gs = fold_vocab(grad_body, init, v, balanced(v, UPDATE_CHUNK))
            outs = outs._replace(dx=tokens.put(outs.dx, k, dx), grad_sums=tuple(
                tokens.put(o, k, g) for o, g in zip(outs.grad_sums, gs, strict=True)))
        return vma.vary_all((dw, db, dcap), call.axes) + (outs,)

    d = head0.x.shape[1]
    dw0 = db0 = None
    if want_grad:
        dw0 = jnp.zeros((d, v), ct)
        db0 = None if head0.b is None else jnp.zeros((v,), ct)
    carry = (*vma.vary_all((dw0, db0, jnp.zeros((), ct)), call.axes),
             _outputs(call, tokens, want_stats, want_grad))
    dw, db, dcap, outs = token_loop(tokens, token_step, carry)
    return outs, dw, db, dcap


def _outputs(call: _Call, tokens: Tokens, want_stats: bool, want_grad: bool) -> _Outs:
    """Zero-initialised per-token outputs, viewed ``[tb, nt, ...]``."""
    axes_tok = call.axes - vma.axis_set(call.opt.axis_name)
    tb, nt, ct = tokens.tb, tokens.nt, call.ct
    n_streams, n_first, n_second = call.rule.sizes()
    outs = _Outs()
    if want_stats:
        col = jnp.zeros((tb, nt, 1), ct)
        row = jnp.zeros((tb, nt), ct)
        outs = outs._replace(stats=vma.vary_all(RowStats(
            tuple(Normalizer(col, col) for _ in range(n_streams)), (row,) * n_first,
            (row,) * n_second,
            jnp.zeros((tb, nt), jnp.int32) if call.opt.want_argmax else None), axes_tok))
    if want_grad:
        outs = outs._replace(
            dx=vma.vary_all(jnp.zeros((tb, nt, call.heads[0].x.shape[1]), ct), call.axes),
            grad_sums=vma.vary_all(
                tuple(jnp.zeros((tb, nt), ct) for _ in range(call.rule.grad_sizes())),
                call.axes))
    return outs


def _stats_loop(call: _Call, tokens: Tokens, views: _Views) -> RowStats:
    """Two-level statistics: the vocabulary in blocks inside each token block."""
    v = call.heads[0].w.shape[1]
    axes_tok = call.axes - vma.axis_set(call.opt.axis_name)

    def token_step(k, outs):
        xs, rows = views.at(tokens, k)

        def tile(start, width):
            return _block(call, _logits(call, xs, start, width)[0], start, rows)

        stats = vma.vary_all(_stats_of_tile(call, tile, v, call.opt.layout.vocab_block,
                                            tokens.tb), axes_tok)
        return jax.tree.map(lambda o, u: tokens.put(o, k, u), outs, stats)

    return token_loop(tokens, token_step, _outputs(call, tokens, True, False).stats)


def _tiled_grads(call: _Call, tokens: Tokens, views: _Views):
    """Two-level gradient: the tokens inside each vocabulary block, so that ``dW`` is
    accumulated in float32 one ``[D, vocab_block]`` block at a time (Cut Cross-Entropy's
    order) and written once in ``w``'s dtype.

    For bfloat16/float16 ``w`` the blocks are first written, as bits, into a span buffer of
    at most ``NARROW_SPAN_BYTES``, and each full span is then written into ``dW``. XLA:CPU
    carries out a bfloat16 ``dynamic_update_slice`` in float32 over the whole array, one
    pass over ``dW`` per write: per span instead of per block, that is 16 passes instead of
    128 at ``D = 1024, V = 262144``. An unsigned-integer update is done in place.
    """
    head0, ct = call.heads[0], call.ct
    d, v = head0.w.shape
    vb = call.opt.layout.vocab_block
    bits = narrow_bits(head0.w.dtype, ct)
    span = v if bits is None else max(vb, NARROW_SPAN_BYTES // (bits.itemsize * d) // vb * vb)

    def vocab_body(acc, start, width, local):
        buf, db, dcap, outs = acc
        w_j = weight_cols(head0.w, start, width, ct)

        def token_step(k, c):
            dw_j, db_j, dcap, outs = c
            xs, rows = views.at(tokens, k)
            stats = jax.tree.map(lambda a: tokens.take(a, k), views.stats)
            logits, raw = _logits(call, xs, start, width)
            assert views.r is not None and outs.dx is not None
            dz, add, dc = _dlogits(call, _block(call, logits, start, rows), raw, stats,
                                   tokens.take(views.r, k))
            dx_k = tokens.take(outs.dx, k) + grad_matmul(
                dz, w_j, (1, 1), ct, True, head0.x.dtype)
            outs = outs._replace(
                dx=tokens.put(outs.dx, k, dx_k),
                grad_sums=tuple(tokens.put(o, k, tokens.take(o, k) + a)
                                for o, a in zip(outs.grad_sums, add, strict=True)))
            dw_j = dw_j + grad_matmul(dz, transposed(xs[0]), (1, 0), ct, False,
                                      head0.w.dtype)
            db_j = None if db_j is None else db_j + jnp.sum(dz, axis=0)
            return vma.vary_all((dw_j, db_j, dcap + dc), call.axes) + (outs,)

        db0 = None if db is None else jnp.zeros((width,), ct)
        init = vma.vary_all((jnp.zeros((d, width), ct), db0, dcap), call.axes) + (outs,)
        dw_j, db_j, dcap, outs = token_loop(tokens, token_step, init)
        dw_j = dw_j.astype(head0.w.dtype)
        if bits is not None:
            dw_j = lax.bitcast_convert_type(dw_j, bits)
        buf = put_cols(buf, local, dw_j, add=False)
        if db is not None:
            db = put_cols(db, start, db_j, add=False)
        return vma.vary_all((buf, db, dcap), call.axes) + (outs,)

    def span_body(acc, first, width):
        dw, db, dcap, outs = acc
        buf = dw if bits is None else vma.vary_all(jnp.zeros((d, width), bits), call.axes)
        buf, db, dcap, outs = fold_vocab(
            lambda c, start, w: vocab_body(c, first + start, w, start),
            (buf, db, dcap, outs), width, vb)
        if bits is not None:
            buf = put_cols(dw, first, lax.bitcast_convert_type(buf, head0.w.dtype), add=False)
        return vma.vary_all((buf, db, dcap), call.axes) + (outs,)

    db0 = None if head0.b is None else jnp.zeros((v,), ct)
    init = vma.vary_all((jnp.zeros((d, v), head0.w.dtype), db0, jnp.zeros((), ct)), call.axes)
    init = init + (_outputs(call, tokens, False, True),)
    dw, db, dcap, outs = fold_vocab(span_body, init, v, span)
    return outs, dw, db, dcap


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
    call = _Call(rule, opt, heads, classes, params, cap, ct, shard_start(v, axis),
                 num_classes(v, axis), axes)
    tokens = Tokens(n, opt.layout.token_block)
    views = _Views(tuple(tokens.view(h.x) for h in heads), tuple(tokens.view(a) for a in rows),
                   None if r is None else tokens.view(r),
                   None if saved is None else jax.tree.map(tokens.view, saved))
    want_stats, want_grad = saved is None, r is not None
    if opt.layout.holds_rows(v):
        outs, dw, db, dcap = _held_loop(call, tokens, views, want_stats, want_grad)
        if want_grad:
            dw = dw.astype(w0.dtype)
    else:
        outs, dw, db, dcap = _Outs(), None, None, None
        if want_stats:
            outs = outs._replace(stats=_stats_loop(call, tokens, views))
            views = views._replace(stats=outs.stats)
        if want_grad:
            grad_outs, dw, db, dcap = _tiled_grads(call, tokens, views)
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
