r"""Softmax cross-entropy with dense (probability) labels and its ``custom_vjp`` rule.

The loss returns per-example values (the caller reduces), computes in at least float32 and
returns the loss in the logits' dtype; gradients come back in each input's dtype. The rule
saves the inputs and O(N) per-example numbers (the normaliser's two parts and the summed
weighted targets), never an N x V tensor: the backward pass recomputes
:math:`a = e^{(z - m) - \log s}` inside its single fused pass. The integer-label loss is in
:mod:`softmax_jax.integer_cross_entropy`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from softmax_jax import _axes
from softmax_jax import _cross_entropy_terms as _ce
from softmax_jax import _validation as _v
from softmax_jax._dense_gap import weighted_gap
from softmax_jax._normalizer import Normalizer, masked_fill

__all__ = ["softmax_cross_entropy"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _dense_ce(logits, labels, mask, class_weights, params, axis, options):
    return _dense_ce_fwd(logits, labels, mask, class_weights, params, axis, options)[0]


def _dense_targets(labels, mask, class_weights, params, axis, options, ct):
    """``(y, y', w y')``: the labels with the masked classes' entries dropped (``where``
    slices them away, as in optax), the smoothed labels :math:`(1 - \\epsilon) y +
    \\epsilon / K` (over the :math:`K` unmasked classes) and the same times the class
    weights."""
    y = masked_fill(labels.astype(ct), mask, 0.0)
    smooth = y
    if options.smoothing:
        share = params.eps / _axes.class_count(y.shape, axis, mask)
        smooth = (1.0 - params.eps) * y + masked_fill(share, mask, 0.0)
    w = _axes.along(class_weights, y.ndim, axis)
    return y, smooth, (smooth if w is None else w.astype(ct) * smooth)


def _dense_ce_fwd(logits, labels, mask, class_weights, params, axis, options):
    ct = params.eps.dtype
    z = masked_fill(logits.astype(ct), mask, -jnp.inf)
    # The barrier keeps XLA from fusing the label sums below into the normaliser's passes,
    # a fusion that materialises z - m as an N x V temporary (500 MiB more at 4096 x 32000).
    norm = Normalizer(*jax.lax.optimization_barrier(tuple(Normalizer.of(z, axis))))
    _, _, yw = _dense_targets(labels, mask, class_weights, params, axis, options, ct)
    # sum_k w_k y_k (-log a_k) = sum_k w_k y_k (m - z_k) + log s * sum_k w_k y_k; weighted_gap
    # says how the first sum stays exact where a zero target meets a -inf logit.
    sum_yw = jnp.sum(yw, axis=axis, keepdims=True)
    gap = weighted_gap(yw, z, norm.m, axis, masked=mask is not None)
    loss = jnp.squeeze(gap + _ce.times(sum_yw, norm.log_s), axis)
    lse = jnp.squeeze(norm.lse(), axis)
    if options.zloss:
        loss = loss + _ce.times(params.lam, jnp.square(lse))
    # Keep a NaN logit visible even in a row whose targets are all zero.
    loss = jnp.where(jnp.isnan(lse), lse, loss)
    keep = _axes.any_unmasked(mask, z.shape, axis)
    if keep is not None:
        loss = jnp.where(keep, loss, 0.0)
    res = (logits, labels, mask, class_weights, params, norm, sum_yw)
    return loss.astype(logits.dtype), res


def _dense_ce_bwd(axis, options, res, g):
    r"""Dense cross-entropy gradients, recomputing :math:`a = e^{(z - m) - \log s}`.

    With :math:`u = w \odot y'` (weighted, smoothed labels):
    logits :math:`\bar z = \bar g\,\big((\sum_k u_k + 2\lambda\,\mathrm{lse})\,a - u\big)`,
    the notes' :math:`a - y` for one-hot, unweighted ``y``; labels :math:`\bar y =
    \bar g\,(1 - \epsilon)\,w\,(-\log a)`; class weights :math:`\bar w_c = \sum_i \bar g_i\,
    y'_{ic}\,(-\log a_{ic})`; :math:`\bar\epsilon = \sum_i \bar g_i \sum_c w_c (1/K -
    y_{ic})(-\log a_{ic})`; :math:`\bar\lambda = \sum_i \bar g_i\,\mathrm{lse}_i^2`.
    """
    logits, labels, mask, class_weights, params, norm, sum_yw = res
    ct = params.eps.dtype
    z = masked_fill(logits.astype(ct), mask, -jnp.inf)
    norm = norm.fenced()
    keep = _axes.any_unmasked(mask, z.shape, axis)
    g = _ce.row_cotangent(g.astype(ct), jnp.ones((), ct) if keep is None else keep.astype(ct))
    g_k = jnp.expand_dims(g, axis)
    # -log a / 2: each product below is scaled first and doubled last, so that it is finite
    # wherever its true value is, even when -log a itself overflows.
    half = _ce.half_neg_log_prob(z, norm.m, norm.log_s)
    kept, y, yw = _dense_targets(labels, mask, class_weights, params, axis, options, ct)
    lse = jnp.squeeze(norm.lse(), axis)
    coef = sum_yw
    if options.zloss:
        coef = coef + 2.0 * params.lam * _ce.finite_lse(norm.lse())
    dz = masked_fill(_ce.times(g_k, _ce.times(norm.prob(z), coef) - yw), mask, 0.0)
    w = _axes.along(class_weights, z.ndim, axis)
    unit = 2.0 * ((1.0 - params.eps) * g_k if options.smoothing else g_k)
    dy = masked_fill(_ce.times(unit if w is None else unit * w, half), mask, 0.0)
    dw = None
    if class_weights is not None:
        dw = _axes.reduce_to_classes(_ce.times(2.0 * g_k * y, half), axis)
        dw = dw.astype(class_weights.dtype)
    half_hard = half_uniform = None
    if options.smoothing:
        wk = jnp.ones((), ct) if w is None else w
        k = _axes.class_count(z.shape, axis, mask)
        half_hard = jnp.sum(_ce.times(wk * kept, half), axis=axis)
        half_uniform = _ce.half_uniform(half, k, w, mask, axis)
    d_params = _ce.hyper_cotangents(g, half_hard, half_uniform, lse, None, params, options)
    return dz.astype(logits.dtype), dy.astype(labels.dtype), None, dw, d_params


_dense_ce.defvjp(_dense_ce_fwd, _dense_ce_bwd)
_dense_ce_jit = jax.jit(_dense_ce, static_argnums=(5, 6))


def _dense_labels(logits: jax.Array, labels: jax.typing.ArrayLike,
                  classes: tuple[int, ...]) -> jax.Array:
    """The labels as optax takes them, broadcast to ``logits``'s shape (outside the rule, so
    that autodiff sums their gradient back to their own shape): floating point, or integer
    or boolean one-hot labels (cast to ``logits``'s dtype) of ``logits``'s rank whose class
    axes ``classes`` have the logits' sizes."""
    arr = jnp.asarray(labels)
    exact = jnp.issubdtype(arr.dtype, jnp.integer) or arr.dtype == jnp.bool_
    if not (exact or jnp.issubdtype(arr.dtype, jnp.floating)):
        raise TypeError(
            f"labels must be a floating-point array of probabilities or integer one-hot"
            f" labels, got dtype {arr.dtype} (shape {tuple(arr.shape)})"
        )
    # Integer labels that are not one-hot along the class axes (a lower rank, or a size-1
    # class axis: (N,) or (N, 1)) are far more often class indices than a one-hot row
    # meant for every example (which optax would broadcast): refuse them.
    one_hot = arr.ndim == logits.ndim and all(arr.shape[a] == logits.shape[a] for a in classes)
    fits = _v.broadcasts_to(arr.shape, logits.shape) and (one_hot or not exact)
    if not fits:
        hint = "; for class indices use softmax_cross_entropy_with_integer_labels" if exact else ""
        raise ValueError(
            f"labels.shape={tuple(arr.shape)} must equal or broadcast to"
            f" logits.shape={tuple(logits.shape)}"
            f"{' (integer one-hot labels: of the same rank, the class axes full)' if exact else ''}"
            f"{hint}"
        )
    if exact:
        arr = arr.astype(logits.dtype)
    return jnp.broadcast_to(arr, logits.shape)


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy between logits and probability (one-hot or soft) labels.

    .. math::
        \ell = -\sum_k w_k\,y'_k \log \mathrm{softmax}(z)_k + \lambda\,\mathrm{lse}(z)^2
             = \sum_k w_k\,y'_k\,(\mathrm{lse}(z) - z_k) + \lambda\,\mathrm{lse}(z)^2,

    with :math:`y' = (1 - \epsilon) y + \epsilon / K` the labels smoothed by
    ``label_smoothing`` :math:`= \epsilon` (:math:`K` = number of unmasked classes) and
    :math:`w` the class weights (1 when not given), as in PyTorch's
    ``F.cross_entropy(weight=w, label_smoothing=eps, reduction="none")``.

    Gradient (a ``custom_vjp``): :math:`\partial\ell/\partial z = (\sum_k w_k y'_k)\,a - w
    \odot y' + 2\lambda\,\mathrm{lse}\,a`, which is :math:`a - y` for one-hot labels without
    weights; :math:`\partial\ell/\partial y = -(1 - \epsilon)\,w \log a`. The derivatives
    with respect to ``label_smoothing``, ``z_loss`` and ``class_weights`` are exact too.

    Args:
      logits: floating-point logits, e.g. ``[batch, classes]``.
      labels: target distributions of ``logits``'s shape or one that broadcasts to it
        (a ``[classes]`` row for every example), floating point; or integer/boolean
        one-hot labels of ``logits``'s rank, cast to ``logits``'s dtype (as in optax). Integer
        or boolean labels of a lower rank, or with a class axis of size 1 (``(N, 1)``),
        raise: they are far more likely class indices. The labels' gradient has the
        labels' shape.
      axis: the class axis, a tuple of axes that together index the classes, or None for
        all axes.
      where: optional boolean mask, read as optax reads it: with one axis fewer than
        ``logits`` (the class axes dropped), one flag per example (``expand_dims(where,
        axis)``, square logits included); of ``logits``'s rank, one flag per element
        (NumPy broadcasting: a class mask for every row is ``where[None, :]``); any other
        rank raises. Masked classes are left out of the normaliser and of the smoothing;
        a fully masked row (an example whose flag is False) gives loss 0 and gradient 0.
        ``where`` slices, labels included, as in optax: the result equals the loss of
        ``logits[where]`` and ``labels[where]``, so label mass on a masked class is
        dropped, and the labels' and class weights' gradients are 0 there. (The
        integer-label loss differs on purpose: a label on a masked class gives ``+inf``.)
      label_smoothing: :math:`\epsilon \in [0, 1]`.
      z_loss: finite :math:`\lambda \ge 0`, the weight of the :math:`\mathrm{lse}^2` penalty
        that keeps the normaliser near 0 (as in PaLM). It is not weighted by
        ``class_weights``.
      class_weights: optional 1-D float array, one weight per class (per flattened class
        for a tuple ``axis``).

    Returns:
      Per-example losses: ``logits``'s shape without ``axis``, in ``logits``'s dtype.
      A traced ``label_smoothing`` or ``z_loss`` outside its range cannot raise under
      ``jit``: it gives NaN.

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
    axis = _axes.class_axes(axis, logits.ndim, "logits")
    classes = axis if isinstance(axis, tuple) else (axis,)
    labels = _dense_labels(logits, labels, classes)
    where = _v.loss_where(where, logits.shape, classes)
    if isinstance(axis, tuple):
        flat = _axes.Flattening.of(logits.shape, axis)
        return softmax_cross_entropy(
            flat.flatten(logits), flat.flatten(labels), -1, flat.where(where),
            label_smoothing=label_smoothing, z_loss=z_loss, class_weights=class_weights)
    weights = _ce.check_class_weights(class_weights, logits.shape[axis])
    params, options = _ce.hyperparameters(label_smoothing, z_loss, None, weights is not None)
    ct = _v.compute_dtype(logits.dtype)
    mask = _v.prepare_where(where, logits.shape, (axis,))
    return _dense_ce_jit(logits, labels, mask, weights, params.astype(ct), axis, options)
