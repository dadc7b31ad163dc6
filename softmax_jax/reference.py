r"""The plain textbook formulas, written as directly as possible and differentiated by
``jax.grad`` (no custom rules).

Tests and benchmarks compare the library against these. They are deliberately naive: no
masking, no dtype handling, no special cases. The one concession is the max shift, applied
through ``lax.stop_gradient``: it leaves values and derivatives unchanged mathematically
(the notes' :math:`F = -\max_k z_k` argument) and lets the references run at scales where
:math:`e^{x}` alone would overflow.

Each formula is one ``jax.jit`` program (arguments that pick a branch or a shape, such as
``axis`` or ``reduction``, are static): a test pays one compile per call, and ``jax.grad``
of it two, where the same formula run op by op would compile every operation on its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _shift(x: jax.Array, axis: int) -> jax.Array:
    return x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))


@functools.partial(jax.jit, static_argnames="axis")
def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """:math:`a_j = e^{x_j} / \\sum_k e^{x_k}`."""
    e = jnp.exp(_shift(x, axis))
    return e / jnp.sum(e, axis=axis, keepdims=True)


@functools.partial(jax.jit, static_argnames="axis")
def logsumexp(x: jax.Array, axis: int = -1) -> jax.Array:
    r""":math:`\log \sum_k e^{x_k}`."""
    m = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    return jnp.squeeze(m, axis) + jnp.log(jnp.sum(jnp.exp(x - m), axis=axis))


@functools.partial(jax.jit, static_argnames="axis")
def log_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    r""":math:`\log a_j = x_j - \log \sum_k e^{x_k}`."""
    return x - jnp.expand_dims(logsumexp(x, axis), axis)


@jax.jit
def sigmoid(x: jax.Array) -> jax.Array:
    r""":math:`\sigma(x) = 1 / (1 + e^{-x})`."""
    return 1.0 / (1.0 + jnp.exp(-x))


@functools.partial(jax.jit, static_argnames="axis")
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


@functools.partial(jax.jit, static_argnames="axis")
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


@jax.jit
def log_likelihood(probs: jax.Array, labels: jax.Array) -> jax.Array:
    r""":math:`C = -\sum_k y_k \log a_k`."""
    return -jnp.sum(labels * jnp.log(probs), axis=-1)


@jax.jit
def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r""":math:`-(y \log \sigma(z) + (1 - y) \log(1 - \sigma(z)))`, with
    :math:`\log \sigma(z) = -\log(1 + e^{-z})` so that large :math:`|z|` stays finite."""
    log_p = -jnp.logaddexp(0.0, -logits)
    log_not_p = -jnp.logaddexp(0.0, logits)
    return -(labels * log_p + (1.0 - labels) * log_not_p)


@jax.jit
def quadratic_cost(activations: jax.Array, targets: jax.Array) -> jax.Array:
    r""":math:`C = \tfrac12 \lVert a - y \rVert^2` over the last axis."""
    return 0.5 * jnp.sum((activations - targets) ** 2, axis=-1)


@functools.partial(jax.jit, static_argnames="axis")
def forward_kl_distillation(
    student_logits: jax.Array, teacher_logits: jax.Array, axis: int = -1,
    temperature: float = 1.0,
) -> jax.Array:
    r""":math:`T^2\,\mathrm{KL}(P \| Q) = T^2 \sum_c p_c (\log p_c - \log q_c)`, with
    :math:`P = \mathrm{softmax}(z_t / T)` and :math:`Q = \mathrm{softmax}(z_s / T)`."""
    log_p = log_softmax(teacher_logits / temperature, axis)
    log_q = log_softmax(student_logits / temperature, axis)
    return temperature**2 * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axis)


@functools.partial(jax.jit, static_argnames="axis")
def reverse_kl_distillation(
    student_logits: jax.Array, teacher_logits: jax.Array, axis: int = -1,
    temperature: float = 1.0,
) -> jax.Array:
    r""":math:`T^2\,\mathrm{KL}(Q \| P)`."""
    return forward_kl_distillation(teacher_logits, student_logits, axis, temperature)


@functools.partial(jax.jit, static_argnames="axis")
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


@functools.partial(jax.jit, static_argnames="axis")
def kl_divergence(log_predictions: jax.Array, targets: jax.Array, axis: int = -1) -> jax.Array:
    r""":math:`\sum_c y_c (\log y_c - \log a_c)` (strictly positive targets)."""
    return jnp.sum(targets * (jnp.log(targets) - log_predictions), axis=axis)


@functools.partial(jax.jit, static_argnames="axis")
def kl_divergence_with_log_targets(
    log_predictions: jax.Array, log_targets: jax.Array, axis: int = -1
) -> jax.Array:
    r""":math:`\sum_c e^{\log y_c} (\log y_c - \log a_c)`."""
    return jnp.sum(jnp.exp(log_targets) * (log_targets - log_predictions), axis=axis)


@jax.jit
def weighted_softmax_cross_entropy_with_integer_labels(
    logits: jax.Array, labels: jax.Array, class_weights: jax.Array,
    label_smoothing: float = 0.0, z_loss: float = 0.0,
) -> jax.Array:
    r"""PyTorch's weighted, smoothed cross-entropy plus the z-loss, over the last axis:
    :math:`(1 - \epsilon) w_y (-\log a_y) + \frac{\epsilon}{K} \sum_c w_c (-\log a_c)
    + \lambda\,\mathrm{lse}(z)^2`."""
    log_a = log_softmax(logits)
    k = logits.shape[-1]
    hard = -class_weights[labels] * jnp.take_along_axis(log_a, labels[:, None], -1)[:, 0]
    uniform = -jnp.sum(class_weights * log_a, -1) / k
    return ((1 - label_smoothing) * hard + label_smoothing * uniform
            + z_loss * logsumexp(logits) ** 2)


@jax.jit
def weighted_softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, class_weights: jax.Array,
    label_smoothing: float = 0.0, z_loss: float = 0.0,
) -> jax.Array:
    r""":math:`-\sum_c w_c y'_c \log a_c + \lambda\,\mathrm{lse}(z)^2` with the smoothed labels
    :math:`y' = (1 - \epsilon) y + \epsilon / K`, over the last axis."""
    k = logits.shape[-1]
    y = (1 - label_smoothing) * labels + label_smoothing / k
    return -jnp.sum(class_weights * y * log_softmax(logits), -1) + z_loss * logsumexp(logits) ** 2


@jax.jit
def kl_of_log_probabilities(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    r""":math:`\sum_c a_c (\log a_c - \log b_c)` over the last axis, with :math:`0 \log 0 = 0`
    (a double ``where``, so that a zero :math:`a_c` adds nothing to values or gradients)."""
    pos = jnp.exp(log_a) > 0
    inner = jnp.where(pos, log_a, 0.0) - jnp.where(pos, log_b, 0.0)
    return jnp.sum(jnp.where(pos, jnp.exp(log_a) * inner, 0.0), axis=-1)


@jax.jit
def tempered_log_softmax(logits: jax.Array, temperature: jax.Array | float) -> jax.Array:
    r""":math:`\log \mathrm{softmax}(z / T)` over the last axis, with a :math:`-\infty` logit
    left at :math:`-\infty` (and out of the derivative in :math:`T`, which
    :math:`-\infty / T` would make NaN)."""
    fin = jnp.isfinite(logits)
    log_a = jax.nn.log_softmax(jnp.where(fin, logits, 0.0) / temperature, where=fin)
    return jnp.where(fin, log_a, -jnp.inf)


@functools.partial(jax.jit, static_argnames="kind")
def distillation_of_logits(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: jax.Array | float,
    beta: jax.Array | float, kind: str,
) -> jax.Array:
    r""":math:`T^2` times the forward KL (``kind="forward"``), the reverse KL (``"reverse"``)
    or the :math:`\beta`-weighted Jensen-Shannon divergence (``"jsd"``) of
    :math:`P = \mathrm{softmax}(z_t / T)` and :math:`Q = \mathrm{softmax}(z_s / T)`, with
    :math:`-\infty` logits allowed on either side; ``beta`` may be traced (``kind`` picks the
    case)."""
    log_q = tempered_log_softmax(student_logits, temperature)
    log_p = tempered_log_softmax(teacher_logits, temperature)
    if kind == "forward":
        d = kl_of_log_probabilities(log_p, log_q)
    elif kind == "reverse":
        d = kl_of_log_probabilities(log_q, log_p)
    else:
        log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
        d = beta * kl_of_log_probabilities(log_p, log_m) + (
            1 - beta) * kl_of_log_probabilities(log_q, log_m)
    return temperature**2 * d


def distillation_with_hard_labels(
    student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *,
    temperature: jax.Array | float, beta: jax.Array | float, hard_weight: jax.Array | float,
    smoothing: jax.Array | float, reduction: str, ignore_index: int = -100,
) -> jax.Array:
    r"""The fused distillation's per-row loss on whole rows of logits:
    :math:`h\,\mathrm{CE}_\epsilon(z_s, y) + (1 - h)\,T^2 D(P, Q)`, with ``beta`` choosing
    :math:`D` (0 forward KL, 1 reverse KL, else JSD); rows labelled ``ignore_index`` count 0
    and leave the mean's denominator."""
    kind = "forward" if beta == 0.0 else "reverse" if beta == 1.0 else "jsd"
    return _distillation_with_hard_labels(
        student_logits, teacher_logits, labels, temperature, beta, hard_weight, smoothing,
        ignore_index, kind, reduction)


