r"""The fused engine's interface: the heads it multiplies, its options, what a rule sees of a
block and returns, the per-row statistics and gradients it hands back, and :class:`Rule`,
everything a loss tells the engine (:mod:`.engine`) and the custom-VJP layer (:mod:`.vjp`).

A fused loss is a rule on the engine. To add one (read this module and one rule file,
:mod:`.linear_cross_entropy` or :mod:`.linear_distillation`):

1. In a new module ``softmax_jax/fused/<loss>.py``, write the rule as a frozen dataclass
   that subclasses :class:`Rule`; its fields are the call's static choices (it is part of a
   ``jax.jit`` static argument, so it must be hashable). The loss's traced hyper-parameters
   travel as ``params`` (a pytree, usually a NamedTuple), its constant inputs (labels, a
   teacher's head) as ``consts``.
2. Say what the blocks are made of: :meth:`Rule.heads` (head 0 is differentiated, any
   other head is a constant), :meth:`Rule.rows` (per-token arrays, handed to each block as
   :attr:`Block.rows`) and, if any, :meth:`Rule.classes` (per-class arrays, sliced to the
   block as :attr:`Block.classes`).
3. Say what the statistics passes keep, and declare the counts in :meth:`Rule.sizes`:
   :meth:`Rule.streams`, the ``[tokens, width]`` arrays whose online log-sum-exp the engine
   keeps (:attr:`RowStats.norms`); :meth:`Rule.first_sums`, additive per-row sums of the
   first pass; if needed, :meth:`Rule.second_sums` (a second pass over the finished
   normalisers) and :meth:`Rule.expectation_streams` (a KL between two streams, kept online).
4. Give the logit gradient of head 0, :meth:`Rule.dlogits`: :math:`r_i\,\partial\ell_i /
   \partial z` of one block, with any additive per-row sums (:meth:`Rule.grad_sizes` of
   them) that the hyper-parameters' cotangents need. The engine turns it into ``dx``, ``dW``,
   ``db`` and the soft cap's cotangent.
5. Give the per-row pieces of the custom VJP: :meth:`Rule.scale` (1 counted, 0 ignored, NaN
   invalid), :meth:`Rule.valid` (the traced hyper-parameters are in range),
   :meth:`Rule.row_loss` and :meth:`Rule.cotangents` (from the finished :class:`RowStats`);
   :meth:`Rule.denominator`, :meth:`Rule.weights` and :meth:`Rule.aux` have defaults.
6. Write the public function: check the arguments (:mod:`.args`:
   ``args.head``, ``args.reduction``, :meth:`~.layout.BlockLayout.resolve`,
   ``vma.check_vocab_axes`` for a sharded vocabulary, and the loss's own hyper-parameters
   with :func:`softmax_jax._validation.hyperparameter`), build the rule (the global
   vocabulary size is :func:`.blocks.num_classes`) and ``args.static(...)``, and call
   ``vjp.dispatch(static, x, w, b, consts, params, cap)``; it returns ``(loss, aux)``.
   Export the function from :mod:`softmax_jax.fused` and :mod:`softmax_jax`. (Where the
   rule and the function together would make a long module, the function goes beside it,
   as the cross-entropy's in :mod:`.linear_cross_entropy_api`.)
7. Test it against the unfused loss (values and ``jax.grad``, every reduction, both
   layouts of :class:`~.layout.BlockLayout`, and a vocabulary sharded under ``shard_map``),
   and derive its gradient in ``docs/derivations.md``.

The losses over a similarity matrix (CLIP, SigLIP) are rules of the pair engine instead,
declared the same way in :mod:`.pair_interface`.

To use another rule's terms (distillation's hard-label term is the cross-entropy), hold that
rule as a field and call its methods, or the public functions of its module
(:func:`.linear_cross_entropy.label_terms`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax import _cross_entropy_terms as _ce
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


class Sizes(NamedTuple):
    """How many of each per-row quantity a rule keeps in the statistics passes."""

    streams: int  # arrays whose online log-sum-exp is kept (RowStats.norms)
    first: int  # additive sums of the first pass (RowStats.first)
    second: int  # additive sums of the second pass (RowStats.second); 0: no second pass


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


class Grads(NamedTuple):
    """The engine's gradient outputs, weighted by the per-row factors ``r``."""

    dx: jax.Array  # compute dtype
    dw: jax.Array  # w's dtype (accumulated in the compute dtype)
    db: jax.Array | None  # compute dtype
    dcap: jax.Array  # scalar cotangent of the soft cap
    row_sums: tuple[jax.Array, ...]  # the rule's per-row gradient-pass sums, ``[N]``


