r"""Column statistics for the blockwise engine: losses over a similarity matrix
:math:`z = s\,x y^\top + b` (``x`` ``[N, D]``, ``y`` ``[M, D]``), whose rows and columns are
both normalised.

The vocabulary engine (:mod:`softmax_jax.fused.engine`) keeps per-row statistics of
``x @ w`` tiles; here the same tiles also feed per-column statistics. One pass walks
``token_block x col_block`` tiles (rows outer, in the strided token blocks of
:class:`~softmax_jax.fused.blocks.Tokens`; columns inner, contiguous) and, from one matrix
product per tile, updates each row's online log-sum-exp (carried for the current token
block) and each column's (carried for all columns, an ``[M]`` array), with the same
:func:`~softmax_jax.fused.blocks.rescale` convention for empty parts:

.. math::
    m'_j = \max(m_j, \max_{i \in B} z_{ij}), \qquad
    s'_j = s_j\,e^{m_j - m'_j} + \sum_{i \in B} e^{z_{ij} - m'_j}.

The gradient pass recomputes each tile once, asks the rule for :math:`\delta = r\,\partial
\ell/\partial z` of both directions together, and accumulates (three products per tile)

.. math::
    \bar x_B \mathrel{+}= \delta\,y_C, \qquad \bar y_C^\top \mathrel{+}= x_B^\top \delta,
    \qquad \bar s \mathrel{+}= \textstyle\sum \delta \odot (x_B y_C^\top), \qquad
    \bar b \mathrel{+}= \textstyle\sum \delta,

the factor :math:`s` of :math:`\bar x, \bar y` applied once at the end. A pair that is not
kept (``where``) is :math:`-\infty` in every normaliser and has :math:`\delta = 0`.

A rule is a :class:`~.pair_interface.PairRule` (:mod:`.pair_interface`, which also declares
the :class:`~.pair_interface.Tile` it sees and the :class:`~.pair_interface.Stats` it reads).
The functions here work on one block of columns; :mod:`softmax_jax.fused.ring` moves the
blocks of ``y`` around a device axis.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import vma
from .blocks import (
    Tokens,
    cols,
    fold_vocab,
    grad_matmul,
    matmul,
    online_lse,
    put_cols,
    token_loop,
    transposed,
)
from .pair_interface import GradInputs, PairRule, Stats, Tile


class Call(NamedTuple):
    """Everything one pass closes over."""

    rule: PairRule
    ct: np.dtype
    scale: jax.Array
    bias: jax.Array
    col_block: int
    axes: frozenset  # every mesh axis an input varies over
    masked: bool  # some pair is left out (where, or the padding of the last token block)


class Rows(NamedTuple):
    """The local rows, viewed ``[tb, nt, ...]`` (see :class:`Tokens`)."""

    tokens: Tokens
    x: jax.Array
    keep: jax.Array
    ids: jax.Array  # global row ids (int32)


class Cols(NamedTuple):
    """One block of columns (the block that travels around a ring)."""

    y: jax.Array  # [M_b, D]
    keep: jax.Array  # [M_b] bool
    first: Any  # global id of column 0


class Acc(NamedTuple):
    """This device's gradient accumulators (before the factor ``s``) and row sums; the
    block's ``dy`` (as its transpose ``[D, M_b]``) travels with the block instead."""

    dx: jax.Array  # [tb, nt, D] view
    ds: jax.Array
    db: jax.Array
    sums: tuple[jax.Array, ...]


def rows_of(x: jax.Array, keep: jax.Array, first: Any, token_block: int) -> Rows:
    n = x.shape[0]
    tokens = Tokens(n, token_block)
    ids = jnp.arange(n, dtype=jnp.int32) + jnp.asarray(first, jnp.int32)
    return Rows(tokens, tokens.view(x), tokens.view(keep), tokens.view(ids))


def _tile(call: Call, rows: Rows, k: Any, blk: Cols, start: Any, width: int):
    """``(tile, x_k, y_c, p)``: the tile of token block ``k`` and columns ``start:+width``,
    with ``p = x_k y_c^T`` (for the cotangent of ``s``)."""
    x_k = rows.tokens.take(rows.x, k)
    y_c = lax.dynamic_slice_in_dim(blk.y, start, width, axis=0)
    p = matmul(x_k, y_c, (1, 1), call.ct)
    z = call.scale * p + call.bias
    keep = None
    if call.masked:
        keep = rows.tokens.take(rows.keep, k)[:, None] & cols(blk.keep, start, width)[None, :]
    col_ids = jnp.asarray(blk.first, jnp.int32) + start + jnp.arange(width, dtype=jnp.int32)
    pos = rows.tokens.take(rows.ids, k)[:, None] == col_ids[None, :]
    return Tile(z, keep, pos), x_k, y_c, p


def kept(tile: Tile, a: jax.Array, fill: float) -> jax.Array:
    """``a`` where the pair is kept, ``fill`` elsewhere."""
    return a if tile.keep is None else jnp.where(tile.keep, a, fill)


