r"""Classification losses with analytic ``custom_vjp`` gradients.

All losses return per-example values (the caller reduces), compute in at least float32, and
return the loss in the logits' dtype; gradients come back in each input's dtype.

Memory: the softmax cross-entropy rules save only their inputs and one log-sum-exp per example
(O(N) beyond the inputs, never an N x V probability tensor). The backward pass recomputes
:math:`a = e^{(z - m) - \log s}` on the fly, which XLA fuses into the gradient's single
element-wise pass.

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

import functools

import jax
import jax.numpy as jnp

from softmax_jax import _axes
from softmax_jax import _validation as _v
from softmax_jax.activations import Normalizer, batched_as_rows, masked_fill

__all__ = [
    "log_likelihood",
    "quadratic_cost",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]

Mask = jax.Array | None


def _class_count(shape: tuple[int, ...], axis: int, mask: Mask) -> jax.Array | int:
    """K, the number of classes taking part: the axis length, or the unmasked count per row."""
    if mask is None:
        return shape[axis]
    return jnp.sum(jnp.broadcast_to(mask, shape), axis=axis, keepdims=True)


def _finite_lse(norm: Normalizer) -> jax.Array:
    """The log-sum-exp with an empty row's :math:`-\\infty` read as 0, for the z-loss gradient
    :math:`2\\lambda\\,\\mathrm{lse}\\,a`, whose :math:`a` is 0 on such a row anyway."""
    lse = norm.lse()
    return jnp.where(lse == -jnp.inf, 0.0, lse)


def _weighted_gap(y: jax.Array, z: jax.Array, norm: Normalizer, axis: int, mask: Mask):
    r""":math:`\sum_k y_k (m - z_k)`, the part of :math:`-\sum_k y_k \log a_k` before
    :math:`\log s`, on XLA:CPU's fast reduction path whenever possible.

    A zero target on a :math:`-\infty` (or masked) logit must add 0, not :math:`0 \cdot \infty
    = \mathrm{NaN}`. Guarding every term with ``where`` makes the reduction about 5x slower,
    and so does a broadcast shift, so the common case (``m = 0``, the unshifted normaliser)
    sums :math:`-y z` directly, and the guarded sum is only computed, through ``lax.cond``,
    in a call where some row came out NaN (see :func:`_gap`).
    """
    if mask is not None:
        return _guarded_gap(y, z, norm.m, axis)
    return _gap(axis)(y, z, norm.m)


def _guarded_gap(y: jax.Array, z: jax.Array, m: jax.Array, axis: int) -> jax.Array:
    """The weighted gap with every term made safe, for masked calls and NaN rows."""
    # Capping each gap at the largest float makes 0 * gap = 0 for a -inf logit; a positive
    # target on such a logit then gets its true infinite loss back from the second sum.
    # (Both stay clear of select-in-reduce, which XLA:CPU materialises as N x V.)
    big = jnp.finfo(z.dtype).max
    capped = jnp.sum(y * jnp.minimum(m - z, big), axis=axis, keepdims=True)
    hopeless = jnp.any((y > 0) & (z == -jnp.inf), axis=axis, keepdims=True)
    return jnp.where(hopeless, jnp.inf, capped)


def _fast_or_guarded_gap(y: jax.Array, z: jax.Array, m: jax.Array, axis: int) -> jax.Array:
    out = jax.lax.cond(
        jnp.all(m == 0),
        lambda: -jnp.sum(y * z, axis=axis, keepdims=True),
        lambda: jnp.sum(y * (m - z), axis=axis, keepdims=True),
    )
    return jax.lax.cond(
        jnp.any(jnp.isnan(out)), lambda: _guarded_gap(y, z, m, axis), lambda: out
    )


@functools.cache
def _gap(axis: int):
    r"""The unmasked weighted gap along ``axis``, with its own batching and derivative rules
    (as for the normaliser, :func:`softmax_jax.activations._normaliser`): under ``vmap`` the
    mapped axis becomes one more row axis, so the ``lax.cond`` choices stay choices instead of
    running every branch; the tangent is
    :math:`\sum_k \dot y_k (m - z_k) - y_k \dot z_k + \dot m \sum_k y_k`.
    """

    gap = jax.custom_jvp(
        batched_as_rows(lambda y, z, m: _fast_or_guarded_gap(y, z, m, axis), _gap, axis)
    )

    @gap.defjvp
    def _tangent(primals, tangents):
        (y, z, m), (dy, dz, dm) = primals, tangents
        big = jnp.finfo(z.dtype).max
        d = jnp.sum(dy * jnp.minimum(m - z, big) - jnp.where(y == 0, 0.0, y * dz),
                    axis=axis, keepdims=True)
        return gap(y, z, m), d + dm * jnp.sum(y, axis=axis, keepdims=True)

    return gap


def _any_unmasked(mask: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
    return jnp.any(jnp.broadcast_to(mask, shape), axis=axis)


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy with dense (probability) labels
# --------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _dense_ce(
    logits: jax.Array,
    labels: jax.Array,
    mask: Mask,
    eps: jax.Array,
    lam: jax.Array,
    axis: int,
    smoothing: bool,
    zloss: bool,
) -> jax.Array:
    return _dense_ce_fwd(logits, labels, mask, eps, lam, axis, smoothing, zloss)[0]


def _smoothed(y: jax.Array, eps: jax.Array, k: jax.Array | int, mask: Mask, smoothing: bool):
    """Labels after smoothing, :math:`(1 - \\epsilon) y + \\epsilon / K`, zero where masked."""
    if smoothing:
        y = (1.0 - eps) * y + eps / k
    return masked_fill(y, mask, 0.0)


def _dense_ce_fwd(logits, labels, mask, eps, lam, axis, smoothing, zloss):
    ct = _v.compute_dtype(logits.dtype)
    z = masked_fill(logits.astype(ct), mask, -jnp.inf)
    eps, lam = eps.astype(ct), lam.astype(ct)
    norm = Normalizer.of(z, axis)
    y = _smoothed(labels.astype(ct), eps, _class_count(z.shape, axis, mask), mask, smoothing)
    # sum_k y_k (-log a_k) = sum_k y_k (m - z_k) + log s * sum_k y_k; _weighted_gap says how the
    # first sum stays exact and fast.
    sum_y = jnp.sum(y, axis=axis, keepdims=True)
    loss = _weighted_gap(y, z, norm, axis, mask)
    log_s = jnp.where(sum_y == 0, 0.0, norm.log_s)  # no targets: no normaliser term
    loss = jnp.squeeze(loss + log_s * sum_y, axis)
    lse = jnp.squeeze(norm.lse(), axis)
    if zloss:
        loss = loss + lam * jnp.square(lse)
    # Keep a NaN logit visible even in a row whose targets are all zero.
    loss = jnp.where(jnp.isnan(lse), lse, loss)
    if mask is not None:
        loss = jnp.where(_any_unmasked(mask, z.shape, axis), loss, 0.0)
    return loss.astype(logits.dtype), (logits, labels, mask, eps, lam, norm, sum_y)


def _dense_ce_bwd(axis, smoothing, zloss, res, g):
    r"""Cross-entropy gradients, recomputing :math:`a = e^{(z - m) - \log s}`.

    Logits: :math:`\bar z = \bar g\,\big((\sum_k y_k)\,a - y + 2\lambda\,\mathrm{lse}\,a\big)`;
    for one-hot ``y`` this is the notes' :math:`a - y`. Labels: :math:`\bar y =
    -\bar g\,(1 - \epsilon)\log a` (smoothing maps
    :math:`y \mapsto (1 - \epsilon) y + \epsilon / K`).
    """
    logits, labels, mask, eps, lam, norm, sum_y = res
    ct = norm.m.dtype
    z = masked_fill(logits.astype(ct), mask, -jnp.inf)
    g_k = jnp.expand_dims(g.astype(ct), axis)
    log_a = norm.log_prob(z)
    y = _smoothed(labels.astype(ct), eps, _class_count(z.shape, axis, mask), mask, smoothing)
    coef = sum_y
    if zloss:
        coef = coef + 2.0 * lam * _finite_lse(norm)
    dz = g_k * (coef * jnp.exp(log_a) - y)
    dy = -g_k * log_a
    if smoothing:
        dy = (1.0 - eps) * dy
    dy = masked_fill(dy, mask, 0.0)
    return dz.astype(logits.dtype), dy.astype(labels.dtype), None, None, None


_dense_ce.defvjp(_dense_ce_fwd, _dense_ce_bwd)
_dense_ce_jit = jax.jit(_dense_ce, static_argnums=(5, 6, 7))


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
) -> jax.Array:
    r"""Softmax cross-entropy between logits and probability (one-hot or soft) labels.

    .. math::
        \ell = -\sum_k y_k \log \mathrm{softmax}(z)_k + \lambda\,\mathrm{lse}(z)^2
             = \sum_k y_k\,(\mathrm{lse}(z) - z_k) + \lambda\,\mathrm{lse}(z)^2,

    with labels smoothed to :math:`(1 - \epsilon) y + \epsilon / K` when
    ``label_smoothing`` :math:`= \epsilon > 0` (:math:`K` = number of unmasked classes).

    Gradient (a ``custom_vjp``): :math:`\partial\ell/\partial z = (\sum_k y_k)\,a - y +
    2\lambda\,\mathrm{lse}\,a`, which is :math:`a - y` for one-hot labels;
    :math:`\partial\ell/\partial y = -(1 - \epsilon)\log a`.

    Args:
      logits: floating-point logits, e.g. ``[batch, classes]``.
      labels: floating-point target distributions, same shape as ``logits``.
      axis: the class axis, or a tuple of axes that together index the classes.
      where: optional boolean mask (``logits``'s shape, or that shape without ``axis``).
        Masked classes are left out of the normaliser and the sum; a fully masked row gives
        loss 0 and gradient 0.
      label_smoothing: :math:`\epsilon \in [0, 1]`.
      z_loss: :math:`\lambda \ge 0`, the weight of the :math:`\mathrm{lse}^2` penalty that keeps
        the normaliser near 0 (as in PaLM).

    Returns:
      Per-example losses: ``logits``'s shape without ``axis``, in ``logits``'s dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> logits, labels = jnp.array([2.0, 3.0, 4.0]), jnp.array([0.0, 1.0, 0.0])
      >>> print(sj.softmax_cross_entropy(logits, labels))
      1.4076
      >>> print(jax.grad(sj.softmax_cross_entropy)(logits, labels))  # a - y
      [ 0.0900 -0.7553  0.6652]

    References:
      M. Nielsen, *Neural Networks and Deep Learning*, ch. 3 (softmax and log-likelihood).
    """
    logits = _v.as_float_array("logits", logits)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        raise TypeError(
            f"labels must be a floating-point array of probabilities, got dtype {labels.dtype}"
            f" (shape {tuple(labels.shape)}); for class indices use"
            " softmax_cross_entropy_with_integer_labels"
        )
    _v.check_same_shape("logits", logits, "labels", labels)
    axis = _axes.class_axes(axis, logits.ndim, "logits")
    if isinstance(axis, tuple):
        flat = _axes.Flattening.of(logits.shape, axis)
        return softmax_cross_entropy(
            flat.flatten(logits), flat.flatten(labels), -1, flat.where(where),
            label_smoothing=label_smoothing, z_loss=z_loss,
        )
    mask = _v.prepare_where(where, logits.shape, axis)
    eps, smoothing = _v.hyperparameter("label_smoothing", label_smoothing, 0.0, 1.0)
    lam, zloss = _v.hyperparameter("z_loss", z_loss, 0.0, None)
    return _dense_ce_jit(logits, labels, mask, eps, lam, axis, smoothing, zloss)


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy with integer labels
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _int_ce(logits, labels, mask, eps, lam, axis, smoothing, zloss, ignore_index):
    return _int_ce_fwd(logits, labels, mask, eps, lam, axis, smoothing, zloss, ignore_index)[0]


def _row_scale(labels, num_classes, mask, shape, axis, ignore_index):
    """Per-example factor: 1 normally, 0 for ignored examples or fully masked rows, NaN for
    an out-of-range label, so a bad label can never yield a plausible loss or gradient."""
    valid = (labels >= 0) & (labels < num_classes)
    keep = jnp.ones(labels.shape, dtype=bool)
    if ignore_index is not None:
        keep = labels != ignore_index
    scale = jnp.where(valid, 1.0, jnp.nan)
    if mask is not None:
        keep = keep & _any_unmasked(mask, shape, axis)
    return jnp.where(keep, scale, 0.0), valid


def _int_ce_fwd(logits, labels, mask, eps, lam, axis, smoothing, zloss, ignore_index):
    ct = _v.compute_dtype(logits.dtype)
    z = masked_fill(logits.astype(ct), mask, -jnp.inf)
    eps, lam = eps.astype(ct), lam.astype(ct)
    norm = Normalizer.of(z, axis)
    scale, valid = _row_scale(labels, z.shape[axis], mask, z.shape, axis, ignore_index)
    safe_labels = jnp.expand_dims(jnp.where(valid, labels, 0), axis)
    z_label = jnp.take_along_axis(z, safe_labels, axis=axis)
    loss = -jnp.squeeze(norm.log_prob(z_label), axis)
    if smoothing:
        # eps/K * sum_c -log a_c: the uniform part of the smoothed target.
        k = _class_count(z.shape, axis, mask)
        uniform = jnp.sum(masked_fill(-norm.log_prob(z), mask, 0.0) / k, axis=axis)
        loss = (1.0 - eps) * loss + eps * uniform
    if zloss:
        loss = loss + lam * jnp.square(jnp.squeeze(norm.lse(), axis))
    # where(scale == 0, 0, ...) rather than scale * loss: an ignored row may hold inf or NaN.
    loss = jnp.where(scale == 0, 0.0, scale * loss)
    return loss.astype(logits.dtype), (logits, labels, mask, eps, lam, norm)


def _add_at_labels(x: jax.Array, labels: jax.Array, values: jax.Array, axis: int) -> jax.Array:
    """``x`` plus ``values`` at each row's label along ``axis`` (one entry per row).

    A scatter-add of ``labels.size`` entries, which XLA applies in place to the freshly
    computed ``x``. ``labels`` must already lie in ``[0, K)``.
    """
    index = [jax.lax.broadcasted_iota(labels.dtype, labels.shape, d) for d in range(labels.ndim)]
    index.insert(axis, labels)
    return x.at[tuple(index)].add(
        values, unique_indices=True, indices_are_sorted=axis == x.ndim - 1, mode="drop"
    )


def _int_ce_bwd(axis, smoothing, zloss, ignore_index, res, g):
    r"""Integer-label cross-entropy gradient, recomputing :math:`a = e^{(z - m) - \log s}`.

    :math:`\bar z = \bar g\,\big(a - (1 - \epsilon)\,\mathrm{onehot}(y) - \epsilon/K
    + 2\lambda\,\mathrm{lse}\,a\big)`, the notes' :math:`a - y` when
    :math:`\epsilon = \lambda = 0`. Ignored examples and fully masked rows get 0, examples
    with an out-of-range label get NaN.

    For float32/float64 logits the one-hot part is a scatter-add of one entry per row onto
    :math:`\bar g\,(a - \epsilon/K)`, so the element-wise pass carries no class comparison
    (about a fifth faster on CPU). For bfloat16/float16 logits the gradient is rounded to the
    input dtype in the same pass, so the one-hot stays inside it: subtracting it after
    rounding would lose the precision of :math:`a_y - 1` near :math:`a_y = 1`.
    """
    logits, labels, mask, eps, lam, norm = res
    ct = norm.m.dtype
    z = masked_fill(logits.astype(ct), mask, -jnp.inf)
    scale, valid = _row_scale(labels, z.shape[axis], mask, z.shape, axis, ignore_index)
    a = norm.prob(z)
    if zloss:
        a = a * (1.0 + 2.0 * lam * _finite_lse(norm))
    on_label = 1.0 - eps if smoothing else jnp.ones((), ct)
    off_label = eps / _class_count(z.shape, axis, mask) if smoothing else None
    # The barrier has XLA compute the per-row factors once, instead of fusing their
    # arithmetic into (and repeating it for) every element of the gradient.
    row = jax.lax.optimization_barrier(g.astype(ct) * scale)
    row_k = jnp.expand_dims(row, axis)
    if ct == logits.dtype:
        grad = a if off_label is None else a - off_label
        # where, not a product, for rows scaled by 0: their logits may hold inf or NaN.
        dz = jnp.where(row_k == 0, 0.0, row_k * grad)
        dz = _add_at_labels(dz, jnp.where(valid, labels, 0), -on_label * row, axis)
    else:
        classes = jax.lax.broadcasted_iota(labels.dtype, z.shape, axis)
        target = jnp.where(classes == jnp.expand_dims(labels, axis), on_label, 0.0)
        if off_label is not None:
            target = target + off_label
        dz = jnp.where(row_k == 0, 0.0, row_k * (a - target))
    dz = masked_fill(dz, mask, 0.0)
    return dz.astype(logits.dtype), None, None, None, None


_int_ce.defvjp(_int_ce_fwd, _int_ce_bwd)
_int_ce_jit = jax.jit(_int_ce, static_argnums=(5, 6, 7, 8))


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    ignore_index: int | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy between logits and integer class labels.

    .. math::
        \ell = (1 - \epsilon)\,(\mathrm{lse}(z) - z_y)
             + \frac{\epsilon}{K} \sum_c (\mathrm{lse}(z) - z_c) + \lambda\,\mathrm{lse}(z)^2 .

    With :math:`\epsilon = \lambda = 0` this is :math:`-\log \mathrm{softmax}(z)_y`. The
    smoothing term follows PyTorch's ``F.cross_entropy(..., label_smoothing=eps)``.

    Gradient (a ``custom_vjp``): :math:`\partial\ell/\partial z = a - (1 - \epsilon)\,
    \mathrm{onehot}(y) - \epsilon / K + 2\lambda\,\mathrm{lse}\,a`.

    Args:
      logits: floating-point logits, e.g. ``[batch, classes]``.
      labels: integer class indices, ``logits``'s shape without ``axis``.
      axis: the class axis, or a tuple of axes; a label is then a flat (C-order) index into
        the class axes taken in the order given, as in optax.
      where: optional boolean mask (``logits``'s shape, or that shape without ``axis``).
        Masked classes are left out of the normaliser; a label on a masked class has
        probability 0 and an infinite loss; a fully masked row gives loss 0 and gradient 0.
      label_smoothing: :math:`\epsilon \in [0, 1]`.
      z_loss: :math:`\lambda \ge 0`.
      ignore_index: a label value (e.g. ``-100``) whose examples get loss 0 and gradient 0.

    Returns:
      Per-example losses, ``labels``'s shape, in ``logits``'s dtype. A label outside
      ``[0, K)`` that is not ``ignore_index`` gives NaN for its example.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> logits = jnp.array([[2.0, 3.0, 4.0], [1.0, 1.0, 1.0]])
      >>> print(sj.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 0])))
      [1.4076 1.0986]
      >>> loss = lambda z: sj.softmax_cross_entropy_with_integer_labels(z, jnp.array([1])).sum()
      >>> print(jax.grad(loss)(logits[:1]))
      [[ 0.0900 -0.7553  0.6652]]
    """
    logits = _v.as_float_array("logits", logits)
    labels = _v.as_int_array(
        "labels", labels, "; for probability targets use softmax_cross_entropy"
    )
    if labels.dtype.itemsize < 4 or not jnp.issubdtype(labels.dtype, jnp.signedinteger):
        # Narrow or unsigned labels are widened so that comparisons with the class count and
        # the class iota cannot wrap around. uint32 values >= 2**31 become negative: invalid.
        labels = labels.astype(jnp.int32)
    axis = _axes.class_axes(axis, logits.ndim, "logits")
    classes = axis if isinstance(axis, tuple) else (axis,)
    expected = tuple(n for d, n in enumerate(logits.shape) if d not in classes)
    if labels.shape != expected:
        raise ValueError(
            f"labels.shape={tuple(labels.shape)} must be logits.shape={tuple(logits.shape)}"
            f" without axis {axis}, i.e. {tuple(expected)}"
        )
    if isinstance(axis, tuple):
        # A label is a flat index into the class axes, in the order given (optax's reading).
        flat = _axes.Flattening.of(logits.shape, axis)
        return softmax_cross_entropy_with_integer_labels(
            flat.flatten(logits), labels, -1, flat.where(where),
            label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
        )
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
    ):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    mask = _v.prepare_where(where, logits.shape, axis)
    eps, smoothing = _v.hyperparameter("label_smoothing", label_smoothing, 0.0, 1.0)
    lam, zloss = _v.hyperparameter("z_loss", z_loss, 0.0, None)
    return _int_ce_jit(logits, labels, mask, eps, lam, axis, smoothing, zloss, ignore_index)


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

    A zero target contributes nothing, even where :math:`a = 0`.
    """
    probs, labels = res
    ct = _v.compute_dtype(probs.dtype)
    a, y = probs.astype(ct), labels.astype(ct)
    g = jnp.expand_dims(g.astype(ct), -1)
    da = jnp.where(y == 0, 0.0, -g * y / a)
    dy = -g * jnp.log(a)
    return da.astype(probs.dtype), dy.astype(labels.dtype)


_log_likelihood.defvjp(_log_likelihood_fwd, _log_likelihood_bwd)
_log_likelihood_jit = jax.jit(_log_likelihood)


def log_likelihood(probs: jax.typing.ArrayLike, labels: jax.typing.ArrayLike) -> jax.Array:
    r"""The notes' log-likelihood cost on probabilities, over the last axis.

    .. math::
        C = -\sum_k y_k \log a_k .

    Use it after :func:`softmax_jax.softmax` when the probabilities are needed anyway; on
    logits, :func:`softmax_cross_entropy` is the same cost computed more stably.

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
    probs, labels = _v.as_float_pair("probs", probs, "labels", labels)
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
    :math:`\sigma'(z)` factor, hence no learning slowdown) and :math:`\bar y = -\bar g\,z`."""
    logits, labels = res
    ct = _v.compute_dtype(logits.dtype)
    z, y = logits.astype(ct), labels.astype(ct)
    g = g.astype(ct)
    return (
        (g * (jax.lax.logistic(z) - y)).astype(logits.dtype),
        (-g * z).astype(labels.dtype),
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
    :math:`\bar y = -\bar g\,(a - y)`."""
    activations, targets = res
    ct = _v.compute_dtype(activations.dtype)
    d = jnp.expand_dims(g.astype(ct), -1) * (activations.astype(ct) - targets.astype(ct))
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