class Rule(Protocol):
    r"""What a loss tells the engine and the custom-VJP layer. Per-row results are
    ``[tokens]`` arrays, blocks ``[tokens, width]``; ``consts`` and ``params`` are the
    rule's own pytrees (constant inputs, traced hyper-parameters), passed through as given.

    A rule subclasses this protocol (as a frozen dataclass) and so inherits the defaults of
    the optional methods; the others (``...`` bodies) it must define. The engine calls
    :meth:`sizes`, :meth:`expectation_streams`, :meth:`grad_sizes`, :meth:`streams`,
    :meth:`first_sums`, :meth:`second_sums` and :meth:`dlogits`; the custom-VJP layer calls
    the rest.
    """

    # ---- the engine's passes ---------------------------------------------------------------

    def sizes(self) -> Sizes:
        """How many streams, first-pass sums and second-pass sums the rule keeps."""
        ...

    def streams(self, block: Block, params: Tree) -> tuple[jax.Array, ...]:
        """The ``sizes().streams`` arrays whose online log-sum-exp the engine keeps, e.g.
        ``block.logits[0]`` (their normalisers are ``RowStats.norms``)."""
        ...

    def first_sums(self, block: Block, params: Tree) -> tuple[jax.Array, ...]:
        """The block's share of the additive per-row sums of the first pass (the first
        ``sizes().first - len(expectation_streams())`` of ``RowStats.first``)."""
        ...

    def expectation_streams(self) -> tuple[tuple[int, int], ...]:
        r"""Pairs ``(i, j)`` of streams whose :math:`\mathrm{KL}(\mathrm{softmax}(z_i) \|
        \mathrm{softmax}(z_j))` the first pass keeps online, each stream centred by its
        running maximum (:func:`~softmax_jax.fused.blocks.log_ratio_step`). They are the
        last ``len(expectation_streams())`` entries of ``RowStats.first`` and are counted in
        ``sizes().first``. Default: none."""
        return ()

    def second_sums(self, block: Block, stats: RowStats, params: Tree) -> tuple[jax.Array, ...]:
        """The block's share of the ``sizes().second`` per-row sums that need the finished
        normalisers (a second pass, run only when ``sizes().second > 0``). Default: none."""
        return ()

    def dlogits(
        self, block: Block, stats: RowStats, r: jax.Array, params: Tree
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        r"""``(r_i \partial\ell_i/\partial z, row sums)`` for head 0's (soft-capped) logits
        of the block: the ``grad_sizes()`` row sums are additive over blocks and come back
        as ``Grads.row_sums``."""
        ...

    def grad_sizes(self) -> int:
        """How many per-row sums :meth:`dlogits` returns. Default: 0."""
        return 0

    # ---- the custom-VJP layer --------------------------------------------------------------

    def heads(self, x: jax.Array, w: jax.Array, b: jax.Array | None,
              consts: Tree) -> tuple[Head, ...]:
        """The linear heads: ``Head(x, w, b)`` first (the differentiated one), then any
        constant head (a teacher's)."""
        ...

    def rows(self, consts: Tree) -> tuple[jax.Array, ...]:
        """Per-token arrays (``[N, ...]``) handed to each block as ``Block.rows``."""
        ...

    def classes(self, consts: Tree) -> tuple[jax.Array, ...]:
        """Per-class arrays (``[V]``, this shard's slice) handed to each block, sliced, as
        ``Block.classes``. Default: none."""
        return ()

    def scale(self, consts: Tree, num_classes: int | jax.Array, ct: np.dtype) -> jax.Array:
        """Each row's scale in ``ct``: 1 counted, 0 ignored, NaN invalid (a bad label)."""
        ...

    def denominator(self, consts: Tree, scale: jax.Array) -> jax.Array:
        """The divisor of ``"mean"``. Default: the number of counted rows."""
        return jnp.sum(scale != 0).astype(scale.dtype)

    def weights(self, consts: Tree, scale: jax.Array, factor: jax.Array) -> jax.Array:
        """The gradient's per-row factor ``r`` from the row scale and ``factor`` (``1 /
        den``, or the incoming per-row cotangent). Default: ``scale * factor``, exactly 0
        where either is 0 (:func:`~softmax_jax._cross_entropy_terms.row_cotangent`)."""
        return _ce.row_cotangent(factor, scale)

    def valid(self, params: Tree) -> jax.Array:
        """Whether the traced hyper-parameters are in range (a scalar bool); when not, the
        loss and every cotangent are NaN."""
        ...

    def row_loss(self, consts: Tree, scale: jax.Array, stats: RowStats,
                 params: Tree) -> jax.Array:
        """Each row's loss ``[N]``, times its scale, from the finished statistics, in the
        compute dtype. A rule with several outputs per row returns ``[N, k]`` and gets one
        cotangent column each in ``r``."""
        ...

    def cotangents(self, consts: Tree, scale: jax.Array, stats: RowStats,
                   row_sums: tuple[jax.Array, ...], r: jax.Array, params: Tree) -> Tree:
        """The cotangent of ``params`` (the same pytree), for row weights ``r``, from the
        statistics and the gradient pass's ``row_sums``."""
        ...

    def aux(self, stats: RowStats) -> tuple[jax.Array, ...]:
        """Per-token outputs returned beside the loss (without gradient unless
        :meth:`differentiable_aux`). Default: none."""
        return ()

    # ---- several differentiable outputs per row (the per-token strategy) -------------------

    def differentiable_aux(self) -> bool:
        """Whether :meth:`aux`'s outputs take cotangents; then :meth:`aux_weights` joins them
        to ``r`` and every reduction runs the per-token strategy. Default: False."""
        return False

    def aux_weights(self, r: jax.Array, g_aux: tuple[jax.Array, ...]) -> jax.Array:
        """The gradient pass's row weights with the auxiliary outputs' cotangents ``g_aux``
        joined, e.g. as more columns (``[N, k]``) that :meth:`dlogits` reads. Default:
        ``r``."""
        return r

