r"""Contrastive losses over :math:`z = s\,x y^\top (+\, b)` without materialising ``z``:
CLIP's bidirectional softmax cross-entropy and SigLIP's pairwise sigmoid loss.

Both are rules of the column-statistics engine (:mod:`.columns`), run around a device ring
(:mod:`.ring`) under ``axis_name``, with the ``custom_vjp`` of :mod:`.pairs`.

CLIP's terms per row :math:`i` and column :math:`j` are the two log-sum-exps
:math:`L_i = \mathrm{lse}_j z_{ij}` and :math:`L'_j = \mathrm{lse}_i z_{ij}`; the positive
logit :math:`z_{i,\ell_i}` is an O(ND) dot product outside the tiles, differentiated
directly. With weights :math:`r_i` (rows) and :math:`r'_j` (columns) the tile's logit
gradient is

.. math::
    \delta_{ij} = r_i\,e^{z_{ij} - L_i} + r'_j\,e^{z_{ij} - L'_j},

(:math:`r = r' = 1/(2N)` for the mean), and the positives add :math:`-(r_i + r'_i)` on the
diagonal through the dot products. SigLIP, with :math:`t_{ij} = 2[i = j] - 1`, has no
normaliser: its term is :math:`\sum_j \log(1 + e^{-t_{ij} z_{ij}})` and
:math:`\delta_{ij} = r_i\,t_{ij}(\sigma(t_{ij} z_{ij}) - 1)`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import args, pairs, vma
from .blocks import Tokens, finished_shift
from .columns import Stats, Tile, kept

# Tile of the similarity matrix: rows of x per token block, columns of y per column block.
TOKEN_BLOCK = 1024
COL_BLOCK = 2048


def _lse(m: jax.Array, s: jax.Array) -> jax.Array:
    """The finished log-sum-exp: 0 for a row with nothing kept (``s = 0``; its weight is 0),
    NaN for a row holding +inf (:func:`.blocks.finished_shift`), whose running sum may be
    +inf or NaN: neither may read as an empty row."""
    return jnp.where(s == 0, 0.0, finished_shift(m) + jnp.log(jnp.where(s == 0, 1.0, s)))


class ClipRule(NamedTuple):
    """CLIP's rule: the row log-sum-exp, and the column one when ``bidirectional``."""

    bidirectional: bool

    @property
    def normalisers(self) -> tuple[bool, bool]:
        """Whether the pass keeps the rows' and the columns' log-sum-exp."""
        return True, self.bidirectional

    @property
    def row_sums(self) -> int:
        return 0

    def gradient_only(self) -> ClipRule:
        return self

    def sums(self, tile: Tile) -> tuple[jax.Array, ...]:
        return ()

    def outputs(self, st: Stats) -> tuple[jax.Array, ...]:
        """``(L, L')``: rows as ``[tb, nt]`` views, columns ``[M_b]``."""
        cols = (_lse(st.col_m, st.col_s),) if self.bidirectional else ()
        return (_lse(st.row_m, st.row_s), *cols)

    def terms(self, outs: tuple, unview) -> tuple[jax.Array, ...]:
        return (unview(outs[0]), *outs[1:])

    def aux(self, outs: tuple, r_row: jax.Array, r_col: jax.Array) -> tuple[tuple, tuple]:
        cols = (outs[1], r_col) if self.bidirectional else ()
        return (outs[0], r_row), cols

    def value(self, outs: tuple, sums: tuple, r_row: jax.Array, r_col: jax.Array):
        value = jnp.sum(jnp.where(r_row == 0, 0.0, r_row * outs[0]))
        if self.bidirectional:
            value = value + jnp.sum(jnp.where(r_col == 0, 0.0, r_col * outs[1]))
        return value

    def dlogits(self, tile: Tile, rows: tuple, cols: tuple) -> jax.Array:
        lse, r = rows
        dz = r[:, None] * jnp.exp(tile.z - lse[:, None])
        if self.bidirectional:
            lse_c, r_c = cols
            dz = dz + r_c[None, :] * jnp.exp(tile.z - lse_c[None, :])
        return dz


