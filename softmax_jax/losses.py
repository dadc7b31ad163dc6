r"""Classification losses with analytic ``custom_vjp`` gradients.

This module holds the notes' costs other than the two softmax cross-entropies, which live in
:mod:`softmax_jax.integer_cross_entropy` and :mod:`softmax_jax.dense_cross_entropy`. All
losses return per-example values (the caller reduces), compute in at least float32, and return
the loss in the first argument's dtype; gradients come back in each input's dtype.

Derivative rules (each one is written next to its function):

=====================================  ============================================
loss                                   gradient w.r.t. its first argument
=====================================  ============================================
softmax cross-entropy (dense labels)   :math:`(\sum_k y_k)\,a - y`  (``a - y`` one-hot)
softmax cross-entropy (integer labels) :math:`a - \mathrm{onehot}(y)`
log-likelihood on probabilities        :math:`-y / a`
sigmoid binary cross-entropy           :math:`\sigma(z) - y`
quadratic cost                         :math:`a - y`
=====================================  ============================================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softmax_jax import _validation as _v
from softmax_jax._cross_entropy_terms import zero_without_cotangent

__all__ = [
    "log_likelihood",
    "quadratic_cost",
    "sigmoid_binary_cross_entropy",
]

# --------------------------------------------------------------------------------------------
# Log-likelihood on probabilities
# --------------------------------------------------------------------------------------------


@jax.custom_vjp
def _log_likelihood(probs: jax.Array, labels: jax.Array) -> jax.Array:
    return _log_likelihood_fwd(probs, labels)[0]


def _log_likelihood_fwd(probs, labels):
    ct = _v.compute_dtype(probs.dtype)
    a, y = probs.astype(ct), labels.astype(ct)
    loss = -jnp.sum(jnp.where(y == 0, 0.0, y * jnp.log(a)), axis=-1)
    return loss.astype(probs.dtype), (probs, labels)


def _log_likelihood_bwd(res, g):
    r"""Log-likelihood gradients: :math:`\bar a = -\bar g\,y / a`, :math:`\bar y = -\bar g \log a`.

    A zero target contributes nothing, even where :math:`a = 0`. A row whose cotangent is 0
    gets exactly 0 for both, even where it holds a zero probability or a NaN.
    """
    probs, labels = res
    ct = _v.compute_dtype(probs.dtype)
    a, y = probs.astype(ct), labels.astype(ct)
    g = jnp.expand_dims(g.astype(ct), -1)
    # Double where: a zero target's entry divides by 1, not by a probability that may be 0,
    # so that differentiating this rule again (jacrev of grad) sees no inf * 0 either.
    da = jnp.where(y == 0, 0.0, -g * y / jnp.where(y == 0, 1.0, a))
    da = zero_without_cotangent(da, g)
    dy = zero_without_cotangent(-g * jnp.log(a), g)
    return da.astype(probs.dtype), dy.astype(labels.dtype)


_log_likelihood.defvjp(_log_likelihood_fwd, _log_likelihood_bwd)
_log_likelihood_jit = jax.jit(_log_likelihood)


def log_likelihood(probs: jax.typing.ArrayLike, labels: jax.typing.ArrayLike) -> jax.Array:
    r"""The notes' log-likelihood cost on probabilities, over the last axis.

    .. math::
        C = -\sum_k y_k \log a_k .

    Use it after :func:`softmax_jax.softmax` when the probabilities are needed anyway; on
    logits, :func:`~softmax_jax.softmax_cross_entropy` is the same cost computed more stably.

    Gradient (a ``custom_vjp``): :math:`\partial C/\partial a_k = -y_k / a_k`, which through
    the softmax Jacobian becomes :math:`a - y`.

    Args:
      probs: floating-point probabilities :math:`a`, ``[..., classes]``.
      labels: floating-point targets :math:`y` of the same shape (one-hot or soft).

    Returns:
      Per-example costs, ``probs``'s shape without the last axis, in ``probs``'s dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> a = sj.softmax(jnp.array([2.0, 3.0, 4.0]))
      >>> print(sj.log_likelihood(a, jnp.array([0.0, 1.0, 0.0])))
      1.4076
    """
    labels_arr = jnp.asarray(labels)
    if not jnp.issubdtype(labels_arr.dtype, jnp.floating):
        raise TypeError(
            f"labels must be floating-point probability targets (one-hot or soft) of probs's"
            f" shape, got dtype {labels_arr.dtype} (shape {tuple(labels_arr.shape)}); for"
            " integer class indices use softmax_cross_entropy_with_integer_labels on the"
            " logits, or one-hot them with jax.nn.one_hot(labels, num_classes)"
        )
    probs, labels = _v.as_float_pair("probs", probs, "labels", labels_arr)
    _v.canonical_axis(-1, probs.ndim, "probs")
    return _log_likelihood_jit(probs, labels)


# --------------------------------------------------------------------------------------------
# Sigmoid binary cross-entropy
# --------------------------------------------------------------------------------------------


@jax.custom_vjp
def _sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return _sigmoid_bce_fwd(logits, labels)[0]


def _sigmoid_bce_fwd(logits, labels):
    ct = _v.compute_dtype(logits.dtype)
    z, y = logits.astype(ct), labels.astype(ct)
    # -y log s(z) - (1 - y) log(1 - s(z)) = max(z, 0) - y z + log(1 + e^{-|z|}): no overflow,
    # no log(0); y z is skipped where y == 0 so a -inf logit with target 0 costs 0, not NaN.
    loss = jnp.maximum(z, 0.0) - jnp.where(y == 0, 0.0, y * z) + jnp.log1p(jnp.exp(-jnp.abs(z)))
    return loss.astype(logits.dtype), (logits, labels)


def _sigmoid_bce_bwd(res, g):
    r"""Sigmoid cross-entropy gradients: :math:`\bar z = \bar g\,(\sigma(z) - y)` (no
    :math:`\sigma'(z)` factor, hence no learning slowdown) and :math:`\bar y = -\bar g\,z`;
    both exactly 0 where the cotangent is 0, even at a NaN or infinite logit."""
    logits, labels = res
    ct = _v.compute_dtype(logits.dtype)
    z, y = logits.astype(ct), labels.astype(ct)
    g = g.astype(ct)
    return (
        zero_without_cotangent(g * (jax.lax.logistic(z) - y), g).astype(logits.dtype),
        zero_without_cotangent(-g * z, g).astype(labels.dtype),
    )


_sigmoid_bce.defvjp(_sigmoid_bce_fwd, _sigmoid_bce_bwd)
# Labels are broadcast inside the compiled function, so an eager call never materialises them.
_sigmoid_bce_jit = jax.jit(lambda z, y: _sigmoid_bce(z, jnp.broadcast_to(y, z.shape)))


def sigmoid_binary_cross_entropy(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> jax.Array:
    r"""Element-wise binary cross-entropy of a sigmoid output, computed from the logits.

    .. math::
        C = -\big(y \log \sigma(z) + (1 - y) \log(1 - \sigma(z))\big)
          = \max(z, 0) - y z + \log(1 + e^{-|z|}) .

    Gradient (a ``custom_vjp``): :math:`\partial C/\partial z = \sigma(z) - y`; with
    :math:`z = w x + b` the notes' :math:`\partial C/\partial w = x(\sigma(z) - y)`.

    Args:
      logits: floating-point logits :math:`z`.
      labels: targets :math:`y \in [0, 1]`: floating-point probabilities, or integer or
        boolean 0/1 labels (as optax takes them), of ``logits``'s shape or a shape that
        broadcasts to it (the gradient of broadcast float labels is summed back to their
        shape). Shapes that would enlarge ``logits`` raise ``ValueError``.

    Returns:
      Element-wise losses, ``logits``'s shape and dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> print(sj.sigmoid_binary_cross_entropy(jnp.array([0.0, 2.0]), jnp.array([1.0, 0.0])))
      [0.6931 2.1269]
      >>> print(jax.grad(lambda z: sj.sigmoid_binary_cross_entropy(z, 0.0))(2.0))
      0.8808
      >>> print(sj.sigmoid_binary_cross_entropy(jnp.array([[0.0, 2.0]]), jnp.array([1, 0])))
      [[0.6931 2.1269]]
    """
    logits = _v.as_float_array("logits", logits)
    labels = _v.as_binary_targets(logits, labels)
    return _sigmoid_bce_jit(logits, labels)


# --------------------------------------------------------------------------------------------
# Quadratic cost
# --------------------------------------------------------------------------------------------


@jax.custom_vjp
def _quadratic(activations: jax.Array, targets: jax.Array) -> jax.Array:
    return _quadratic_fwd(activations, targets)[0]


def _quadratic_fwd(activations, targets):
    ct = _v.compute_dtype(activations.dtype)
    diff = activations.astype(ct) - targets.astype(ct)
    loss = 0.5 * jnp.sum(jnp.square(diff), axis=-1)
    return loss.astype(activations.dtype), (activations, targets)


def _quadratic_bwd(res, g):
    r"""Quadratic-cost gradients: :math:`\bar a = \bar g\,(a - y)` and
    :math:`\bar y = -\bar g\,(a - y)`; exactly 0 in a row whose cotangent is 0."""
    activations, targets = res
    ct = _v.compute_dtype(activations.dtype)
    g = jnp.expand_dims(g.astype(ct), -1)
    d = zero_without_cotangent(g * (activations.astype(ct) - targets.astype(ct)), g)
    return d.astype(activations.dtype), (-d).astype(targets.dtype)


_quadratic.defvjp(_quadratic_fwd, _quadratic_bwd)
_quadratic_jit = jax.jit(_quadratic)


def quadratic_cost(
    activations: jax.typing.ArrayLike, targets: jax.typing.ArrayLike
) -> jax.Array:
    r"""Quadratic (mean-squared-error style) cost over the last axis.

    .. math::
        C = \tfrac12 \lVert a - y \rVert^2 = \tfrac12 \sum_k (a_k - y_k)^2 .

    Gradient (a ``custom_vjp``): :math:`\partial C/\partial a = a - y`. Behind a sigmoid
    output the chain rule adds :math:`\sigma'(z)`, which is what makes learning crawl when
    the neuron saturates.

    Args:
      activations: floating-point outputs :math:`a`, ``[..., outputs]``.
      targets: floating-point targets :math:`y` of the same shape.

    Returns:
      Per-example costs: the shape without the last axis, in ``activations``'s dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> print(sj.quadratic_cost(jnp.array([0.82, 0.5]), jnp.array([0.0, 0.5])))
      0.3362
    """
    activations, targets = _v.as_float_pair("activations", activations, "targets", targets)
    _v.canonical_axis(-1, activations.ndim, "activations")
    return _quadratic_jit(activations, targets)
