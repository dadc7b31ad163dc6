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
