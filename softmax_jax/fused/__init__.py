"""Fused linear + softmax losses for large vocabularies: the ``N x V`` logits of
``x @ w + b`` are never materialised.

- :func:`linear_softmax_cross_entropy`: softmax cross-entropy (smoothing, z-loss, soft cap,
  class weights, ``ignore_index``, per-token statistics);
- :func:`linear_softmax_distillation`: knowledge distillation from a teacher's linear head
  (forward KL, reverse KL, generalised JSD), optionally mixed with the hard-label loss;
- :func:`linear_log_probs`: per-token log-probabilities and entropies, for RL post-training
  losses built on top of them.

All run on one blockwise engine (:mod:`softmax_jax.fused.engine`) with a per-block rule
each, support vocabulary parallelism inside :func:`jax.shard_map` (``axis_name``), and take
their block sizes from :class:`BlockLayout`.
"""

from .layout import BlockLayout
from .linear_cross_entropy_api import FusedStats, linear_softmax_cross_entropy
from .linear_distillation import linear_softmax_distillation
from .log_probs import linear_log_probs

__all__ = [
    "BlockLayout",
    "FusedStats",
    "linear_log_probs",
    "linear_softmax_cross_entropy",
    "linear_softmax_distillation",
]
