r"""The plain textbook formulas, written as directly as possible and differentiated by
``jax.grad`` (no custom rules).

Tests and benchmarks compare the library against these. They are deliberately naive: no
masking, no dtype handling, no special cases. The one concession is the max shift, applied
through ``lax.stop_gradient``: it leaves values and derivatives unchanged mathematically
(the notes' :math:`F = -\max_k z_k` argument) and lets the references run at scales where
:math:`e^{x}` alone would overflow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _shift(x: jax.Array, axis: int) -> jax.Array:
    return x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """:math:`a_j = e^{x_j} / \\sum_k e^{x_k}`."""
    e = jnp.exp(_shift(x, axis))
    return e / jnp.sum(e, axis=axis, keepdims=True)


def logsumexp(x: jax.Array, axis: int = -1) -> jax.Array:
    r""":math:`\log \sum_k e^{x_k}`."""
    m = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    return jnp.squeeze(m, axis) + jnp.log(jnp.sum(jnp.exp(x - m), axis=axis))


def log_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    r""":math:`\log a_j = x_j - \log \sum_k e^{x_k}`."""
    return x - jnp.expand_dims(logsumexp(x, axis), axis)


def sigmoid(x: jax.Array) -> jax.Array:
    r""":math:`\sigma(x) = 1 / (1 + e^{-x})`."""
    return 1.0 / (1.0 + jnp.exp(-x))


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    axis: int = -1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> jax.Array:
    r""":math:`-\sum_k y_k \log \mathrm{softmax}(z)_k + \lambda\,\mathrm{lse}^2`, labels smoothed
    to :math:`(1 - \epsilon) y + \epsilon / K`."""
    k = logits.shape[axis]
    y = (1.0 - label_smoothing) * labels + label_smoothing / k
    loss = -jnp.sum(y * log_softmax(logits, axis), axis=axis)
    return loss + z_loss * logsumexp(logits, axis) ** 2


def softmax_cross_entropy_with_integer_labels(
    logits: jax.Array,
    labels: jax.Array,
    axis: int = -1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> jax.Array:
    """The dense formula applied to ``one_hot(labels)``."""
    onehot = jax.nn.one_hot(labels, logits.shape[axis], dtype=logits.dtype, axis=axis)
    return softmax_cross_entropy(logits, onehot, axis, label_smoothing, z_loss)


def log_likelihood(probs: jax.Array, labels: jax.Array) -> jax.Array:
    r""":math:`C = -\sum_k y_k \log a_k`."""
    return -jnp.sum(labels * jnp.log(probs), axis=-1)


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r""":math:`-(y \log \sigma(z) + (1 - y) \log(1 - \sigma(z)))`, with
    :math:`\log \sigma(z) = -\log(1 + e^{-z})` so that large :math:`|z|` stays finite."""
    log_p = -jnp.logaddexp(0.0, -logits)
    log_not_p = -jnp.logaddexp(0.0, logits)
    return -(labels * log_p + (1.0 - labels) * log_not_p)


def quadratic_cost(activations: jax.Array, targets: jax.Array) -> jax.Array:
    r""":math:`C = \tfrac12 \lVert a - y \rVert^2` over the last axis."""
    return 0.5 * jnp.sum((activations - targets) ** 2, axis=-1)


def forward_kl_distillation(
    student_logits: jax.Array, teacher_logits: jax.Array, axis: int = -1,
    temperature: float = 1.0,
) -> jax.Array:
    r""":math:`T^2\,\mathrm{KL}(P \| Q) = T^2 \sum_c p_c (\log p_c - \log q_c)`, with
    :math:`P = \mathrm{softmax}(z_t / T)` and :math:`Q = \mathrm{softmax}(z_s / T)`."""
    log_p = log_softmax(teacher_logits / temperature, axis)
    log_q = log_softmax(student_logits / temperature, axis)
    return temperature**2 * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axis)


def reverse_kl_distillation(
    student_logits: jax.Array, teacher_logits: jax.Array, axis: int = -1,
    temperature: float = 1.0,
) -> jax.Array:
    r""":math:`T^2\,\mathrm{KL}(Q \| P)`."""
    return forward_kl_distillation(teacher_logits, student_logits, axis, temperature)


def jsd_distillation(
    student_logits: jax.Array, teacher_logits: jax.Array, axis: int = -1,
    temperature: float = 1.0, beta: float = 0.5,
) -> jax.Array:
    r""":math:`T^2 (\beta\,\mathrm{KL}(P \| M) + (1 - \beta)\,\mathrm{KL}(Q \| M))` with
    :math:`M = \beta P + (1 - \beta) Q`, the generalised Jensen-Shannon divergence."""
    p = softmax(teacher_logits / temperature, axis)
    q = softmax(student_logits / temperature, axis)
    m = beta * p + (1.0 - beta) * q
    kl_pm = jnp.sum(p * (jnp.log(p) - jnp.log(m)), axis=axis)
    kl_qm = jnp.sum(q * (jnp.log(q) - jnp.log(m)), axis=axis)
    return temperature**2 * (beta * kl_pm + (1.0 - beta) * kl_qm)


def distillation_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, axis: int = -1,
    temperature: float = 1.0, beta: float = 0.0,
) -> jax.Array:
    """The three cases, chosen by a concrete ``beta``: 0 forward KL, 1 reverse KL, else JSD."""
    if beta == 0.0:
        return forward_kl_distillation(student_logits, teacher_logits, axis, temperature)
    if beta == 1.0:
        return reverse_kl_distillation(student_logits, teacher_logits, axis, temperature)
    return jsd_distillation(student_logits, teacher_logits, axis, temperature, beta)


def kl_divergence(log_predictions: jax.Array, targets: jax.Array, axis: int = -1) -> jax.Array:
    r""":math:`\sum_c y_c (\log y_c - \log a_c)` (strictly positive targets)."""
    return jnp.sum(targets * (jnp.log(targets) - log_predictions), axis=axis)


def kl_divergence_with_log_targets(
    log_predictions: jax.Array, log_targets: jax.Array, axis: int = -1
) -> jax.Array:
    r""":math:`\sum_c e^{\log y_c} (\log y_c - \log a_c)`."""
    return jnp.sum(jnp.exp(log_targets) * (log_targets - log_predictions), axis=axis)


def softmax_entropy(x: jax.Array, axis: int = -1) -> jax.Array:
    r""":math:`H = -\sum_j a_j \log a_j` with :math:`a = \mathrm{softmax}(x)`."""
    log_a = log_softmax(x, axis)
    return -jnp.sum(jnp.exp(log_a) * log_a, axis=axis)


def log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    r""":math:`\log a_y = z_y - \log\sum_k e^{z_k}` of each row's token (last axis)."""
    return jnp.take_along_axis(log_softmax(logits), tokens[..., None], axis=-1)[..., 0]


