"""The engine's interface: the heads it multiplies, its options, what a rule sees of a block
and returns, and the per-row statistics and gradients it hands back."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple, Protocol

import jax

from softmax_jax._normalizer import Normalizer

from .layout import BlockLayout

Tree = Any


class Head(NamedTuple):
    """One linear head: logits ``x @ w + b`` (local vocabulary slice under ``axis_name``)."""

    x: jax.Array
    w: jax.Array
    b: jax.Array | None


class Options(NamedTuple):
    """Static settings of the engine for one call."""

    axis_name: Hashable | None
    layout: BlockLayout
    capped: bool  # soft cap on head 0 (the cap's value is traced)
    want_argmax: bool  # argmax of head 0's logits in the statistics pass


class Block(NamedTuple):
    """What a rule sees of one ``[tokens, width]`` tile."""

    logits: tuple[jax.Array, ...]  # per head, in the compute dtype; head 0 soft-capped
    first_class: jax.Array  # global class id of column 0
    num_classes: int | jax.Array  # the global vocabulary size
    classes: tuple[jax.Array, ...]  # the rule's per-class arrays, sliced to the block
    rows: tuple[jax.Array, ...]  # the rule's per-token arrays for these tokens


class RowStats(NamedTuple):
    """Per-row results of the statistics passes (global over a sharded vocabulary)."""

    norms: tuple[Normalizer, ...]  # one per stream, arrays ``[rows, 1]``
    first: tuple[jax.Array, ...]
    second: tuple[jax.Array, ...]
    argmax: jax.Array | None


class Rule(Protocol):
    r"""What a loss tells the engine: a hashable NamedTuple of static choices with these
    methods (per-row results are ``[tokens]`` arrays, blocks ``[tokens, width]``).

    - ``sizes()``: ``(streams, first sums, second sums)``, how many of each the rule uses;
    - ``grad_sizes()``: how many per-row sums ``dlogits`` returns;
    - ``streams(block, params)``: the arrays whose online log-sum-exp the engine keeps;
    - ``first_sums(block, params)``: additive per-row sums of the first pass;
    - ``second_sums(block, stats, params)``: additive per-row sums that need the finished
      normalisers (a second pass; only when ``sizes()[2] > 0``);
    - ``dlogits(block, stats, r, params)``: ``(r_i * dloss/dz, per-row sums)`` for head 0;
    - optionally ``expectation_streams()``: pairs ``(i, j)`` of streams whose
      :math:`\mathrm{KL}(\mathrm{softmax}(z_i) \| \mathrm{softmax}(z_j))` the first pass
      keeps online, each stream centred by its running maximum (the last
      ``len(expectation_streams())`` first sums;
      :func:`~softmax_jax.fused.blocks.log_ratio_step`).

    The custom-VJP layer (:mod:`softmax_jax.fused.vjp`) also calls ``heads``, ``rows``,
    ``classes``, ``scale``, ``denominator``, ``weights``, ``valid`` (whether the traced
    hyper-parameters are in range), ``row_loss``, ``cotangents`` and ``aux``.
    """

    def sizes(self) -> tuple[int, int, int]: ...

    def grad_sizes(self) -> int: ...

    def streams(self, block: Block, params: Tree) -> tuple[jax.Array, ...]: ...

    def first_sums(self, block: Block, params: Tree) -> tuple[jax.Array, ...]: ...

    def second_sums(self, block: Block, stats: RowStats, params: Tree) -> tuple[jax.Array, ...]:
        ...

    def dlogits(
        self, block: Block, stats: RowStats, r: jax.Array, params: Tree
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]: ...


class Grads(NamedTuple):
    """The engine's gradient outputs, weighted by the per-row factors ``r``."""

    dx: jax.Array  # compute dtype
    dw: jax.Array  # w's dtype (accumulated in the compute dtype)
    db: jax.Array | None  # compute dtype
    dcap: jax.Array  # scalar cotangent of the soft cap
    row_sums: tuple[jax.Array, ...]  # the rule's per-row gradient-pass sums, ``[N]``
