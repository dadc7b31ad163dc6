r"""Softmax cross-entropy with integer labels and its ``custom_vjp`` rule.

The loss returns per-example values (the caller reduces), computes in at least float32 and
returns the loss in the logits' dtype; the gradient comes back in the logits' dtype. The rule
saves the inputs and the normaliser's two parts per example, never an N x V probability
tensor: the backward pass recomputes :math:`a = e^{(z - m) - \log s}` inside its single
fused pass, and recomputes the O(N) terms a hyper-parameter's derivative needs.

The per-example semantics (smoothing, z-loss, class weights, ignored and invalid labels) are
written once, in :mod:`softmax_jax._cross_entropy_terms`, and shared with the fused
large-vocabulary loss. The dense-label loss is in :mod:`softmax_jax.dense_cross_entropy`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from softmax_jax import _axes, _sharding
from softmax_jax import _cross_entropy_terms as _ce
from softmax_jax import _validation as _v
from softmax_jax._normalizer import Normalizer, masked_fill

__all__ = ["softmax_cross_entropy_with_integer_labels"]


class _Rows(NamedTuple):
    """What the integer-label rule needs per example (all O(N))."""

    scale: jax.Array  # 1 counted, 0 ignored or fully masked, NaN invalid label
    labels: jax.Array  # in range (invalid ones replaced by 0), with ``axis`` as size 1
    k: jax.Array | int  # classes taking part (``axis`` kept as size 1)
    w_y: jax.Array | None  # the label's class weight
    weight_sum: jax.Array | None  # W, the summed weights of the classes taking part

    def k_row(self, axis: int) -> jax.Array | int:
        """K per example, without the class axis."""
        return self.k if isinstance(self.k, int) else jnp.squeeze(self.k, axis)


def _rows(logits_shape, labels, mask, class_weights, axis, options, ct) -> _Rows:
    keep = _axes.any_unmasked(mask, logits_shape, axis)
    scale, valid = _ce.row_scale(labels, logits_shape[axis], options.ignore_index, keep, ct)
    safe = _ce.safe_labels(labels, valid)
    k = _axes.class_count(logits_shape, axis, mask)
    w_y = weight_sum = None
    if class_weights is not None:
        w = class_weights.astype(ct)
        w_y = w.at[safe].get(out_sharding=_sharding.typed_sharding(safe))
        # W, which only the smoothing term needs: one number, or one per row under a mask.
        if options.smoothing and mask is None:
            weight_sum = jnp.sum(w)
        elif options.smoothing:
            w_k = jnp.broadcast_to(w.reshape(_axes.along_shape(len(logits_shape), axis)),
                                   logits_shape)
            weight_sum = jnp.sum(masked_fill(w_k, mask, 0.0), axis=axis)
    return _Rows(scale, jnp.expand_dims(safe, axis), k, w_y, weight_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _int_ce(logits, labels, mask, class_weights, params, axis, options):
    return _int_ce_fwd(logits, labels, mask, class_weights, params, axis, options)[0]


def _label_terms(z, norm, rows, class_weights, mask, axis, options):
    r"""``(half_nll, half_uniform)`` per example: :math:`-\tfrac12\log a_y` and, under
    smoothing, :math:`\frac1{2K} \sum_c w_c (-\log a_c)` (None without smoothing); halves,
    as :mod:`softmax_jax._cross_entropy_terms` combines them."""
    z_y = jnp.take_along_axis(z, rows.labels, axis=axis)
    half_nll = jnp.squeeze(_ce.half_neg_log_prob(z_y, norm.m, norm.log_s), axis)
    if not options.smoothing:
        return half_nll, None
    w = _axes.along(class_weights, z.ndim, axis)
    half = _ce.half_neg_log_prob(z, norm.m, norm.log_s)
    return half_nll, _ce.half_uniform(half, rows.k, None if w is None else w.astype(z.dtype),
                                      mask, axis)


def _int_ce_fwd(logits, labels, mask, class_weights, params, axis, options):
    ct = params.eps.dtype
    z = masked_fill(logits.astype(ct), mask, -jnp.inf)
    norm = Normalizer.of(z, axis)
    rows = _rows(z.shape, labels, mask, class_weights, axis, options, ct)
    half_nll, half_uniform = _label_terms(z, norm, rows, class_weights, mask, axis, options)
    lse = jnp.squeeze(norm.lse(), axis)
    loss = _ce.loss(half_nll, half_uniform, lse, rows.scale, rows.w_y, params, options)
    # The per-example terms the hyper-parameters' cotangents need are recomputed in the
    # backward pass (and dropped by XLA when no one asks for those cotangents).
    return loss.astype(logits.dtype), (logits, labels, mask, class_weights, params, norm)


def add_at_labels(x: jax.Array, labels: jax.Array, values: jax.Array, axis: int) -> jax.Array:
    """``x`` plus ``values`` at each row's label along ``axis`` (one entry per row).

    A scatter-add of ``labels.size`` entries, which XLA applies in place to the freshly
    computed ``x``. ``labels`` must already lie in ``[0, K)``. On an Explicit mesh the row
    indices carry the labels' sharding, and the result ``x``'s.
    """
    rows = _sharding.typed_sharding(labels)
    index = [jax.lax.broadcasted_iota(labels.dtype, labels.shape, d, out_sharding=rows)
             for d in range(labels.ndim)]
    index.insert(axis, labels)
    return x.at[tuple(index)].add(
        values, unique_indices=True, indices_are_sorted=axis == x.ndim - 1, mode="drop",
        out_sharding=_sharding.typed_sharding(x),
    )


def _int_ce_bwd(axis, options, res, g):
    r"""Integer-label cross-entropy gradient, recomputing :math:`a = e^{(z - m) - \log s}`.

    :math:`\bar z = \bar g\,\big(c\,a - (1 - \epsilon)\,w_y\,\mathrm{onehot}(y) - \epsilon
    w / K\big)` with :math:`c = (1 - \epsilon) w_y + \epsilon W / K + 2\lambda\,\mathrm{lse}`
    (:mod:`softmax_jax._cross_entropy_terms`): the notes' :math:`a - y` when
    :math:`\epsilon = \lambda = 0` and there are no weights. Ignored examples and fully
    masked rows get 0, examples with an out-of-range label get NaN. The hyper-parameters and
    class weights get their exact cotangents from the saved per-example terms.

    For float32/float64 logits the one-hot part is a scatter-add of one entry per row onto
    :math:`\bar g\,(c\,a - \epsilon w/K)`, so the element-wise pass carries no class
    comparison (about a fifth faster on CPU). For bfloat16/float16 logits the gradient is
    rounded to the input dtype in the same pass, so the one-hot stays inside it: subtracting
    it after rounding would lose the precision of :math:`a_y - 1` near :math:`a_y = 1`.
    """
    logits, labels, mask, class_weights, params, norm = res
    ct = params.eps.dtype
    z = masked_fill(logits.astype(ct), mask, -jnp.inf)
    norm = norm.fenced()
    rows = _rows(z.shape, labels, mask, class_weights, axis, options, ct)
    half_nll, half_uniform = _label_terms(z, norm, rows, class_weights, mask, axis, options)
    lse = jnp.squeeze(norm.lse(), axis)
    coef = _ce.prob_coefficient(
        lse, rows.w_y, rows.weight_sum, rows.k_row(axis), params, options)
    w = _axes.along(class_weights, z.ndim, axis)
    off = _ce.class_offset(None if w is None else w.astype(ct), rows.k, params, options)
    # The barrier asks XLA to compute the per-row factors once rather than inside the
    # N x V pass. XLA:CPU fuses them into that pass anyway (the compiled text shows the
    # label checks there); it costs nothing measurable, the work being row-invariant.
    row = jax.lax.optimization_barrier(_ce.row_cotangent(g.astype(ct), rows.scale))
    dz = _logit_cotangent(z, norm, rows, coef, off, _ce.label_coefficient(rows.w_y, params,
                          options), row, logits.dtype, axis, options)
    dz = masked_fill(dz, mask, 0.0)
    d_params = _ce.hyper_cotangents(row, half_nll, half_uniform, lse, rows.w_y, params,
                                    options)
    dw = None
    if class_weights is not None:
        dw = _class_weight_cotangent(row, half_nll, norm, z, rows, mask, params, axis,
                                     options)
        dw = dw.astype(class_weights.dtype)
    return dz.astype(logits.dtype), None, None, dw, d_params


def _logit_cotangent(z, norm, rows, coef, off, on_label, row, dtype, axis, options):
    r""":math:`\bar g\,(c\,a - \epsilon w / K - (1 - \epsilon) w_y\,\mathrm{onehot}(y))`,
    exactly 0 in rows scaled by 0 (whatever their logits hold: a ``where``, not a product).

    Without the z-loss, :math:`\bar g\,c\,a` is :math:`e^{z - m}` times one per-row factor
    (:meth:`Normalizer.scaled_prob`); the z-loss's :math:`c` may overflow to inf where
    :math:`a = 0`, so it is applied with ``times``."""
    row_k = jnp.expand_dims(row, axis)
    coef_k = None if coef is None else jnp.expand_dims(coef, axis)
    labels = jnp.squeeze(rows.labels, axis)
    if z.dtype == dtype and not options.zloss:
        grad = norm.scaled_prob(z, row_k if coef_k is None else row_k * coef_k)
        grad = grad if off is None else grad - row_k * off
        return add_at_labels(jnp.where(row_k == 0, 0.0, grad), labels, -on_label * row, axis)
    a = norm.prob(z)
    if coef_k is not None:
        a = _ce.times(a, coef_k) if options.zloss else a * coef_k
    grad = a if off is None else a - off
    if z.dtype == dtype:
        return add_at_labels(_ce.times(row_k, grad), labels, -on_label * row, axis)
    classes = jax.lax.broadcasted_iota(labels.dtype, z.shape, axis)
    on_label_k = on_label if on_label.ndim == 0 else jnp.expand_dims(on_label, axis)
    return _ce.times(row_k, grad - jnp.where(classes == rows.labels, on_label_k, 0.0))


def _class_weight_cotangent(row, half_nll, norm, z, rows, mask, params, axis, options):
    r""":math:`\bar w_c = \sum_i \bar g_i\,\big((1 - \epsilon)\,\mathrm{nll}_i\,[y_i = c] +
    (\epsilon / K)(-\log a_{ic})\big)`: the loss is linear in the weights. Summed from
    halves and doubled last: :math:`-\log a` itself may overflow where its scaled terms do
    not."""
    k = z.shape[axis]
    # the coefficient first; times() keeps a masked label's infinite nll at eps = 1 out
    coef = (1.0 - params.eps) * row if options.smoothing else row
    hard = _ce.times(coef, half_nll)
    flat_labels = jnp.squeeze(rows.labels, axis).reshape(-1)
    dw = jnp.zeros((k,), row.dtype).at[flat_labels].add(
        hard.reshape(-1), out_sharding=_sharding.replicated(z))
    if options.smoothing:
        share = jnp.expand_dims(params.eps * row, axis) / rows.k
        half = _ce.half_neg_log_prob(z, norm.m, norm.log_s)
        spread = masked_fill(_ce.times(share, half), mask, 0.0)
        dw = dw + _axes.reduce_to_classes(spread, axis)
    return 2.0 * dw


_int_ce.defvjp(_int_ce_fwd, _int_ce_bwd)
_int_ce_jit = jax.jit(_int_ce, static_argnums=(5, 6))


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    ignore_index: int | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy between logits and integer class labels.

    .. math::
        \ell = (1 - \epsilon)\,w_y\,(\mathrm{lse}(z) - z_y)
             + \frac{\epsilon}{K} \sum_c w_c\,(\mathrm{lse}(z) - z_c)
             + \lambda\,\mathrm{lse}(z)^2 .

    With :math:`\epsilon = \lambda = 0` and no weights this is
    :math:`-\log \mathrm{softmax}(z)_y`. Smoothing and class weights follow PyTorch's
    ``F.cross_entropy(weight=w, label_smoothing=eps, reduction="none")``; the z-loss term is
    not weighted. PyTorch's weighted ``"mean"`` divides by the kept examples' label weights:
    ``loss.sum() / jnp.where(labels != ignore_index, w[labels], 0).sum()``.

    Gradient (a ``custom_vjp``): :math:`\partial\ell/\partial z = c\,a - (1 - \epsilon)\,
    w_y\,\mathrm{onehot}(y) - \epsilon w / K` with :math:`c = (1 - \epsilon) w_y +
    \epsilon \sum_c w_c / K + 2\lambda\,\mathrm{lse}`; unweighted, :math:`a - y'`. The
    derivatives with respect to ``label_smoothing``, ``z_loss`` and ``class_weights`` are
    exact too.

    Args:
      logits: floating-point logits, e.g. ``[batch, classes]``.
      labels: integer class indices, ``logits``'s shape without ``axis``.
      axis: the class axis, a tuple of axes (a label is then a flat, C-order index into the
        class axes taken in the order given, as in optax), or None for all axes (a scalar
        label; an extension: optax's integer-label loss refuses ``axis=None``).
      where: optional boolean mask, read as optax reads it: of ``labels``'s rank, one flag
        per example (``expand_dims(where, axis)``, whatever the shapes, square logits
        included); of ``logits``'s rank, one flag per element (NumPy broadcasting, so a
        class mask for every row is ``where[None, :]``); any other rank raises. Masked
        classes are left out of the normaliser; a fully masked row (an example whose flag
        is False) gives loss 0 and gradient 0. A label on a masked class has probability
        0: its loss is ``+inf`` and its logits' gradient :math:`c\,a` over the unmasked
        classes. This is the one documented difference from optax, on purpose: optax's
        integer-label loss gives the finite :math:`\mathrm{lse} - z_y`, as if the class
        took part for the label only, and the dense losses (optax's and
        :func:`softmax_jax.softmax_cross_entropy`, where ``where`` slices the labels too)
        drop the label: each hides the mistake.
      label_smoothing: :math:`\epsilon \in [0, 1]`.
      z_loss: :math:`\lambda \ge 0`, finite.
      ignore_index: a label value (e.g. ``-100``, a Python or NumPy int) whose examples get
        loss 0 and gradient 0.
      class_weights: optional 1-D float array :math:`w`, one weight per class (per
        flattened class for a tuple ``axis``).

    Returns:
      Per-example losses, ``labels``'s shape, in ``logits``'s dtype. A label outside
      ``[0, K)`` that is not ``ignore_index`` gives NaN for its example (so does a traced
      ``label_smoothing`` or ``z_loss`` outside its range, which cannot raise under
      ``jit``), and NaN gradients wherever its cotangent is non-zero; an example whose
      cotangent is exactly 0 gets a gradient of exactly 0, whatever its label or logits
      hold, so that masking padding outside the loss (``jnp.where(mask, loss, 0)``, as
      optax users write it) gives finite gradients. NumPy 64-bit labels beyond the int32
      range raise ``ValueError`` without x64.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> logits = jnp.array([[2.0, 3.0, 4.0], [1.0, 1.0, 1.0]])
      >>> print(sj.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 0])))
      [1.4076 1.0986]
      >>> loss = lambda z: sj.softmax_cross_entropy_with_integer_labels(z, jnp.array([1])).sum()
      >>> print(jax.grad(loss)(logits[:1]))
      [[ 0.0900 -0.7553  0.6652]]
      >>> w = jnp.array([1.0, 2.0, 0.5])
      >>> print(sj.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 0]),
      ...                                                    class_weights=w))
      [2.8152 1.0986]
    """
    logits = _v.as_float_array("logits", logits)
    labels, ignore_index = _ce.labels_and_ignore(
        labels, ignore_index, "; for probability targets use softmax_cross_entropy")
    axis = _axes.class_axes(axis, logits.ndim, "logits")
    classes = axis if isinstance(axis, tuple) else (axis,)
    expected = tuple(n for d, n in enumerate(logits.shape) if d not in classes)
    if labels.shape != expected:
        raise ValueError(
            f"labels.shape={tuple(labels.shape)} must be logits.shape={tuple(logits.shape)}"
            f" without axis {axis}, i.e. {tuple(expected)}"
        )
    where = _v.loss_where(where, logits.shape, classes)
    if isinstance(axis, tuple):
        # A label is a flat index into the class axes, in the order given (optax's reading).
        flat = _axes.Flattening.of(logits.shape, axis)
        return softmax_cross_entropy_with_integer_labels(
            flat.flatten(logits), labels, -1, flat.where(where),
            label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
            class_weights=class_weights,
        )
    _sharding.check_class_axis(logits, axis, "logits")
    weights = _ce.check_class_weights(class_weights, logits.shape[axis])
    params, options = _ce.hyperparameters(
        label_smoothing, z_loss, ignore_index, weights is not None)
    ct = _v.compute_dtype(logits.dtype)
    mask = _v.prepare_where(where, logits.shape, (axis,))
    return _int_ce_jit(logits, labels, mask, weights, params.astype(ct), axis, options)
