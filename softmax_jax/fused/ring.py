r"""The ring of the column statistics across a device axis (Inf-CL's and big_vision's
layout): each device keeps its rows of ``x`` and passes its block of ``y`` on.

With ``P`` devices along ``axis_name``, device ``d`` holds rows ``d`` of ``x`` and block
``d`` of ``y``. At step ``k`` it works on block ``(d + k) mod P``, then hands the block,
with the column statistics (statistics pass) or the ``dy`` accumulator (gradient pass) that
travel with it, to device ``d - 1`` through :func:`jax.lax.ppermute`: ``P - 1`` moves of
``y``. After the last step device ``d`` holds block ``d - 1``, finished; one more move of
the accumulated part alone (``[M_b]`` statistics or ``[D, M_b]`` ``dy``, never ``y``)
brings it home. No device holds the global ``y`` or more than one tile of ``z``.

Without an axis the ring is one step over the whole ``y``, so the single-device and the
sharded losses run the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
from jax import lax

from . import vma
from .columns import (
    Acc,
    Call,
    Cols,
    Rows,
    Stats,
    empty_acc,
    empty_dyt,
    empty_stats,
    grad_pass,
    stats_pass,
)


def _perm(p: int) -> list[tuple[int, int]]:
    return [(i, (i - 1) % p) for i in range(p)]


def around(axis: Hashable | None, step: Callable[[Any, Any, Any], tuple[Any, Any]],
           local: Any, travel: Any) -> tuple[Any, Any]:
    """``(local, travel) = step(local, travel, src)`` for every block ``src`` of the ring,
    ``travel`` moving to the previous device between steps. Returns the last step's
    result: ``travel`` is then block ``me - 1``'s (see :func:`home`)."""
    if axis is None:
        return step(local, travel, 0)
    p = lax.axis_size(axis)
    me = lax.axis_index(axis)
    # what ppermute returns varies over the axis, so the carry must from the start
    local, travel = vma.vary_all((local, travel), vma.axis_set(axis))

    def body(k, carry):
        loc, tr = step(carry[0], carry[1], (me + k) % p)
        return loc, lax.ppermute(tr, axis, _perm(p))

    if p > 1:
        local, travel = lax.fori_loop(0, p - 1, body, (local, travel))
    return step(local, travel, (me + p - 1) % p)


def home(axis: Hashable | None, tree: Any) -> Any:
    """Sends what travelled with block ``me - 1`` back to its device (after :func:`around`)."""
    if axis is None or lax.axis_size(axis) == 1:
        return tree
    return lax.ppermute(tree, axis, _perm(lax.axis_size(axis)))


def statistics(call: Call, axis: Hashable | None, rows: Rows, y: jax.Array,
               keep: jax.Array) -> Stats:
    """The row statistics of this device's rows and the column statistics of its own block
    of ``y``, over the whole (global) matrix."""
    m_b = y.shape[0]
    st = empty_stats(call, rows, m_b)

    def step(local, travel, src):
        y_b, keep_b, cm, cs = travel
        row_m, row_s, sums = local
        new = stats_pass(call, rows, Cols(y_b, keep_b, src * m_b),
                         Stats(row_m, row_s, sums, cm, cs))
        return (new.row_m, new.row_s, new.sums), (y_b, keep_b, new.col_m, new.col_s)

    local, travel = around(axis, step, (st.row_m, st.row_s, st.sums),
                           (y, keep, st.col_m, st.col_s))
    col_m, col_s = home(axis, travel[2:])
    return Stats(local[0], local[1], local[2], col_m, col_s)


def gradients(call: Call, axis: Hashable | None, rows: Rows, y: jax.Array, keep: jax.Array,
              row_aux: tuple, col_aux: tuple) -> tuple[Acc, jax.Array]:
    """The gradient accumulators of this device's rows and the transpose ``[D, M_b]`` of
    its block's ``dy`` (both before the factor ``s``); ``col_aux`` travels with the block."""
    m_b = y.shape[0]

    def step(acc, travel, src):
        y_b, keep_b, c_aux, dyt = travel
        acc, dyt = grad_pass(call, rows, Cols(y_b, keep_b, src * m_b), row_aux, c_aux, acc,
                             dyt)
        return acc, (y_b, keep_b, c_aux, dyt)

    acc, travel = around(axis, step, empty_acc(call, rows, m_b),
                         (y, keep, col_aux, empty_dyt(call, rows, m_b)))
    return acc, home(axis, travel[3])
