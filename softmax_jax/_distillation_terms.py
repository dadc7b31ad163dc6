r"""The per-element and per-row terms of the distillation divergences, written once.

Both :func:`softmax_jax.distillation_loss` (which sees whole rows of logits) and the blockwise
large-vocabulary distillation (which sees one ``[tokens, width]`` block of a row at a time,
with each row's normalisers known from an earlier pass) build the loss and its gradients
from the functions below, so each formula lives here and nowhere else.

**Notation.** :math:`T` is the temperature, :math:`\beta` the mixing weight,
:math:`s = z_s / T` and :math:`t = z_t / T` the scaled student and teacher logits,
:math:`\log q = s - \mathrm{lse}(s)` and :math:`\log p = t - \mathrm{lse}(t)` their
log-softmaxes (masked classes: :math:`-\infty`), and :math:`M = \beta P + (1 - \beta) Q`:

.. math::
    D = \begin{cases}
      \mathrm{KL}(P \| Q) & \beta = 0 \text{ (forward)} \\
      \mathrm{KL}(Q \| P) & \beta = 1 \text{ (reverse)} \\
      \beta\,\mathrm{KL}(P \| M) + (1 - \beta)\,\mathrm{KL}(Q \| M) & 0 < \beta < 1
        \text{ (generalised JSD)}
    \end{cases}
    \qquad \ell = T^2 D .

At :math:`\beta = 0`, :math:`M = Q`, so :math:`\mathrm{KL}(P \| M)` *is* the forward KL, and
at :math:`\beta = 1` :math:`\mathrm{KL}(Q \| M)` is the reverse one: every case is a
weighting of the same two row sums :math:`K_P = \mathrm{KL}(P \| M)` and
:math:`K_Q = \mathrm{KL}(Q \| M)` (:class:`RowSums`).

**Interface.** ``kind`` is static, from :func:`kind_of` (``"forward"``, ``"reverse"``,
``"jsd"``, or ``"traced"`` when :math:`\beta` is only known at run time, in which case each
function picks the case per value with ``where``). ``beta`` and ``temperature`` are 0-d
arrays in the compute dtype. Element-wise arguments (``log_p``, ``log_q``, ``log_m``, the
gradients) are blocks of any shape; per-row arguments are keepdims arrays (``[tokens, 1]``)
that broadcast against them. A blockwise engine does, per row:

1. forward: for each block, ``log_m = log_mixture(log_p, log_q, beta, kind)`` and
   ``kl_p, kl_q = element_terms(log_p, log_q, log_m, kind)``; add up each over the class
   axis (a None term adds 0); ``rows = RowSums(kl_p_sum, kl_q_sum)``; the loss is
   ``row_loss(rows, temperature, beta, kind)``, :math:`T^2 D` (NaN for bad hyper-parameters);
2. backward, for each block: ``ds = student_grad(...)`` and ``dt = teacher_grad(...)`` are
   :math:`\partial D / \partial s` and :math:`\partial D / \partial t`; the logit gradients
   are ``g * temperature * ds`` and ``g * temperature * dt`` (``g`` the row's cotangent);
   add up ``temperature_term(ds, log_q, dt, log_p)`` over the class axis;
3. backward, per row: ``temperature_cotangent(temperature, D, that_sum)`` and
   ``beta_cotangent(temperature, rows, beta, kind)``, each times ``g`` (through
   :func:`times`, so a row with ``g = 0`` adds 0 even if its loss is infinite), summed
   over rows.

Check the arguments with :func:`hyperparameters` (it raises for a concrete :math:`T \le 0`,
an infinite :math:`T` or :math:`\beta \notin [0, 1]` and gives the static ``kind``). In
the backward pass set ``g`` to NaN where :func:`valid_hyperparameters` is False (a traced
out-of-range value) and to 0 on fully masked rows.

Conventions: :math:`0 \log 0 = 0` (a class with probability 0 in the distribution being
averaged adds nothing, even against :math:`\log m = -\infty`); a class with mass where the
other distribution has none makes the loss :math:`+\infty`, its true value; the derivatives
of that infinite row with respect to the logits of the distribution holding the mass (the
teacher's in the forward KL), :math:`T` and :math:`\beta` are then NaN, while the other
logits' gradient stays finite (:math:`q - p` in the forward KL).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax import _validation as _v
from softmax_jax._cross_entropy_terms import times  # the one 0-times-infinity rule

Kind = Literal["forward", "reverse", "jsd", "traced"]


def kind_of(beta: object) -> Kind:
    """The static case of ``beta``: ``"traced"`` for a tracer, else by its concrete value."""
    if isinstance(beta, jax.core.Tracer):
        return "traced"
    value = float(np.asarray(beta))
    return "forward" if value == 0.0 else "reverse" if value == 1.0 else "jsd"


def hyperparameters(temperature: object, beta: object) -> tuple[jax.Array, jax.Array, Kind]:
    """``(temperature, beta, kind)`` checked: a concrete :math:`T \\le 0`, an infinite
    :math:`T` or :math:`\\beta \\notin [0, 1]` raises ``ValueError`` naming the argument.
    Shared with the fused distillation, which so refuses these values too."""
    # z / inf is 0 or NaN (for an infinite logit), never the uniform limit: refuse it.
    _v.hyperparameter("temperature", temperature, 0.0, None, finite=True, low_open=True)
    _v.hyperparameter("beta", beta, 0.0, 1.0)
    # The raw values, not hyperparameter()'s NaN-substituted ones: through that ``where`` an
    # out-of-range traced value would get gradient 0; valid_hyperparameters makes it NaN.
    return jnp.asarray(temperature), jnp.asarray(beta), kind_of(beta)


def valid_hyperparameters(temperature: jax.Array, beta: jax.Array) -> jax.Array:
    """Whether :math:`0 < T < \\infty` and :math:`0 \\le \\beta \\le 1` (False for NaN):
    where False, every output must be NaN."""
    return (temperature > 0) & (temperature < jnp.inf) & (beta >= 0) & (beta <= 1)


# --------------------------------------------------------------------------------------------
# Forward: element terms and row sums
# --------------------------------------------------------------------------------------------


def log_mixture(log_p: jax.Array, log_q: jax.Array, beta: jax.Array, kind: Kind) -> jax.Array:
    r""":math:`\log m = \log(\beta p + (1 - \beta) q)`: exactly :math:`\log q` for the
    forward case and :math:`\log p` for the reverse one (no extra ``exp``/``log``)."""
    if kind == "forward":
        return log_q
    if kind == "reverse":
        return log_p
    return jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)


def kl_term(log_a: jax.Array, log_m: jax.Array) -> jax.Array:
    r""":math:`a (\log a - \log m)`, 0 wherever :math:`a = e^{\log a}` is 0: at
    :math:`\log a = -\infty` and also where a finite :math:`\log a` underflows, whose
    :math:`\log a - \log m` may be :math:`+\infty` against a :math:`-\infty` (or NaN against
    a :math:`-\infty - (-\infty)`)."""
    return times(jnp.exp(log_a), log_a - log_m)


def element_terms(
    log_p: jax.Array, log_q: jax.Array, log_m: jax.Array, kind: Kind
) -> tuple[jax.Array | None, jax.Array | None]:
    r"""Per-element contributions to :math:`(K_P, K_Q)`; None where the kind never needs
    that sum (the reverse case's :math:`K_P` and the forward case's :math:`K_Q` are 0)."""
    kl_p = None if kind == "reverse" else kl_term(log_p, log_m)
    kl_q = None if kind == "forward" else kl_term(log_q, log_m)
    return kl_p, kl_q


class RowSums(NamedTuple):
    r"""Per-row :math:`K_P = \mathrm{KL}(P \| M)` and :math:`K_Q = \mathrm{KL}(Q \| M)`."""

    kl_p: jax.Array
    kl_q: jax.Array

    @staticmethod
    def of(terms: tuple[jax.Array | None, jax.Array | None], axis: int) -> RowSums:
        """Sums :func:`element_terms` over ``axis`` (keepdims); a None term sums to 0."""
        present = next(x for x in terms if x is not None)
        zero = jnp.zeros_like(jnp.sum(present, axis=axis, keepdims=True))
        return RowSums(*(zero if x is None else jnp.sum(x, axis=axis, keepdims=True)
                         for x in terms))


def _pick(beta: jax.Array, kind: Kind, forward, reverse, jsd) -> jax.Array:
    """The value for ``kind``; for ``"traced"`` the one ``beta`` selects, per value."""
    if kind != "traced":
        return {"forward": forward, "reverse": reverse, "jsd": jsd}[kind]()
    return jnp.where(beta == 0, forward(), jnp.where(beta == 1, reverse(), jsd()))


def divergence(rows: RowSums, beta: jax.Array, kind: Kind) -> jax.Array:
    r"""Per-row :math:`D`: :math:`K_P`, :math:`K_Q`, or
    :math:`\beta K_P + (1 - \beta) K_Q`."""
    return _pick(beta, kind, lambda: rows.kl_p, lambda: rows.kl_q,
                 lambda: times(beta, rows.kl_p) + times(1.0 - beta, rows.kl_q))


def row_loss(rows: RowSums, temperature: jax.Array, beta: jax.Array, kind: Kind) -> jax.Array:
    r"""Per-row loss :math:`T^2 D`, NaN where the hyper-parameters are out of range."""
    loss = jnp.square(temperature) * divergence(rows, beta, kind)
    return jnp.where(valid_hyperparameters(temperature, beta), loss, jnp.nan)


# --------------------------------------------------------------------------------------------
# Backward: element gradients, then the hyper-parameters' row terms
# --------------------------------------------------------------------------------------------


def _centred(log_a: jax.Array, log_m: jax.Array, kl: jax.Array) -> jax.Array:
    r""":math:`a (\log a - \log m - \mathrm{KL})`: the softmax Jacobian applied to
    :math:`\log(a / m)`, 0 where :math:`a = e^{\log a}` is 0 (see :func:`kl_term`)."""
    return times(jnp.exp(log_a), log_a - log_m - kl)


def student_grad(
    log_p: jax.Array, log_q: jax.Array, log_m: jax.Array, rows: RowSums, beta: jax.Array,
    kind: Kind,
) -> jax.Array:
    r""":math:`\partial D / \partial s`: :math:`q - p` (forward, the notes' :math:`a - y`),
    :math:`q(\log(q/p) - D)` (reverse), :math:`(1 - \beta)\,q(\log(q/m) - K_Q)` (JSD)."""
    centred = lambda: _centred(log_q, log_m, rows.kl_q)  # noqa: E731
    return _pick(beta, kind, lambda: jnp.exp(log_q) - jnp.exp(log_p), centred,
                 lambda: (1.0 - beta) * centred())


def teacher_grad(
    log_p: jax.Array, log_q: jax.Array, log_m: jax.Array, rows: RowSums, beta: jax.Array,
    kind: Kind,
) -> jax.Array:
    r""":math:`\partial D / \partial t`: :math:`p(\log(p/q) - D)` (forward), :math:`p - q`
    (reverse), :math:`\beta\,p(\log(p/m) - K_P)` (JSD)."""
    centred = lambda: _centred(log_p, log_m, rows.kl_p)  # noqa: E731
    return _pick(beta, kind, centred, lambda: jnp.exp(log_p) - jnp.exp(log_q),
                 lambda: beta * centred())


def temperature_term(
    ds: jax.Array, log_q: jax.Array, dt: jax.Array, log_p: jax.Array
) -> jax.Array:
    r"""Per-element :math:`\partial D/\partial s_c \log q_c + \partial D/\partial t_c
    \log p_c`. Its row sum equals :math:`\sum_c (\partial D/\partial s_c\, s_c +
    \partial D/\partial t_c\, t_c)`, because each gradient sums to 0 over the row, and stays
    finite on masked or :math:`-\infty` classes (whose gradient is 0)."""
    return times(ds, log_q) + times(dt, log_p)


def temperature_cotangent(
    temperature: jax.Array, div: jax.Array, temperature_sum: jax.Array
) -> jax.Array:
    r"""Per-row :math:`\partial \ell / \partial T = 2 T D - T \sum_c (\ldots)`, from
    :math:`\ell = T^2 D(z_s / T, z_t / T)` and :math:`\partial s_c / \partial T = -s_c / T`;
    ``temperature_sum`` is the row sum of :func:`temperature_term`."""
    return 2.0 * temperature * div - temperature * temperature_sum


def beta_cotangent(
    temperature: jax.Array, rows: RowSums, beta: jax.Array, kind: Kind
) -> jax.Array:
    r"""Per-row :math:`\partial \ell / \partial \beta = T^2 (K_P - K_Q)` for
    :math:`0 < \beta < 1` (the terms from :math:`\partial M / \partial \beta = P - Q` sum to
    :math:`\sum_c (p_c - q_c) = 0`). At :math:`\beta = 0` and :math:`\beta = 1` the loss
    jumps (the JSD tends to 0 while the definition switches to a KL), so the derivative
    does not exist: NaN."""
    nan = jnp.full_like(rows.kl_p, jnp.nan)
    jsd = lambda: jnp.square(temperature) * (rows.kl_p - rows.kl_q)  # noqa: E731
    return _pick(beta, kind, lambda: nan, lambda: nan, jsd)
