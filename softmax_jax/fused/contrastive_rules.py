r"""The rules of the contrastive losses on the pair engine (:class:`.pair_interface.PairRule`):
CLIP's bidirectional softmax cross-entropy (:class:`ClipRule`) and SigLIP's pairwise sigmoid
loss (:class:`SigmoidRule`), over :math:`z = s\,x y^\top + b`. The public functions are
:func:`softmax_jax.contrastive_loss` and :func:`softmax_jax.sigmoid_contrastive_loss`
(:mod:`.contrastive` calls the engine).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from softmax_jax import _cross_entropy_terms as _ce

from .blocks import Tokens, finished_shift
from .columns import kept
from .pair_interface import GradInputs, Outputs, PairRule, PairSizes, Stats, Tile


def _lse(m: jax.Array, s: jax.Array) -> jax.Array:
    """The finished log-sum-exp: 0 for a row with nothing kept (``s = 0``; its weight is 0),
    NaN for a row holding +inf (:func:`.blocks.finished_shift`), whose running sum may be
    +inf or NaN: neither may read as an empty row."""
    return jnp.where(s == 0, 0.0, finished_shift(m) + jnp.log(jnp.where(s == 0, 1.0, s)))


def _term(m: jax.Array, s: jax.Array, pos: jax.Array) -> jax.Array:
    r""":math:`\mathrm{lse} - z_+ = (m - z_+) + \log s`, with :math:`z_+` one of the row's
    own logits: :math:`m - z_+ \ge 0` and :math:`s \ge 1`, so the term is never negative,
    and it keeps its digits when it is much smaller than the logits. 0 for an empty row."""
    gap = finished_shift(m) - pos
    return jnp.where(s == 0, 0.0, gap + jnp.log(jnp.where(s == 0, 1.0, s)))


@dataclasses.dataclass(frozen=True)
class ClipRule(PairRule):
    r"""CLIP's rule: per row :math:`i` the term :math:`\mathrm{lse}_j z_{ij} - z_{i\ell_i}`
    and, when ``bidirectional``, per column :math:`j` the term :math:`\mathrm{lse}_i z_{ij} -
    z_{jj}`; the statistics pass also adds up each row's positive logit (``positives``). With
    :math:`L, L'` the rows' and columns' log-sum-exps,

    .. math::
        \delta_{ij} = r_i\,(e^{z_{ij} - L_i} - [j = \ell_i])
                    + r'_j\,(e^{z_{ij} - L'_j} - [i = j]).

    Outputs: rows ``(L, terms)``, columns ``(L', terms')`` (bidirectional only)."""

    bidirectional: bool
    positives: bool = True  # False in a gradient pass, where the terms are known

    def sizes(self) -> PairSizes:
        return PairSizes(True, self.bidirectional, 1 if self.positives else 0)

    def gradient_only(self) -> ClipRule:
        return dataclasses.replace(self, positives=False)

    def sums(self, tile: Tile) -> tuple[jax.Array, ...]:
        if not self.positives:
            return ()
        return (jnp.sum(kept(tile, jnp.where(tile.pos, tile.z, 0.0), 0.0), axis=1),)

    def outputs(self, stats: Stats, tokens: Tokens) -> Outputs:
        """The column :math:`j`'s positive is row :math:`j`'s, on this device."""
        pos = stats.sums[0]
        rows = (_lse(stats.row_m, stats.row_s), _term(stats.row_m, stats.row_s, pos))
        if not self.bidirectional:
            return Outputs(rows, ())
        return Outputs(rows, (_lse(stats.col_m, stats.col_s),
                              _term(stats.col_m, stats.col_s, tokens.unview(pos))))

    def terms(self, stats: Stats, outs: Outputs, tokens: Tokens) -> tuple[jax.Array, ...]:
        return (tokens.unview(outs.rows[1]), *outs.cols[1:])

    def grad_inputs(self, outs: Outputs, r_row: jax.Array, r_col: jax.Array) -> GradInputs:
        cols = (outs.cols[0], r_col) if self.bidirectional else ()
        return GradInputs((outs.rows[0], r_row), cols)

    def value(self, outs: Outputs, sums: tuple[jax.Array, ...], r_row: jax.Array,
              r_col: jax.Array) -> jax.Array:
        value = jnp.sum(_ce.times(r_row, outs.rows[1]))
        if self.bidirectional:
            value = value + jnp.sum(_ce.times(r_col, outs.cols[1]))
        return value

    def dlogits(self, tile: Tile, inputs: GradInputs) -> jax.Array:
        lse, r = inputs.rows
        dz = _ce.times(r[:, None], jnp.exp(tile.z - lse[:, None]) - tile.pos)
        if self.bidirectional:
            lse_c, r_c = inputs.cols
            dz = dz + _ce.times(r_c[None, :], jnp.exp(tile.z - lse_c[None, :]) - tile.pos)
        return dz


@dataclasses.dataclass(frozen=True)
class SigmoidRule(PairRule):
    r"""SigLIP's rule, with :math:`t_{ij} = 2[i = j] - 1`: no normaliser; the per-row sum
    :math:`\sum_j \log(1 + e^{-t_{ij} z_{ij}})` is the row's loss (a sum of every pass), and
    :math:`\delta_{ij} = r_i\,t_{ij}(\sigma(t_{ij} z_{ij}) - 1)`."""

    losses: bool = True  # False in a backward pass, where the losses are known

    def sizes(self) -> PairSizes:
        return PairSizes(False, False, 1 if self.losses else 0)

    def gradient_only(self) -> SigmoidRule:
        return dataclasses.replace(self, losses=False)

    def sums(self, tile: Tile) -> tuple[jax.Array, ...]:
        if not self.losses:
            return ()
        t = jnp.where(tile.pos, 1.0, -1.0)
        return (jnp.sum(kept(tile, jax.nn.softplus(-t * tile.z), 0.0), axis=1),)

    def grad_inputs(self, outs: Outputs, r_row: jax.Array, r_col: jax.Array) -> GradInputs:
        return GradInputs((r_row,), ())

    def value(self, outs: Outputs, sums: tuple[jax.Array, ...], r_row: jax.Array,
              r_col: jax.Array) -> jax.Array:
        return jnp.sum(_ce.times(r_row, sums[0]))

    def dlogits(self, tile: Tile, inputs: GradInputs) -> jax.Array:
        t = jnp.where(tile.pos, 1.0, -1.0)
        return _ce.times(inputs.rows[0][:, None], -t * jax.nn.sigmoid(-t * tile.z))
