r"""Distillation and Kullback-Leibler divergences with analytic ``custom_vjp`` gradients.

:func:`distillation_loss` compares two sets of logits through their temperature-scaled
softmaxes (forward KL, reverse KL, or the generalised Jensen-Shannon divergence); its terms
live in :mod:`softmax_jax._distillation_terms`, shared with the blockwise large-vocabulary
engine. :func:`kl_divergence` and :func:`kl_divergence_with_log_targets` are optax's
functions of the same names, as drop-ins.

Like the losses, these return per-example values, compute in at least float32 and return
results (and gradients) in the inputs' dtypes. The distillation rule saves the inputs and
O(rows) per-row numbers (two normalisers and two KL sums), never an N x V tensor: the
softmaxes are recomputed in the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax import _axes
from softmax_jax import _distillation_terms as _terms
from softmax_jax import _validation as _v
from softmax_jax._normalizer import Normalizer, masked_fill

__all__ = ["distillation_loss", "kl_divergence", "kl_divergence_with_log_targets"]


# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------


def _scaled(student, teacher, mask, temperature):
    r""":math:`s = z_s / T` and :math:`t = z_t / T`, masked classes at :math:`-\infty`."""
    ct = temperature.dtype
    s = masked_fill(student.astype(ct), mask, -jnp.inf) / temperature
    t = masked_fill(teacher.astype(ct), mask, -jnp.inf) / temperature
    return s, t


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _distill(student, teacher, mask, temperature, beta, axis, kind):
    return _distill_fwd(student, teacher, mask, temperature, beta, axis, kind)[0]


def _distill_fwd(student, teacher, mask, temperature, beta, axis, kind):
    s, t = _scaled(student, teacher, mask, temperature)
    norm_s, norm_t = Normalizer.of(s, axis), Normalizer.of(t, axis)
    log_q, log_p = norm_s.log_prob(s), norm_t.log_prob(t)
    log_m = _terms.log_mixture(log_p, log_q, beta, kind)
    rows = _terms.RowSums.of(_terms.element_terms(log_p, log_q, log_m, kind), axis)
    loss = jnp.squeeze(_terms.row_loss(rows, temperature, beta, kind), axis)
    if mask is not None:
        loss = jnp.where(jnp.any(jnp.broadcast_to(mask, student.shape), axis=axis), loss, 0.0)
    out_dtype = jnp.result_type(student, teacher)
    res = (student, teacher, mask, temperature, beta, norm_s, norm_t, rows)
    return loss.astype(out_dtype), res


def _distill_bwd(axis, kind, res, g):
    r"""Distillation gradients (:mod:`softmax_jax._distillation_terms` has each formula).

    With :math:`\ell = T^2 D(z_s / T, z_t / T)`: :math:`\bar z_s = \bar g\,T\,\partial D/
    \partial s` (forward KL: :math:`T (Q - P)`), :math:`\bar z_t = \bar g\,T\,\partial D/
    \partial t`, :math:`\bar T = \bar g\,(2 T D - T \sum_c (\partial D/\partial s_c\,s_c +
    \partial D/\partial t_c\,t_c))` and :math:`\bar\beta = \bar g\,T^2\,(K_P - K_Q)`.
    Saved: the inputs, the two normalisers and the row sums :math:`K_P, K_Q`, all O(rows)
    beyond the inputs; :math:`\log q` and :math:`\log p` are recomputed element-wise.
    """
    student, teacher, mask, temperature, beta, norm_s, norm_t, rows = res
    # Fenced, so that XLA recomputes z/T - m here instead of keeping the forward pass's
    # (on CPU it then wrote one N x V array per head: 1500 MiB of temporaries at
    # 4096 x 32000 against 500 fenced, for a 5-15% faster run; memory wins).
    norm_s, norm_t = norm_s.fenced(), norm_t.fenced()
    s, t = _scaled(student, teacher, mask, temperature)
    log_q, log_p = norm_s.log_prob(s), norm_t.log_prob(t)
    log_m = _terms.log_mixture(log_p, log_q, beta, kind)
    ds = _terms.student_grad(log_p, log_q, log_m, rows, beta, kind)
    dt = _terms.teacher_grad(log_p, log_q, log_m, rows, beta, kind)
    g_row = jnp.expand_dims(g.astype(temperature.dtype), axis)
    if mask is not None:
        g_row = jnp.where(jnp.any(mask, axis=axis, keepdims=True), g_row, 0.0)
    ok = _terms.valid_hyperparameters(temperature, beta)
    g_row = jnp.where(ok, g_row, jnp.nan)
    scale = g_row * temperature
    d_student = masked_fill(_terms.times(scale, ds), mask, 0.0)
    d_teacher = masked_fill(_terms.times(scale, dt), mask, 0.0)
    t_sum = jnp.sum(_terms.temperature_term(ds, log_q, dt, log_p), axis=axis, keepdims=True)
    div = _terms.divergence(rows, beta, kind)
    d_temp = jnp.sum(_terms.times(g_row, _terms.temperature_cotangent(temperature, div, t_sum)))
    d_beta = jnp.sum(_terms.times(g_row, _terms.beta_cotangent(temperature, rows, beta, kind)))
    return (d_student.astype(student.dtype), d_teacher.astype(teacher.dtype), None,
            d_temp.astype(temperature.dtype), d_beta.astype(beta.dtype))


_distill.defvjp(_distill_fwd, _distill_bwd)
_distill_jit = jax.jit(_distill, static_argnums=(5, 6))


def distillation_loss(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    temperature: float | jax.typing.ArrayLike = 1.0,
    beta: float | jax.typing.ArrayLike = 0.0,
) -> jax.Array:
    r"""Knowledge-distillation loss between student and teacher logits, per example.

    With :math:`P = \mathrm{softmax}(z_t / T)`, :math:`Q = \mathrm{softmax}(z_s / T)` and
    :math:`M = \beta P + (1 - \beta) Q`:

    .. math::
        \ell = T^2 \begin{cases}
          \mathrm{KL}(P \| Q) & \beta = 0 \text{ (Hinton's distillation)} \\
          \mathrm{KL}(Q \| P) & \beta = 1 \text{ (reverse KL)} \\
          \beta\,\mathrm{KL}(P \| M) + (1 - \beta)\,\mathrm{KL}(Q \| M) & 0 < \beta < 1
            \text{ (generalised JSD, as in GKD)}
        \end{cases}

    Gradients (a ``custom_vjp``) for both logits, the temperature and beta. The student's
    forward-KL gradient is :math:`T (Q - P)`, the notes' :math:`a - y` with a soft target;
    docs/derivations.md derives the rest. The loss jumps at :math:`\beta = 0` and
    :math:`\beta = 1` (the JSD tends to 0 there), so its derivative with respect to a traced
    ``beta`` of exactly 0 or 1 is NaN; inside :math:`(0, 1)` it is
    :math:`T^2 (\mathrm{KL}(P \| M) - \mathrm{KL}(Q \| M))`.

    Zero probabilities: a teacher class at :math:`-\infty` adds nothing to the forward KL or
    the JSD (finite loss and gradients); a class with teacher mass whose student logit is
    :math:`-\infty` makes the forward KL :math:`+\infty` (its true value, and likewise the
    reverse KL for the opposite case); the derivatives of such an infinite example with
    respect to the teacher logits, :math:`T` and :math:`\beta` are NaN (the student's stay
    :math:`T (Q - P)`). The scaled logits :math:`z / T` are formed first, so with
    :math:`T < 1` a logit beyond :math:`T` times the largest float overflows.

    Args:
      student_logits: floating-point student logits :math:`z_s`, e.g. ``[batch, classes]``.
      teacher_logits: teacher logits :math:`z_t` of the same shape (differentiable too; wrap
        them in ``jax.lax.stop_gradient`` for a frozen teacher).
      axis: the class axis, a tuple of axes taken together, or None for all axes.
      where: optional boolean mask broadcasting to the logits' shape (a per-row mask is
        ``(N, 1)``); masked classes take no part in either softmax; a fully masked row gives
        loss 0 and gradient 0.
      temperature: :math:`0 < T < \infty`. A concrete value :math:`\le 0` or infinite raises
        ``ValueError``; a traced one (under ``jit``) cannot be checked and gives NaN.
      beta: :math:`\beta \in [0, 1]`. Out of range: ``ValueError`` if concrete, NaN if
        traced.

    Returns:
      Per-example losses: the logits' shape without ``axis``, in their (promoted) dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> student, teacher = jnp.array([1.0, 2.0, 3.0]), jnp.array([3.0, 2.0, 1.0])
      >>> print(sj.distillation_loss(student, teacher, temperature=2.0))
      1.2806
      >>> print(jax.grad(sj.distillation_loss)(student, teacher))  # Q - P
      [-0.5752  0.0000  0.5752]
      >>> print(sj.distillation_loss(student, teacher, beta=0.5))
      0.2476

    References:
      G. Hinton, O. Vinyals, J. Dean, `Distilling the Knowledge in a Neural Network
      <https://arxiv.org/abs/1503.02531>`_, 2015.

      R. Agarwal et al., `On-Policy Distillation of Language Models: Learning from
      Self-Generated Mistakes <https://arxiv.org/abs/2306.13649>`_ (GKD), 2024.
    """
    student = _v.as_float_array("student_logits", student_logits)
    teacher = _v.as_float_array("teacher_logits", teacher_logits)
    _v.check_same_shape("student_logits", student, "teacher_logits", teacher)
    axis = _axes.class_axes(axis, student.ndim, "student_logits")
    if isinstance(axis, tuple):
        flat = _axes.Flattening.of(student.shape, axis)
        return distillation_loss(
            flat.flatten(student), flat.flatten(teacher), -1, flat.where(where),
            temperature=temperature, beta=beta,
        )
    mask = _v.prepare_where(where, student.shape, (axis,))
    temp, b, kind = _terms.hyperparameters(temperature, beta)
    ct = _v.compute_dtype(jnp.result_type(student, teacher))
    return _distill_jit(student, teacher, mask, temp.astype(ct), b.astype(ct), axis, kind)


# --------------------------------------------------------------------------------------------
# optax's KL divergences
# --------------------------------------------------------------------------------------------


def _kl_elements(log_predictions, targets, log_targets: bool):
    r""":math:`y (\log y - \log a)` with :math:`0 \log 0 = 0`, whatever :math:`\log a` is."""
    if log_targets:
        # exp underflowing at a finite log-target is a zero target too (0 log 0 = 0).
        y, log_y = jnp.exp(targets), targets
        zero = y == 0
    else:
        zero = targets == 0
        y, log_y = targets, jnp.log(jnp.where(zero, 1.0, targets))
    return jnp.where(zero, 0.0, y * (log_y - jnp.where(zero, 0.0, log_predictions)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _kl(log_predictions, targets, mask, axes, log_targets):
    return _kl_fwd(log_predictions, targets, mask, axes, log_targets)[0]


def _kl_fwd(log_predictions, targets, mask, axes, log_targets):
    ct = _v.compute_dtype(jnp.result_type(log_predictions, targets))
    terms = _kl_elements(log_predictions.astype(ct), targets.astype(ct), log_targets)
    loss = jnp.sum(masked_fill(terms, mask, 0.0), axis=axes)
    out = loss.astype(jnp.result_type(log_predictions, targets))
    return out, (log_predictions, targets, mask)


def _kl_bwd(axes, log_targets, res, g):
    r"""KL gradients, element-wise. Predictions: :math:`-\bar g\,y`. Targets:
    :math:`\bar g\,(\log y + 1 - \log a)` (probabilities; :math:`-\infty` at
    :math:`y = 0`, the one-sided derivative of :math:`y \log y`) or
    :math:`\bar g\,y\,(\log y + 1 - \log a)` (log-probabilities; 0 where :math:`y = 0`).
    Masked entries, and rows whose cotangent is 0, get exactly 0."""
    log_predictions, targets, mask = res
    ct = _v.compute_dtype(jnp.result_type(log_predictions, targets))
    log_a, y_in = log_predictions.astype(ct), targets.astype(ct)
    g = jnp.expand_dims(g.astype(ct), axes)
    if log_targets:
        y = jnp.exp(y_in)
        zero = y == 0
        d_y = jnp.where(zero, 0.0, y * (y_in + 1.0 - jnp.where(zero, 0.0, log_a)))
    else:
        y = y_in
        d_y = jnp.log(y) + 1.0 - log_a
    d_a = masked_fill(_terms.times(g, -y), mask, 0.0)
    d_y = masked_fill(_terms.times(g, d_y), mask, 0.0)
    return d_a.astype(log_predictions.dtype), d_y.astype(targets.dtype), None


_kl.defvjp(_kl_fwd, _kl_bwd)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _kl_jit(log_predictions, targets, mask, axes, log_targets):
    # Broadcasting outside the rule: autodiff sums each gradient back to its input's shape.
    shape = jnp.broadcast_shapes(log_predictions.shape, targets.shape)
    return _kl(jnp.broadcast_to(log_predictions, shape), jnp.broadcast_to(targets, shape),
               mask, axes, log_targets)


def _kl_args(log_predictions, targets, targets_name, axis, where):
    """Checks the KL arguments as optax takes them; returns arrays, axes and the mask."""
    log_a = _v.as_float_array("log_predictions", log_predictions)
    y = _v.as_float_array(targets_name, targets)
    try:
        shape = tuple(np.broadcast_shapes(log_a.shape, y.shape))
    except ValueError:
        raise ValueError(
            f"log_predictions.shape={tuple(log_a.shape)} and {targets_name}.shape="
            f"{tuple(y.shape)} do not broadcast together"
        ) from None
    if axis is None:
        axes = tuple(range(len(shape)))
    else:
        named = axis if isinstance(axis, tuple) else (axis,)
        axes = tuple(_v.canonical_axis(a, len(shape), "log_predictions") for a in named)
        if len(set(axes)) != len(axes):
            raise ValueError(f"axis={axis!r} names the same axis twice")
    mask = None if where is None else _v.check_where(where, shape, axes)
    return log_a, y, axes, mask


def kl_divergence(
    log_predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Kullback-Leibler divergence of predictions from targets, optax's drop-in.

    .. math::
        \mathrm{KL}(y \| a) = \sum_c y_c (\log y_c - \log a_c), \qquad 0 \log 0 = 0 .

    Semantics, argument names and broadcasting are ``optax.losses.kl_divergence``'s: the
    inputs broadcast together, ``axis`` may be an int, a tuple or None (all axes), and
    ``where`` leaves entries out of the sum. Gradient (a ``custom_vjp``):
    :math:`\partial/\partial \log a = -y`, :math:`\partial/\partial y = \log y + 1 - \log a`.

    Differences on purpose: a zero target adds 0 even where :math:`\log a = -\infty`
    (optax: NaN from :math:`0 \cdot \infty`); the target gradient at :math:`y = 0` is
    :math:`-\infty`, the one-sided derivative of :math:`y \log y` (optax: NaN); bf16/f16
    inputs are computed in float32 (the result keeps the inputs' dtype).

    Args:
      log_predictions: log-probabilities :math:`\log a` of the predicted distribution.
      targets: probabilities :math:`y` of the target distribution (non-negative).
      axis: axis or axes to sum over; None for all.
      where: optional boolean mask broadcasting to the inputs' broadcast shape.

    Returns:
      The divergences: the broadcast shape without ``axis``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> log_a = jnp.log(jnp.array([0.2, 0.3, 0.5]))
      >>> print(sj.kl_divergence(log_a, jnp.array([0.0, 0.4, 0.6])))
      0.2244

    References:
      Kullback and Leibler, `On Information and Sufficiency
      <https://www.jstor.org/stable/2236703>`_, 1951.
    """
    log_a, y, axes, mask = _kl_args(log_predictions, targets, "targets", axis, where)
    return _kl_jit(log_a, y, mask, axes, False)


def kl_divergence_with_log_targets(
    log_predictions: jax.typing.ArrayLike,
    log_targets: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Kullback-Leibler divergence with targets given as log-probabilities, optax's drop-in.

    .. math::
        \mathrm{KL}(y \| a) = \sum_c e^{\log y_c} (\log y_c - \log a_c) .

    Semantics as ``optax.losses.kl_divergence_with_log_targets``. Gradient (a
    ``custom_vjp``): :math:`\partial/\partial \log a = -y`,
    :math:`\partial/\partial \log y = y (\log y + 1 - \log a)`.

    Differences on purpose: a log-target whose probability is 0 (:math:`-\infty`, or so
    small that :math:`e^{\log y}` underflows) adds 0 and gets gradient 0 (optax: NaN from
    :math:`0 \cdot \infty` against a :math:`-\infty` prediction); bf16/f16 inputs are
    computed in float32.

    Args:
      log_predictions: log-probabilities :math:`\log a` of the predicted distribution.
      log_targets: log-probabilities :math:`\log y` of the target distribution.
      axis: axis or axes to sum over; None for all.
      where: optional boolean mask broadcasting to the inputs' broadcast shape.

    Returns:
      The divergences: the broadcast shape without ``axis``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> log_a = jnp.log(jnp.array([0.2, 0.3, 0.5]))
      >>> print(sj.kl_divergence_with_log_targets(log_a, jnp.log(jnp.array([0.0, 0.4, 0.6]))))
      0.2244
    """
    log_a, log_y, axes, mask = _kl_args(log_predictions, log_targets, "log_targets", axis, where)
    return _kl_jit(log_a, log_y, mask, axes, True)
