"""GRPO on a checkable task, every log-probability and entropy from the fused head.

* :mod:`.task`: the task (reverse a sequence of symbols), its prompts and its reward;
* :mod:`.objective`: the policy's per-token log-probabilities and entropies through
  :func:`softmax_jax.linear_log_probs`, the GRPO loss on them, and the same loss on
  materialised logits (for the memory comparison);
* :mod:`.loop`: the supervised warm-up, sampling, group-normalised advantages, the updates,
  held-out evaluation and the checkpoint (``scripts/train_grpo.py``).
"""

from experiments.grpo.loop import (
    CHECKPOINT_NAME,
    GRPOConfig,
    GRPOResult,
    evaluate,
    plot_rewards,
    saved_step,
    step_memory,
    train,
)
from experiments.grpo.objective import (
    Batch,
    group_advantages,
    grpo_loss,
    materialised_grpo_loss,
    policy_log_probs,
)
from experiments.grpo.task import ReverseTask

__all__ = [
    "CHECKPOINT_NAME",
    "Batch",
    "GRPOConfig",
    "GRPOResult",
    "ReverseTask",
    "evaluate",
    "group_advantages",
    "grpo_loss",
    "materialised_grpo_loss",
    "plot_rewards",
    "policy_log_probs",
    "saved_step",
    "step_memory",
    "train",
]