@functools.partial(jax.jit, static_argnames=("kind", "reduction"))
def _distillation_with_hard_labels(
    student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
    temperature: jax.Array | float, beta: jax.Array | float, hard_weight: jax.Array | float,
    smoothing: jax.Array | float, ignore_index: int, kind: str, reduction: str,
) -> jax.Array:
    div = distillation_of_logits(student_logits, teacher_logits, temperature, beta, kind)
    log_a = log_softmax(student_logits)
    nll = -jnp.take_along_axis(log_a, jnp.clip(labels, 0)[:, None], axis=1)[:, 0]
    ce = (1 - smoothing) * nll - smoothing * jnp.mean(log_a, axis=1)
    per = hard_weight * ce + (1 - hard_weight) * div
    kept = labels != ignore_index
    per = jnp.where(kept, per, 0.0)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / kept.sum()


# Float64 NumPy, independent of JAX.


def np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """:math:`a_j = e^{x_j} / \\sum_k e^{x_k}` in float64 NumPy."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_logsumexp(x: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    r""":math:`\log \sum_k e^{x_k}` in float64 NumPy (:math:`-\infty` entries add nothing)."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=axis, keepdims=True)
    lse = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return lse if keepdims else np.squeeze(lse, axis)


def np_log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    r""":math:`x_j - \log \sum_k e^{x_k}` in float64 NumPy."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def np_kl(log_a: np.ndarray, log_b: np.ndarray) -> np.ndarray:
    r""":math:`\sum_c a_c (\log a_c - \log b_c)` over the last axis in float64 NumPy, with
    :math:`0 \log 0 = 0`."""
    a = np.exp(log_a)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def np_distillation(
    student_logits: np.ndarray, teacher_logits: np.ndarray, temperature: float, beta: float,
) -> np.ndarray:
    r""":math:`T^2` times the divergence of each row in float64 NumPy: forward KL
    :math:`\mathrm{KL}(P \| Q)` for ``beta == 0``, reverse KL for 1, else the
    :math:`\beta`-weighted Jensen-Shannon divergence with :math:`M = \beta P + (1 - \beta) Q`."""
    log_p = np_log_softmax(np.asarray(teacher_logits, np.float64) / temperature)
    log_q = np_log_softmax(np.asarray(student_logits, np.float64) / temperature)
    if beta == 0:
        d = np_kl(log_p, log_q)
    elif beta == 1:
        d = np_kl(log_q, log_p)
    else:
        with np.errstate(divide="ignore"):
            log_m = np.log(beta * np.exp(log_p) + (1 - beta) * np.exp(log_q))
        d = beta * np_kl(log_p, log_m) + (1 - beta) * np_kl(log_q, log_m)
    return temperature**2 * d


@functools.partial(jax.jit, static_argnames="axis")
def softmax_entropy(x: jax.Array, axis: int = -1) -> jax.Array:
    r""":math:`H = -\sum_j a_j \log a_j` with :math:`a = \mathrm{softmax}(x)`."""
    log_a = log_softmax(x, axis)
    return -jnp.sum(jnp.exp(log_a) * log_a, axis=axis)


@jax.jit
def log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    r""":math:`\log a_y = z_y - \log\sum_k e^{z_k}` of each row's token (last axis)."""
    return jnp.take_along_axis(log_softmax(logits), tokens[..., None], axis=-1)[..., 0]


@jax.jit
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


@jax.jit
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


@jax.jit
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
