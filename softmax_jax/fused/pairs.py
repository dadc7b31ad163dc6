r"""The ``custom_vjp`` of the losses over a similarity matrix (:mod:`.columns`, :mod:`.ring`).

The differentiable part of each loss is a weighted sum of per-row (and per-column) terms
of :math:`z = s\,x y^\top + b`, the terms of the rule (:class:`.pair_interface.PairRule`,
which says how the strategies below call it): the two log-sum-exps of CLIP, the row sums
of SigLIP. Two strategies, as for the vocabulary losses (:mod:`.vjp`):

- :func:`reduced`: the weights :math:`r` are known in the forward pass (``"mean"``,
  ``"sum"``), so the gradients are formed there and are the only residuals;
- :func:`per_token`: the forward pass returns the terms, each times its row's scale
  (O(N) residuals), and the backward pass recomputes the tiles with
  :math:`r = \bar g\,\mathrm{scale}`
  (:func:`softmax_jax._cross_entropy_terms.row_cotangent`: exactly 0 where the cotangent is).

A row's positive is the column ``targets[i]`` (a label), or its own global index (the
diagonal) when ``targets`` is None. Each cotangent comes back in its primal's dtype and
varying mesh axes (``s`` and ``b`` are ``psum``-ed over the ring). ``keep``, ``targets``,
the scales and the weights are constants.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from softmax_jax import _cross_entropy_terms as _ce
from softmax_jax import _validation as _v

from . import ring, vma
from .blocks import shard_start
from .columns import Call, Rows, rows_of
from .pair_interface import Outputs, PairRule


class Static(NamedTuple):
    """The static settings of one call (a ``jax.jit`` static argument)."""

    rule: PairRule
    axis_name: Hashable | None
    blocks: tuple[int, int]  # (token_block, col_block)
    masked: bool  # where was given
    dtypes: tuple[str, str, str, str]  # of x, y, s, b
    vma_in: tuple[frozenset, frozenset, frozenset, frozenset]


def _setup(static: Static, x, y, s, b, keep, targets, *more) -> tuple[Call, Rows, jax.Array]:
    r"""``(call, rows, s)``. The rows hold :math:`s\,x` (in the compute dtype), so that each
    tile's logits are the matrix product itself: with :math:`s` applied to the product,
    XLA fuses :math:`s\,p - m` into one FMA inside ``exp``, whose exponent then sees the
    unrounded product while the running maximum :math:`m` saw the rounded one; half an ulp
    of :math:`z` (128 at :math:`z = 3 \times 10^9`) is enough to overflow."""
    ct = _v.compute_dtype(x.dtype, y.dtype)
    axes = frozenset().union(vma.axis_set(static.axis_name),
                             *(vma.varying(a) for a in (x, y, s, b, keep, *more)))
    s = jnp.asarray(s, ct)
    rows = rows_of(s * x.astype(ct), keep, shard_start(x.shape[0], static.axis_name),
                   static.blocks[0])
    if targets is not None:  # the positives are the labelled columns
        rows = rows._replace(ids=rows.tokens.view(targets.astype(jnp.int32)))
    call = Call(static.rule, ct, jnp.ones((), ct), jnp.asarray(b, ct), static.blocks[1], axes,
                static.masked or rows.tokens.pad > 0)
    return call, rows, s


def _grads(static: Static, call: Call, rows: Rows, x, s, y, keep, outs, r_row, r_col):
    r"""One gradient pass: ``(cotangents of x, y, s, b, row sums as views)``. The pass
    accumulates :math:`\delta y` and :math:`(s x)^\top \delta`; :math:`\bar s =
    \sum \delta \odot x y^\top = \sum_i x_i \cdot (\delta y)_i`, an O(ND) sum."""
    inputs = static.rule.grad_inputs(outs, rows.tokens.view(r_row), r_col)
    acc, dyt = ring.gradients(call, static.axis_name, rows, y, keep, inputs.rows, inputs.cols)
    dx = rows.tokens.unview(acc.dx)
    raw = (s * dx, dyt.T, jnp.sum(x.astype(call.ct) * dx), acc.db)
    cts = tuple(vma.match_varying(c, v).astype(d)
                for c, v, d in zip(raw, static.vma_in, static.dtypes, strict=True))
    return cts, acc.sums


def _normalised(rule: PairRule) -> bool:
    """Whether the rule keeps a log-sum-exp (then its terms need a statistics pass)."""
    sizes = rule.sizes()
    return sizes.row_lse or sizes.col_lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def reduced(static: Static, x, y, s, b, keep, targets, r_row, r_col) -> jax.Array:
    r""":math:`\sum_i r_i\,\mathrm{row}_i + \sum_j r'_j\,\mathrm{col}_j` over the whole
    (global) matrix, replicated over the ring."""
    return _reduced_fwd(static, x, y, s, b, keep, targets, r_row, r_col)[0]


def _reduced_fwd(static, x, y, s, b, keep, targets, r_row, r_col):
    call, rows, s_ct = _setup(static, x, y, s, b, keep, targets, r_row, r_col)
    outs = Outputs((), ())
    if _normalised(static.rule):  # a statistics pass gives the terms
        stats = ring.statistics(call, static.axis_name, rows, y, keep)
        outs = static.rule.outputs(stats, rows.tokens)
        call = call._replace(rule=static.rule.gradient_only())
    cts, sums = _grads(static, call, rows, x, s_ct, y, keep, outs, r_row, r_col)
    value = static.rule.value(outs, sums, rows.tokens.view(r_row.astype(call.ct)),
                              r_col.astype(call.ct))
    if static.axis_name is not None:
        value = lax.psum(value, static.axis_name)
    return value, cts


def _reduced_bwd(static, cts, g):
    return (*(g.astype(c.dtype) * c for c in cts), None, None, None, None)


reduced.defvjp(_reduced_fwd, _reduced_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def per_token(static: Static, x, y, s, b, keep, targets, scale) -> tuple[jax.Array, ...]:
    """The rule's per-row (and per-column) terms of this device's rows (and columns), each
    times its row's ``scale``."""
    return _per_token_fwd(static, x, y, s, b, keep, targets, scale)[0]


def _per_token_fwd(static, x, y, s, b, keep, targets, scale):
    call, rows, _ = _setup(static, x, y, s, b, keep, targets, scale)
    stats = ring.statistics(call, static.axis_name, rows, y, keep)
    outs = static.rule.outputs(stats, rows.tokens)
    terms = tuple(_ce.times(scale, t) for t in static.rule.terms(stats, outs, rows.tokens))
    return terms, (x, y, s, b, keep, targets, scale, outs)


def _per_token_bwd(static, res, g):
    x, y, s, b, keep, targets, scale, outs = res
    call, rows, s_ct = _setup(static, x, y, s, b, keep, targets, scale, *g)
    call = call._replace(rule=static.rule.gradient_only())  # the terms are known
    g_row = _ce.row_cotangent(g[0].astype(call.ct), scale)
    g_col = _ce.row_cotangent(g[1].astype(call.ct), scale) if len(g) > 1 else g_row
    cts, _ = _grads(static, call, rows, x, s_ct, y, keep, outs, g_row, g_col)
    return (*cts, None, None, None)


per_token.defvjp(_per_token_fwd, _per_token_bwd)
