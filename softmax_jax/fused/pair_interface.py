r"""The pair engine's interface: what a loss over a similarity matrix
:math:`z = s\,x y^\top + b` (``x`` ``[N, D]``, ``y`` ``[M, D]``, rows and columns both
normalised, never materialised) tells the column-statistics passes (:mod:`.columns`, run
around a device ring by :mod:`.ring`) and its custom VJP (:mod:`.pairs`), and what it sees
of them: :class:`PairRule`, the tiles (:class:`Tile`), the statistics (:class:`Stats`) and
the named results a rule hands back.

How the engine runs a rule:

- ``"mean"``/``"sum"`` (:func:`.pairs.reduced`): when the rule keeps a normaliser
  (:meth:`PairRule.sizes`), a statistics pass, then :meth:`PairRule.outputs` of the
  finished :class:`Stats`, and a gradient pass of :meth:`PairRule.gradient_only`; without
  one, only a gradient pass, whose :meth:`PairRule.sums` give the terms. The value is
  :meth:`PairRule.value`.
- ``"none"`` (:func:`.pairs.per_token`): a statistics pass gives :meth:`PairRule.terms`;
  the backward pass runs a gradient pass of :meth:`PairRule.gradient_only` with the
  incoming cotangents as the weights.

Every gradient pass reads :meth:`PairRule.dlogits` of each tile with the tile's slice of
:meth:`PairRule.grad_inputs` (built from the outputs and the row and column weights
:math:`r`, :math:`r'`).

To add a pair loss (read this module and :mod:`.contrastive_rules`):

1. Write the rule as a frozen dataclass that subclasses :class:`PairRule`, beside
   ``ClipRule`` and ``SigmoidRule`` in :mod:`.contrastive_rules`; its fields are the call's
   static choices (it is part of a ``jax.jit`` static argument, so it must be hashable).
2. Declare in :meth:`~PairRule.sizes` which online log-sum-exps the statistics pass keeps
   (the rows', the columns') and how many additive per-row sums :meth:`~PairRule.sums` adds
   per tile (a positive's logit; a loss without a normaliser, such as SigLIP's, is itself
   such a sum).
3. From the finished statistics, give :meth:`~PairRule.outputs` (per-row and per-column
   arrays: log-sum-exps, terms), the per-token terms (:meth:`~PairRule.terms`), and the
   reduced value for known weights (:meth:`~PairRule.value`).
4. Give the logit gradient of a tile, :meth:`~PairRule.dlogits`: :math:`\delta_{ij} = r_i\,
   \partial \ell_i / \partial z_{ij} + r'_j\,\partial \ell'_j / \partial z_{ij}`, both
   directions together, from the per-row and per-column arrays of
   :meth:`~PairRule.grad_inputs`; and :meth:`~PairRule.gradient_only`, the rule without the
   sums that a statistics pass already gave. The engine turns :math:`\delta` into
   :math:`\bar x, \bar y, \bar s, \bar b`; a pair left out (``where``) gets :math:`\delta = 0`.
5. Write the public function in :mod:`softmax_jax.contrastive` (argument checks) and its
   call in :mod:`.contrastive` (``batch``, the static settings, the per-pair scale, then
   ``pairs.reduced`` or ``pairs.per_token``); export it from :mod:`softmax_jax`.
6. Add its float64 formula to :mod:`softmax_jax.reference_contrastive`, test values and
   ``jax.grad`` against it (every reduction, ``where``, a ring under ``shard_map`` in
   ``tests/multidevice``), and derive its gradient in ``docs/derivations.md``.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax

from .blocks import Tokens


class Tile(NamedTuple):
    """What a pair rule sees of one ``[tokens, width]`` tile."""

    z: jax.Array  # logits s * x y^T + b, compute dtype
    keep: jax.Array | None  # both the row and the column are kept (None: all are)
    pos: jax.Array  # the pair is a positive (the row's target == global column id)


class Stats(NamedTuple):
    """Online statistics: rows ``[tb, nt]`` (views of the token blocks, see
    :class:`~softmax_jax.fused.blocks.Tokens`), columns ``[M_b]`` (this device's block)."""

    row_m: jax.Array  # running maximum of each row
    row_s: jax.Array  # running sum of exp(z - row_m)
    sums: tuple[jax.Array, ...]  # the rule's additive per-row sums (PairRule.sums)
    col_m: jax.Array
    col_s: jax.Array


class PairSizes(NamedTuple):
    """What the statistics pass keeps for a rule."""

    row_lse: bool  # each row's online log-sum-exp
    col_lse: bool  # each column's online log-sum-exp
    sums: int  # additive per-row sums (how many PairRule.sums returns)


class Outputs(NamedTuple):
    """What a rule keeps of a finished statistics pass (both empty without one)."""

    rows: tuple[jax.Array, ...]  # per row, [tb, nt] views
    cols: tuple[jax.Array, ...]  # per column of this device's block, [M_b]


class GradInputs(NamedTuple):
    """What :meth:`PairRule.dlogits` reads beside the tile: per-row arrays (``[tb, nt]``
    views; a tile gets its token block's ``[tb]``) and per-column arrays (``[M_b]``; a tile
    gets its ``[width]`` slice). The column arrays travel around the ring with ``y``."""

    rows: tuple[jax.Array, ...]
    cols: tuple[jax.Array, ...]


class PairRule(Protocol):
    r"""What a loss over a similarity matrix tells the pair engine and its custom VJP.

    A rule subclasses this protocol (as a frozen dataclass) and so inherits the defaults of
    the optional methods; the others (``...`` bodies) it must define. Rows are this
    device's rows of ``x``, columns its block of ``y``; :math:`r` and :math:`r'` are the
    rows' and the columns' weights (``1 / pairs`` for the mean, the incoming cotangents for
    ``"none"``; each times the pair's scale), in the compute dtype.
    """

    # ---- the passes over the tiles -------------------------------------------------------

    def sizes(self) -> PairSizes:
        """Which log-sum-exps the statistics pass keeps and how many per-row sums."""
        ...

    def sums(self, tile: Tile) -> tuple[jax.Array, ...]:
        """The tile's share (``[tb]`` each) of the ``sizes().sums`` additive per-row sums,
        kept by every pass (:attr:`Stats.sums`, and the gradient pass's sums handed to
        :meth:`value`); pairs left out must add 0. Default: none."""
        return ()

    def dlogits(self, tile: Tile, inputs: GradInputs) -> jax.Array:
        r""":math:`\delta = r\,\partial\ell/\partial z + r'\,\partial\ell'/\partial z` of the
        tile ``[tb, width]``, from the tile's slices of :meth:`grad_inputs` (the engine
        zeroes the pairs left out)."""
        ...

    def gradient_only(self) -> PairRule:
        """The rule of a gradient pass run after a statistics pass, whose outputs already
        hold the terms: without the sums the statistics pass gave. Default: the rule."""
        return self

    # ---- the custom VJP ------------------------------------------------------------------

    def outputs(self, stats: Stats, tokens: Tokens) -> Outputs:
        """The per-row and per-column arrays kept of the finished statistics (``tokens``
        views and unviews the rows); they are the per-token strategy's residuals. Default:
        none."""
        return Outputs((), ())

    def terms(self, stats: Stats, outs: Outputs, tokens: Tokens) -> tuple[jax.Array, ...]:
        """The per-token strategy's terms: ``[N]`` per-row terms, then any ``[M_b]``
        per-column ones, unscaled (the engine multiplies each by its row's scale). Default:
        the per-row sums of the statistics pass (a loss without a normaliser)."""
        return tuple(tokens.unview(a) for a in stats.sums)

    def grad_inputs(self, outs: Outputs, r_row: jax.Array, r_col: jax.Array) -> GradInputs:
        """What :meth:`dlogits` reads, from the outputs, the rows' weights ``r_row``
        (``[tb, nt]`` views) and the columns' ``r_col`` (``[M_b]``)."""
        ...

    def value(self, outs: Outputs, sums: tuple[jax.Array, ...], r_row: jax.Array,
              r_col: jax.Array) -> jax.Array:
        r"""The reduced loss :math:`\sum_i r_i\,\ell_i + \sum_j r'_j\,\ell'_j` of this device's
        rows and columns, from the outputs or the gradient pass's per-row ``sums`` (views),
        with the weights as in :meth:`grad_inputs`."""
        ...
