"""softmax_jax: numerically stable softmax and cross-entropy for JAX, with analytic gradients.

Every function is pure, jit-compiled and differentiable in reverse mode through a
``jax.custom_vjp`` rule that implements the textbook derivative (for example the
cross-entropy gradient ``a - y``), so users get exact, memory-lean gradients inside their own
training loops. ``linear_softmax_cross_entropy`` fuses the output layer with the loss so that
the N x V logits of a large vocabulary are never materialised.
"""

from softmax_jax._logsumexp import logsumexp
from softmax_jax.activations import log_softmax, sigmoid, softmax
from softmax_jax.contrastive import contrastive_loss, sigmoid_contrastive_loss
from softmax_jax.dense_cross_entropy import softmax_cross_entropy
from softmax_jax.divergences import (
    distillation_loss,
    kl_divergence,
    kl_divergence_with_log_targets,
)
from softmax_jax.entropy import softmax_entropy
from softmax_jax.fused import (
    linear_log_probs,
    linear_softmax_cross_entropy,
    linear_softmax_distillation,
)
from softmax_jax.integer_cross_entropy import softmax_cross_entropy_with_integer_labels
from softmax_jax.losses import log_likelihood, quadratic_cost, sigmoid_binary_cross_entropy

__version__ = "0.2.0"

__all__ = [
    "contrastive_loss",
    "distillation_loss",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "linear_log_probs",
    "linear_softmax_cross_entropy",
    "linear_softmax_distillation",
    "log_likelihood",
    "log_softmax",
    "logsumexp",
    "quadratic_cost",
    "sigmoid",
    "sigmoid_binary_cross_entropy",
    "sigmoid_contrastive_loss",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_entropy",
]