class SigmoidRule(NamedTuple):
    """SigLIP's rule: no normaliser; the pass's row sums are the per-row losses."""

    row_sums: int = 1  # 0 in a backward pass, where the losses are known

    @property
    def normalisers(self) -> tuple[bool, bool]:
        return False, False

    def gradient_only(self) -> SigmoidRule:
        return self._replace(row_sums=0)

    def sums(self, tile: Tile) -> tuple[jax.Array, ...]:
        if not self.row_sums:
            return ()
        t = jnp.where(tile.pos, 1.0, -1.0)
        return (jnp.sum(kept(tile, jax.nn.softplus(-t * tile.z), 0.0), axis=1),)

    def aux(self, outs: Any, r_row: jax.Array, r_col: jax.Array) -> tuple[tuple, tuple]:
        return (r_row,), ()

    def value(self, outs: Any, sums: tuple, r_row: jax.Array, r_col: jax.Array):
        return jnp.sum(jnp.where(r_row == 0, 0.0, r_row * sums[0]))

    def dlogits(self, tile: Tile, rows: tuple, cols: tuple) -> jax.Array:
        t = jnp.where(tile.pos, 1.0, -1.0)
        return -(rows[0][:, None] * t) * jax.nn.sigmoid(-t * tile.z)


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


def positives(bt: Batch, s: jax.Array, labels: jax.Array | None) -> jax.Array:
    r"""The positive logits :math:`z_{i,\ell_i} = s\,x_i \cdot y_{\ell_i}` (the diagonal
    without labels), 0 for a pair left out; NaN for a label outside ``[0, M)`` or naming a
    column left out."""
    x, y = bt.x.astype(bt.ct), bt.y.astype(bt.ct)
    if labels is None:
        pos = s * jnp.sum(x * y, axis=1)
    else:
        inside = (labels >= 0) & (labels < y.shape[0])
        lab = jnp.where(inside, labels, 0)
        pos = s * jnp.sum(x * y[lab], axis=1)
        pos = jnp.where(inside & bt.keep[lab], pos, jnp.nan)
    return jnp.where(bt.keep, pos, 0.0)


def clip(x, y, s, labels, where, bidirectional: bool, reduction: str,
         axis_name: Hashable | None, blocks: tuple[int, int] | None = None) -> jax.Array:
    """CLIP on checked arguments (``s`` in the compute dtype); see
    :func:`softmax_jax.contrastive_loss`."""
    bt = batch(x, y, where, reduction, axis_name)
    zero = jnp.zeros((), bt.ct)
    static = _static(ClipRule(bidirectional), bt, s, zero, axis_name, blocks)
    pos = positives(bt, s, labels)
    half = 0.5 if bidirectional else 1.0
    if reduction == "none":
        terms = pairs.per_token(static, bt.x, bt.y, s, zero, bt.keep)
        loss = half * sum(terms) - pos
        return jnp.where(bt.keep, loss, 0.0)
    r = jnp.where(bt.keep, half * bt.inv, 0.0)
    lse_part = pairs.reduced(static, bt.x, bt.y, s, zero, bt.keep, r,
                             r if bidirectional else jnp.zeros_like(r))
    pos_part = jnp.sum(jnp.where(bt.keep, bt.inv * pos, 0.0))
    if axis_name is not None:
        pos_part = vma.total(pos_part, axis_name)
    return lse_part - pos_part


def sigmoid(x, y, s, b, where, reduction: str, axis_name: Hashable | None,
            blocks: tuple[int, int] | None = None) -> jax.Array:
    """SigLIP on checked arguments; see :func:`softmax_jax.sigmoid_contrastive_loss`."""
    bt = batch(x, y, where, reduction, axis_name)
    static = _static(SigmoidRule(), bt, s, b, axis_name, blocks)
    if reduction == "none":
        (nll,) = pairs.per_token(static, bt.x, bt.y, s, b, bt.keep)
        return jnp.where(bt.keep, nll, 0.0)
    r = jnp.where(bt.keep, bt.inv, 0.0)
    return pairs.reduced(static, bt.x, bt.y, s, b, bt.keep, r, jnp.zeros_like(r))
