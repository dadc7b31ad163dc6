r"""The ``custom_vjp`` of the losses over a similarity matrix (:mod:`.columns`, :mod:`.ring`).

The differentiable part of each loss is a weighted sum of per-row (and per-column) terms
of :math:`z = s\,x y^\top + b`, the rule's ``outputs``: the two log-sum-exps of CLIP, the
row sums of SigLIP. Two strategies, as for the vocabulary losses (:mod:`.vjp`):

- :func:`reduced`: the weights :math:`r` are known in the forward pass (``"mean"``,
  ``"sum"``), so the gradients are formed there and are the only residuals;
- :func:`per_token`: the forward pass returns the terms (O(N) residuals) and the backward
  pass recomputes the tiles with :math:`r = \bar g`.

Each cotangent comes back in its primal's dtype and varying mesh axes (``s`` and ``b`` are
``psum``-ed over the ring). ``keep`` and the weights are constants.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from softmax_jax import _validation as _v

from . import ring, vma
from .blocks import shard_start
from .columns import Call, Rows, rows_of


class Static(NamedTuple):
    rule: Any
    axis_name: Hashable | None
    blocks: tuple[int, int]  # (token_block, col_block)
    masked: bool  # where was given
    dtypes: tuple[str, str, str, str]  # of x, y, s, b
    vma_in: tuple[frozenset, frozenset, frozenset, frozenset]


def _setup(static: Static, x, y, s, b, keep, *more) -> tuple[Call, Rows]:
    ct = _v.compute_dtype(x.dtype, y.dtype)
    axes = frozenset().union(vma.axis_set(static.axis_name),
                             *(vma.varying(a) for a in (x, y, s, b, keep, *more)))
    rows = rows_of(x, keep, shard_start(x.shape[0], static.axis_name), static.blocks[0])
    call = Call(static.rule, ct, jnp.asarray(s, ct), jnp.asarray(b, ct), static.blocks[1], axes,
                static.masked or rows.tokens.pad > 0)
    return call, rows


def _grads(static: Static, call: Call, rows: Rows, y, keep, outs, r_row, r_col):
    """One gradient pass: ``(cotangents of x, y, s, b, row sums as views)``."""
    row_aux, col_aux = static.rule.aux(outs, rows.tokens.view(r_row), r_col)
    acc, dyt = ring.gradients(call, static.axis_name, rows, y, keep, row_aux, col_aux)
    raw = (call.scale * rows.tokens.unview(acc.dx), call.scale * dyt.T, acc.ds, acc.db)
    cts = tuple(vma.match_varying(c, v).astype(d)
                for c, v, d in zip(raw, static.vma_in, static.dtypes, strict=True))
    return cts, acc.sums


def _outputs(static: Static, call: Call, rows: Rows, y, keep):
    if not any(static.rule.normalisers):
        return None
    return static.rule.outputs(ring.statistics(call, static.axis_name, rows, y, keep))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def reduced(static: Static, x, y, s, b, keep, r_row, r_col) -> jax.Array:
    r""":math:`\sum_i r_i\,\mathrm{row}_i + \sum_j r'_j\,\mathrm{col}_j` over the whole
    (global) matrix, replicated over the ring."""
    return _reduced_fwd(static, x, y, s, b, keep, r_row, r_col)[0]


def _reduced_fwd(static, x, y, s, b, keep, r_row, r_col):
    call, rows = _setup(static, x, y, s, b, keep, r_row, r_col)
    outs = _outputs(static, call, rows, y, keep)
    cts, sums = _grads(static, call, rows, y, keep, outs, r_row, r_col)
    value = static.rule.value(outs, sums, rows.tokens.view(r_row.astype(call.ct)),
                              r_col.astype(call.ct))
    if static.axis_name is not None:
        value = lax.psum(value, static.axis_name)
    return value, cts


def _reduced_bwd(static, cts, g):
    return (*(g.astype(c.dtype) * c for c in cts), None, None, None)


reduced.defvjp(_reduced_fwd, _reduced_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def per_token(static: Static, x, y, s, b, keep) -> tuple[jax.Array, ...]:
    """The rule's per-row (and per-column) terms of this device's rows (and columns)."""
    return _per_token_fwd(static, x, y, s, b, keep)[0]


def _per_token_fwd(static, x, y, s, b, keep):
    call, rows = _setup(static, x, y, s, b, keep)
    outs = _outputs(static, call, rows, y, keep)
    if outs is None:  # a rule without normalisers: its terms are the pass's row sums
        stats = ring.statistics(call, static.axis_name, rows, y, keep)
        terms = tuple(rows.tokens.unview(a) for a in stats.sums)
    else:
        terms = static.rule.terms(outs, rows.tokens.unview)
    return terms, (x, y, s, b, keep, outs)


def _per_token_bwd(static, res, g):
    x, y, s, b, keep, outs = res
    call, rows = _setup(static, x, y, s, b, keep, *g)
    call = call._replace(rule=static.rule.gradient_only())  # the terms are known
    g_row = jnp.where(keep, g[0], 0.0).astype(call.ct)
    g_col = jnp.where(keep, g[1], 0.0).astype(call.ct) if len(g) > 1 else g_row
    cts, _ = _grads(static, call, rows, y, keep, outs, g_row, g_col)
    return (*cts, None)


per_token.defvjp(_per_token_fwd, _per_token_bwd)