def empty_stats(call: Call, rows: Rows, m_cols: int) -> Stats:
    tb, nt = rows.tokens.tb, rows.tokens.nt
    row = jnp.zeros((tb, nt), call.ct)
    col = jnp.zeros((m_cols,), call.ct)
    return vma.vary_all(Stats(row - jnp.inf, row, (row,) * call.rule.sizes().sums, col - jnp.inf,
                              col), call.axes)


def stats_pass(call: Call, rows: Rows, blk: Cols, stats: Stats) -> Stats:
    """Adds the tiles of ``rows`` x ``blk`` to the online statistics."""
    rule, toks = call.rule, rows.tokens
    sizes = rule.sizes()

    def col_step(acc, start, width):
        rm, rs, sums, cm, cs, k = acc
        tile, _, _, _ = _tile(call, rows, k, blk, start, width)
        zk = kept(tile, tile.z, -jnp.inf)
        if sizes.row_lse:
            _, rm, rs, _ = online_lse(zk, rm, rs, 1)
        if sizes.col_lse:
            _, m_c, s_c, _ = online_lse(zk, cols(cm, start, width), cols(cs, start, width), 0)
            cm, cs = put_cols(cm, start, m_c, False), put_cols(cs, start, s_c, False)
        sums = tuple(a + b for a, b in zip(sums, rule.sums(tile), strict=True))
        return vma.vary_all((rm, rs, sums, cm, cs), call.axes) + (k,)

    def token_step(k, st: Stats) -> Stats:
        init = (toks.take(st.row_m, k), toks.take(st.row_s, k),
                tuple(toks.take(a, k) for a in st.sums), st.col_m, st.col_s, k)
        rm, rs, sums, cm, cs, _ = fold_vocab(col_step, init, blk.y.shape[0], call.col_block)
        return Stats(toks.put(st.row_m, k, rm), toks.put(st.row_s, k, rs),
                     tuple(toks.put(a, k, b) for a, b in zip(st.sums, sums, strict=True)),
                     cm, cs)

    return token_loop(toks, token_step, stats)


def empty_acc(call: Call, rows: Rows, m_cols: int) -> Acc:
    tb, nt, d = rows.x.shape
    zero = jnp.zeros((), call.ct)
    return vma.vary_all(Acc(jnp.zeros((tb, nt, d), call.ct), zero, zero,
                            (jnp.zeros((tb, nt), call.ct),) * call.rule.sizes().sums), call.axes)


def empty_dyt(call: Call, rows: Rows, m_cols: int) -> jax.Array:
    return vma.vary_all(jnp.zeros((rows.x.shape[2], m_cols), call.ct), call.axes)


def grad_pass(call: Call, rows: Rows, blk: Cols, row_aux: tuple[jax.Array, ...],
              col_aux: tuple[jax.Array, ...], acc: Acc, dyt: jax.Array) -> tuple[Acc, jax.Array]:
    """Adds the gradient of the tiles ``rows`` x ``blk`` to ``acc`` (this device's rows) and
    ``dyt`` (the block's columns); ``row_aux``/``col_aux`` are the rule's
    :class:`~.pair_interface.GradInputs`, per row (``[tb, nt]`` views) and per column
    (``[M_b]``, the block's)."""
    rule, toks, ct = call.rule, rows.tokens, call.ct

    def col_step(c, start, width):
        dx, dyt, ds, db, sums, k, r_aux = c
        tile, x_k, y_c, p = _tile(call, rows, k, blk, start, width)
        c_aux = tuple(cols(a, start, width) for a in col_aux)
        dz = kept(tile, rule.dlogits(tile, GradInputs(r_aux, c_aux)), 0.0)
        dx = dx + grad_matmul(dz, y_c, (1, 0), ct, True, x_k.dtype)
        dyt = put_cols(dyt, start, grad_matmul(dz, transposed(x_k), (1, 0), ct, False, y_c.dtype),
                       True)
        ds = ds + jnp.sum(kept(tile, dz * p, 0.0))
        db = db + jnp.sum(dz)
        sums = tuple(a + b for a, b in zip(sums, rule.sums(tile), strict=True))
        return vma.vary_all((dx, dyt, ds, db, sums), call.axes) + (k, r_aux)

    def token_step(k, carry):
        a, dyt = carry
        r_aux = tuple(toks.take(v, k) for v in row_aux)
        init = (toks.take(a.dx, k), dyt, a.ds, a.db, tuple(toks.take(s, k) for s in a.sums),
                k, r_aux)
        dx, dyt, ds, db, sums, _, _ = fold_vocab(col_step, init, blk.y.shape[0],
                                                 call.col_block)
        a = Acc(toks.put(a.dx, k, dx), ds, db,
                tuple(toks.put(o, k, s) for o, s in zip(a.sums, sums, strict=True)))
        return a, dyt

    return token_loop(toks, token_step, (acc, dyt))
