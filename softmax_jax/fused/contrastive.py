r"""Contrastive losses over :math:`z = s\,x y^\top (+\, b)` without materialising ``z``:
CLIP's bidirectional softmax cross-entropy and SigLIP's pairwise sigmoid loss.

Both are rules of the column-statistics engine (:mod:`.columns`), run around a device ring
(:mod:`.ring`) under ``axis_name``, with the ``custom_vjp`` of :mod:`.pairs`.

CLIP's terms per row :math:`i` and column :math:`j` are the two log-sum-exps less the
positive logit, :math:`\mathrm{lse}_j z_{ij} - z_{i\ell_i}` and
:math:`\mathrm{lse}_i z_{ij} - z_{jj}`. The positive is read from the same tile product as
the log-sum-exp (a per-row sum of the statistics pass) and each term is formed as
:math:`(m - z_{i\ell_i}) + \log s` from the running maximum :math:`m` and sum :math:`s`:
both parts are :math:`\ge 0` in floating point, so a per-pair loss is never negative, and
a batch mean adds non-negative terms (no cancellation of two large sums). With weights
:math:`r_i` (rows) and :math:`r'_j` (columns) the tile's logit gradient is

.. math::
    \delta_{ij} = r_i\,(e^{z_{ij} - L_i} - [j = \ell_i])
                + r'_j\,(e^{z_{ij} - L'_j} - [i = j]),

(:math:`r = r' = 1/(2N)` for the mean). SigLIP, with :math:`t_{ij} = 2[i = j] - 1`, has no
normaliser: its term is :math:`\sum_j \log(1 + e^{-t_{ij} z_{ij}})` and
:math:`\delta_{ij} = r_i\,t_{ij}(\sigma(t_{ij} z_{ij}) - 1)`.

A pair's weight is its cotangent times its scale (:func:`softmax_jax._cross_entropy_terms.
row_cotangent`): 0 for a pair left out, NaN for an invalid label, so that the value and
every gradient are NaN there, and exactly 0 for a pair whose cotangent is 0.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from softmax_jax import _cross_entropy_terms as _ce

from . import args, pairs, vma
from .blocks import Tokens
from .contrastive_rules import ClipRule, SigmoidRule

# Tile of the similarity matrix: rows of x per token block, columns of y per column block.
TOKEN_BLOCK = 1024
COL_BLOCK = 2048


class Batch(NamedTuple):
    """A checked, masked batch: the arrays the engine sees and the reduction's constants."""

    x: jax.Array  # masked rows set to 0
    y: jax.Array
    keep: jax.Array  # [N] bool
    inv: jax.Array  # 1 / kept pairs (global) for "mean", 1 for "sum"; 0 when none is kept
    ct: Any
    masked: bool  # where was given


def batch(x, y, where, reduction: str, axis_name: Hashable | None) -> Batch:
    """Masks the pairs that ``where`` leaves out (their rows and columns become 0, so that
    whatever they hold cannot reach a sum) and counts the kept ones."""
    ct = args.compute_dtype(x, y)
    keep = jnp.ones((x.shape[0],), bool) if where is None else where
    if where is not None:
        x = jnp.where(keep[:, None], x, jnp.zeros((), x.dtype))
        y = jnp.where(keep[:, None], y, jnp.zeros((), y.dtype))
    inv = jnp.ones((), ct)
    if reduction == "mean":
        count = jnp.sum(keep.astype(ct))
        if axis_name is not None:
            count = lax.psum(count, axis_name)
        inv = jnp.where(count == 0, 0.0, 1.0 / jnp.where(count == 0, 1.0, count))
    return Batch(x, y, keep, inv, ct, where is not None)


def _static(rule, bt: Batch, s, b, axis_name, blocks) -> pairs.Static:
    n, m = bt.x.shape[0], bt.y.shape[0]
    tb, cb = blocks if blocks is not None else (TOKEN_BLOCK, COL_BLOCK)
    tb = Tokens(n, tb).tb
    return pairs.Static(rule, axis_name, (tb, min(cb, m)), bt.masked,
                        tuple(str(a.dtype) for a in (bt.x, bt.y, s, b)),  # type: ignore[arg-type]
                        tuple(vma.varying(a) for a in (bt.x, bt.y, s, b)))  # type: ignore[arg-type]


def pair_scale(bt: Batch, labels: jax.Array | None, axis_name: Hashable | None = None
               ) -> jax.Array:
    """Each pair's scale (:func:`softmax_jax._cross_entropy_terms.row_scale`): 1 kept, 0
    left out, NaN for a label outside ``[0, M)`` or naming a column left out. Under
    ``axis_name`` (the ring) labels are global column ids: ``M`` is the global count and,
    with ``where``, the kept flags of every device's columns are gathered (``[M]``
    booleans). Without ``where`` every column is kept."""
    if labels is None:
        return bt.keep.astype(bt.ct)
    m = bt.y.shape[0] * (1 if axis_name is None else lax.axis_size(axis_name))
    if bt.masked:
        cols = bt.keep if axis_name is None else lax.all_gather(bt.keep, axis_name, tiled=True)
        inside = (labels >= 0) & (labels < m)
        labels = jnp.where(inside & ~cols[jnp.where(inside, labels, 0)], -1, labels)
    scale, _ = _ce.row_scale(labels, m, None, bt.keep, bt.ct)
    return scale


def clip(x, y, s, labels, where, bidirectional: bool, reduction: str,
         axis_name: Hashable | None, blocks: tuple[int, int] | None = None) -> jax.Array:
    """CLIP on checked arguments (``s`` in the compute dtype); see
    :func:`softmax_jax.contrastive_loss`."""
    bt = batch(x, y, where, reduction, axis_name)
    zero = jnp.zeros((), bt.ct)
    static = _static(ClipRule(bidirectional), bt, s, zero, axis_name, blocks)
    scale = pair_scale(bt, labels, axis_name)
    half = 0.5 if bidirectional else 1.0
    if reduction == "none":
        terms = pairs.per_token(static, bt.x, bt.y, s, zero, bt.keep, labels, scale)
        return half * functools.reduce(jnp.add, terms)
    r = _ce.row_cotangent(half * bt.inv, scale)
    return pairs.reduced(static, bt.x, bt.y, s, zero, bt.keep, labels, r,
                         r if bidirectional else jnp.zeros_like(r))


def sigmoid(x, y, s, b, where, reduction: str, axis_name: Hashable | None,
            blocks: tuple[int, int] | None = None) -> jax.Array:
    """SigLIP on checked arguments; see :func:`softmax_jax.sigmoid_contrastive_loss`."""
    bt = batch(x, y, where, reduction, axis_name)
    static = _static(SigmoidRule(), bt, s, b, axis_name, blocks)
    scale = pair_scale(bt, None)
    if reduction == "none":
        (nll,) = pairs.per_token(static, bt.x, bt.y, s, b, bt.keep, None, scale)
        return nll
    r = _ce.row_cotangent(bt.inv, scale)
    return pairs.reduced(static, bt.x, bt.y, s, b, bt.keep, None, r, jnp.zeros_like(r))