def linear_logits(
    x: jax.Array, w: jax.Array, b: jax.Array | None = None, temperature: float = 1.0,
    soft_cap: float | None = None,
) -> jax.Array:
    r"""The logits of a linear head, :math:`z = \mathrm{cap}\tanh((xW + b)/\mathrm{cap})
    / T` (no cap when ``soft_cap`` is None)."""
    z = x @ w if b is None else x @ w + b
    if soft_cap is not None:
        z = soft_cap * jnp.tanh(z / soft_cap)
    return z / temperature


def grpo_objective(
    logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array, entropy: jax.Array,
    advantages: jax.Array, mask: jax.Array, clip: float = 0.2, kl_weight: float = 0.04,
    entropy_weight: float = 0.01,
) -> jax.Array:
    r"""The GRPO loss of ``[B, T]`` per-token arrays (``advantages`` ``[B]``, ``mask`` the
    completion tokens): with :math:`\rho = e^{\log\pi - \log\pi_{old}}` and the k3 estimator
    :math:`k_3 = e^{r - \log\pi} - (r - \log\pi) - 1` of :math:`\mathrm{KL}(\pi \| \pi_{ref})`
    (:math:`r = \log\pi_{ref}`), the masked token mean of
    :math:`-\min(\rho A, \mathrm{clip}(\rho, 1 - c, 1 + c) A) + \beta k_3 - \gamma H`."""
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * adv)
    diff = ref_logp - logp
    k3 = jnp.exp(diff) - diff - 1.0
    per_token = -surrogate + kl_weight * k3 - entropy_weight * entropy
    return jnp.sum(per_token * mask) / jnp.sum(mask)


def dpo_objective(
    chosen_logp: jax.Array, rejected_logp: jax.Array, ref_chosen_logp: jax.Array,
    ref_rejected_logp: jax.Array, chosen_mask: jax.Array, rejected_mask: jax.Array,
    beta: float = 0.1,
) -> jax.Array:
    r"""The DPO loss of ``[B, T]`` per-token log-probabilities summed over each sequence's
    masked tokens: the mean of :math:`-\log\sigma(\beta((\log\pi_c - \log\pi_{ref,c}) -
    (\log\pi_r - \log\pi_{ref,r})))`."""
    def total(a, m):
        return jnp.sum(a * m, axis=-1)

    margin = (total(chosen_logp, chosen_mask) - total(ref_chosen_logp, chosen_mask)) - (
        total(rejected_logp, rejected_mask) - total(ref_rejected_logp, rejected_mask))
    return jnp.mean(jnp.logaddexp(0.0, -beta * margin))
