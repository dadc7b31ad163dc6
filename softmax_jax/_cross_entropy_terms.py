r"""The per-example terms of the integer-label softmax cross-entropy, written once.

Both the core loss (:func:`softmax_jax.softmax_cross_entropy_with_integer_labels`, which
sees whole rows of logits) and the blockwise large-vocabulary losses (``softmax_jax.fused``,
which see one block of a row at a time) reduce a row to a few numbers first:

- ``half_nll``: :math:`-\tfrac12\log a_y`, half the negative log-probability of the label;
- ``half_uniform``: :math:`\frac1{2K} \sum_c w_c\,(-\log a_c)`, half the smoothing term
  (unweighted: :math:`w_c = 1`);
- ``lse``: :math:`\log\sum_c e^{z_c}`, for the z-loss.

The two label terms are carried as halves (:func:`half_neg_log_prob`): :math:`-\log a_y`
alone reaches :math:`4 \times 10^{38}` for logits of :math:`\pm 2 \times 10^{38}`, beyond
float32, where :math:`(1 - \epsilon)\,\mathrm{nll} + \epsilon\,\mathrm{uniform}` does
not. Every combination below scales the halves first and doubles last, so the loss and the
derivatives are finite wherever their true values are (and infinite where those lie beyond
the float range, :math:`\epsilon = 0` there included).

This module turns those numbers into the loss and into the coefficients of the logit
gradient, so the semantics of label smoothing (PyTorch's convention), the z-loss, class
weights (PyTorch's ``weight``), ``ignore_index`` and invalid labels live in one place:

.. math::
    \ell = (1 - \epsilon)\,w_y\,\mathrm{nll} + \epsilon\,\mathrm{uniform}
           + \lambda\,\mathrm{lse}^2 ,

    \frac{\partial\ell}{\partial z_c} = a_c\,\big((1 - \epsilon) w_y + \epsilon W / K
           + 2\lambda\,\mathrm{lse}\big) - (1 - \epsilon)\,w_y\,[c = y] - \epsilon\,w_c / K,

with :math:`W = \sum_c w_c` over the :math:`K` classes taking part. Unweighted, the
coefficient of :math:`a` is :math:`1 + 2\lambda\,\mathrm{lse}` and the gradient is the notes'
:math:`a - y` with a smoothed :math:`y`. The loss is linear in :math:`\epsilon` and
:math:`\lambda`, so their exact derivatives are one number per example:
:math:`\partial\ell/\partial\epsilon = \mathrm{uniform} - w_y\,\mathrm{nll}` and
:math:`\partial\ell/\partial\lambda = \mathrm{lse}^2`.

Every product whose coefficient may be exactly 0 while its other factor is infinite
(:math:`\epsilon = 0` with a :math:`-\infty` logit, :math:`a_c = 0` with an overflowing
:math:`2\lambda\,\mathrm{lse}`, an ignored example) goes through :func:`times`, which gives 0
there: the limit, and what the Python literal 0 would give, never :math:`0 \cdot \infty`.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax import _validation as _v

_INT32 = np.iinfo(np.int32)


class Options(NamedTuple):
    """Static (hashable) choices of one call."""

    smoothing: bool  # False only for a concrete label_smoothing of 0: the term is dropped
    zloss: bool  # likewise for z_loss
    ignore_index: int | None
    weighted: bool  # class weights given


class Params(NamedTuple):
    """The traced hyper-parameters, as 0-d arrays (new values do not recompile)."""

    eps: jax.Array
    lam: jax.Array

    def astype(self, dtype: np.dtype) -> Params:
        return Params(self.eps.astype(dtype), self.lam.astype(dtype))


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def integer_labels(labels: jax.typing.ArrayLike, hint: str = "") -> jax.Array:
    """Integer class labels as a JAX array of at least 32 signed bits.

    Narrow labels are widened to int32. Unsigned labels become the signed integer of their
    width (int64 for uint64 under x64, else int32), with every value beyond the signed range
    read as the signed maximum: out of range, hence NaN, never wrapped onto a valid class
    (uint64 2**32 + 1 would read as 1) or onto a negative ``ignore_index`` (uint32
    2**32 - 100 would read as -100). NumPy 64-bit labels beyond the int32 range raise
    ``ValueError`` when JAX runs without x64, where converting them would wrap before any
    check could see them.
    """
    x64 = jax.dtypes.canonicalize_dtype(np.int64) == np.int64
    if not x64 and isinstance(labels, (np.ndarray, np.generic)):
        host = np.asarray(labels)
        if (
            np.issubdtype(host.dtype, np.integer)
            and host.dtype.itemsize > 4
            and host.size
            and (host.min() < _INT32.min or host.max() > _INT32.max)
        ):
            raise ValueError(
                f"labels hold values outside the int32 range ({int(host.min())} to"
                f" {int(host.max())}); without jax_enable_x64 they would wrap onto other"
                " classes"
            )
    arr = _v.as_int_array("labels", labels, hint)
    if jnp.issubdtype(arr.dtype, jnp.unsignedinteger):
        info = np.iinfo(np.int64) if x64 and arr.dtype.itemsize == 8 else _INT32
        if arr.dtype.itemsize * 8 >= info.bits:
            arr = jnp.minimum(arr, info.max)
        return arr.astype(info.dtype)
    return arr.astype(jnp.int32) if arr.dtype.itemsize < 4 else arr


def labels_and_ignore(
    labels: jax.typing.ArrayLike, ignore_index: object, hint: str = ""
) -> tuple[jax.Array, int | None]:
    """``(labels, ignore_index)``: the labels widened by :func:`integer_labels`, and
    ``ignore_index`` checked against the labels' own dtype (``ValueError`` when no label of
    that dtype could equal it: ``uint8`` labels with ``-100``, ``int8`` labels with 300).

    An unsigned label equal to an ``ignore_index`` beyond the signed range of the widened
    labels (``uint32`` labels, ``2**32 - 1``) is mapped to -1, which then stands for
    ``ignore_index``: widened unsigned labels are never negative otherwise.
    """
    ignore = check_ignore_index(ignore_index)
    own = np.dtype(getattr(labels, "dtype", None) or jnp.asarray(labels).dtype)
    widened = integer_labels(labels, hint)
    if ignore is None or not np.issubdtype(own, np.integer):
        return widened, ignore
    info = np.iinfo(own)
    if not info.min <= ignore <= info.max:
        raise ValueError(
            f"ignore_index={ignore} lies outside the range of the {own} labels"
            f" ([{info.min}, {info.max}]), so no label could equal it"
        )
    if ignore <= np.iinfo(widened.dtype).max:
        return widened, ignore
    raw = jnp.asarray(labels)
    return jnp.where(raw == jnp.asarray(ignore, raw.dtype), -1, widened), -1


def check_ignore_index(ignore_index: object) -> int | None:
    """``ignore_index`` as a Python int (NumPy integers accepted) or None."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    return int(ignore_index)


def check_class_weights(class_weights: object, num_classes: int) -> jax.Array | None:
    """``class_weights`` as a 1-D floating-point array of one weight per class, or None."""
    if class_weights is None:
        return None
    arr = jnp.asarray(class_weights)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"class_weights must be a floating-point array, got dtype {arr.dtype}"
            f" (shape {tuple(arr.shape)})"
        )
    if arr.shape != (num_classes,):
        raise ValueError(
            f"class_weights must be a 1-D array of one weight per class, shape"
            f" ({num_classes},), got shape {tuple(arr.shape)}"
        )
    return arr


def hyperparameters(
    label_smoothing: object, z_loss: object, ignore_index: object, weighted: bool
) -> tuple[Params, Options]:
    r"""Checks the cross-entropy hyper-parameters; see :func:`_validation.hyperparameter`
    (a concrete value out of range raises, a traced one cannot and becomes NaN).
    :math:`\epsilon \in [0, 1]`; :math:`\lambda \in [0, \infty)`, finite."""
    eps, smoothing = _v.hyperparameter("label_smoothing", label_smoothing, 0.0, 1.0)
    lam, zloss = _v.hyperparameter("z_loss", z_loss, 0.0, None, finite=True)
    options = Options(smoothing, zloss, check_ignore_index(ignore_index), weighted)
    return Params(eps, lam), options


# --------------------------------------------------------------------------------------------
# Per-example terms
# --------------------------------------------------------------------------------------------


def times(coef: jax.Array, x: jax.Array) -> jax.Array:
    """``coef * x``, but exactly 0 where ``coef`` is 0, even if ``x`` is infinite or NaN."""
    return jnp.where(coef == 0, 0.0, coef * x)


def row_cotangent(g: jax.Array, scale: jax.Array) -> jax.Array:
    r"""A row's weight :math:`\bar g_i\,s_i` in a backward pass: the incoming cotangent times
    the row's scale (:func:`row_scale`), exactly 0 where either is 0.

    Every custom rule takes its cotangent through here, so that a row whose cotangent is 0
    (masked outside the loss, as in ``jnp.where(mask, loss, 0)``) gets a gradient of exactly
    0 whatever its label or logits hold, a NaN scale (invalid label) included; and an
    ignored row (scale 0) gets 0 whatever its cotangent holds. A NaN scale with a non-zero
    cotangent stays NaN."""
    return jnp.where((g == 0) | (scale == 0), 0.0, g * scale)


def zero_without_cotangent(dx: jax.Array, *cotangents: jax.Array) -> jax.Array:
    r"""The gradient ``dx``, but exactly 0 where it is NaN and every one of ``cotangents``
    (each broadcasting to ``dx``) is 0: the rule of :func:`row_cotangent` for a rule whose
    gradient is not simply its cotangent times a factor. A NaN input (or a zero probability
    under a logarithm) makes ``dx`` NaN even under a zero cotangent; this gives 0 there.

    The cotangents are those whose being 0 makes a finite ``dx`` 0: the entry's own (an
    element-wise function), the row's (``logsumexp``, ``softmax_entropy``), or a row-level
    summary of them (the softmax's :math:`\max_k |\bar a_k|`, the log-softmax's
    :math:`\bar g_j` and :math:`\sum_k \bar g_k`). Where ``dx`` is a number the select is
    the identity, value and derivative alike: a select on the cotangent alone would lose the
    derivative along the cotangent where that is exactly 0, such as at a logit of 0 in
    ``(softmax(z) * z).sum()``. A NaN cotangent is not zero. It is one element-wise select,
    which fuses with an element-wise producer; XLA:CPU's fusion of a reduction with its
    element-wise consumer (the softmax family's backward pass) takes no select, so there it
    costs one more read and write of ``dx``."""
    drop = jnp.isnan(dx)
    for c in cotangents:
        drop = drop & (c == 0)
    return jnp.where(drop, 0.0, dx)


def half_neg_log_prob(z: jax.Array, m: jax.Array, log_s: jax.Array) -> jax.Array:
    r""":math:`-\tfrac12 \log a = \tfrac12 (m - z) + \tfrac12 \log s` from the
    normaliser's two parts (``m``, ``log_s``: keepdims), formed as :math:`m/2 - z/2`.

    :math:`m - z` overflows once the logits span more than the largest float
    (:math:`m = 2 \times 10^{38}`, :math:`z = -2 \times 10^{38}`) although the smoothing
    term :math:`\frac{\epsilon}{K}(m - z)` and its derivatives are finite. Halving is exact
    in binary (up to subnormals), so :math:`2 (m/2 - z/2)` is the correctly rounded
    :math:`m - z` wherever that is finite: callers scale the half first and double last.
    """
    return (0.5 * m - 0.5 * z) + 0.5 * jnp.where(log_s == -jnp.inf, 0.0, log_s)


def half_uniform(
    half: jax.Array, k: int | jax.Array, w: jax.Array | None, mask: jax.Array | None,
    axis: int,
) -> jax.Array:
    r"""Half the smoothing term, :math:`\frac1{2K} \sum_c w_c\,(-\log a_c)`, per example
    (``axis`` dropped), from :func:`half_neg_log_prob` ``half``; ``w`` broadcasts along
    ``axis`` (None: unweighted), ``k`` is per row (keepdims) or an int, masked classes add
    nothing. Finite wherever its true value is: each term is divided by :math:`K` before
    the sum."""
    terms = half if w is None else times(w, half)
    terms = terms / k
    if mask is not None:
        terms = jnp.where(mask, terms, 0.0)
    return jnp.sum(terms, axis=axis)


def row_scale(
    labels: jax.Array, num_classes: int | jax.Array, ignore_index: int | None,
    keep: jax.Array | None = None, dtype: np.dtype | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(scale, valid)`` per example: ``scale`` is 1 for a counted example, 0 for an ignored
    one (or one that ``keep`` drops, such as a fully masked row) and NaN for a label outside
    ``[0, num_classes)``, so a bad label never yields a plausible loss or gradient;
    ``valid`` says whether the label is in range. ``ignore_index`` comes from
    :func:`labels_and_ignore`, which checked it against the labels' own dtype."""
    dtype = np.dtype(np.float32) if dtype is None else dtype
    valid = (labels >= 0) & (labels < num_classes)
    scale = jnp.where(valid, jnp.ones((), dtype), jnp.full((), jnp.nan, dtype))
    drop = jnp.zeros(labels.shape, bool) if ignore_index is None else labels == ignore_index
    if keep is not None:
        drop = drop | ~keep
    return jnp.where(drop, jnp.zeros((), dtype), scale), valid


def safe_labels(labels: jax.Array, valid: jax.Array) -> jax.Array:
    """Labels with the out-of-range ones replaced by class 0, for gathers (their example is
    NaN through its scale anyway)."""
    return jnp.where(valid, labels, 0)


def _half_hard(
    half_nll: jax.Array, w_y: jax.Array | None, params: Params, options: Options
) -> jax.Array:
    r""":math:`\tfrac12 (1 - \epsilon)\,w_y\,\mathrm{nll}`, the coefficient formed first (a
    masked label's infinite nll counts 0 where the coefficient is 0)."""
    if w_y is None and not options.smoothing:
        return half_nll
    return times(label_coefficient(w_y, params, options), half_nll)


def loss(
    half_nll: jax.Array, half_uniform: jax.Array | None, lse: jax.Array, scale: jax.Array,
    w_y: jax.Array | None, params: Params, options: Options,
) -> jax.Array:
    r"""Per-example loss :math:`s\,((1 - \epsilon)\,w_y\,\mathrm{nll} + \epsilon\,
    \mathrm{uniform} + \lambda\,\mathrm{lse}^2)`, with ``s`` the :func:`row_scale`, from
    the halved label terms (doubled after scaling)."""
    out = _half_hard(half_nll, w_y, params, options)
    if options.smoothing:
        assert half_uniform is not None
        out = out + times(params.eps, half_uniform)
    out = 2.0 * out
    if options.zloss:
        out = out + times(params.lam, jnp.square(lse))
    return times(scale, out)


def finite_lse(lse: jax.Array) -> jax.Array:
    r"""``lse`` with the :math:`-\infty` of an empty row read as 0 (the row's
    probabilities are all 0, so no gradient term needs it)."""
    return jnp.where(lse == -jnp.inf, 0.0, lse)


def prob_coefficient(
    lse: jax.Array, w_y: jax.Array | None, weight_sum: jax.Array | None,
    num_classes: int | jax.Array, params: Params, options: Options,
) -> jax.Array | None:
    r"""The per-example factor :math:`c` of :math:`a` in the logit gradient,
    :math:`(1 - \epsilon) w_y + \epsilon W / K + 2\lambda\,\mathrm{lse}`, or None when it is
    exactly 1 (unweighted, no z-loss). Apply it with ``times(a, c)``: an overflowing
    :math:`\mathrm{lse}` must not turn :math:`a_c = 0` into NaN."""
    coef = None
    if w_y is not None:
        coef = w_y
        if options.smoothing:
            assert weight_sum is not None
            coef = (1.0 - params.eps) * w_y + params.eps * weight_sum / num_classes
    if options.zloss:
        z = 2.0 * params.lam * finite_lse(lse)
        coef = 1.0 + z if coef is None else coef + z
    return coef


def label_coefficient(w_y: jax.Array | None, params: Params, options: Options) -> jax.Array:
    r"""What the label's class loses in the logit gradient: :math:`(1 - \epsilon)\,w_y`."""
    coef = jnp.ones((), params.eps.dtype) if w_y is None else w_y
    return (1.0 - params.eps) * coef if options.smoothing else coef


def class_offset(
    class_weights: jax.Array | None, num_classes: int | jax.Array, params: Params,
    options: Options,
) -> jax.Array | None:
    r"""What every class loses in the logit gradient under smoothing,
    :math:`\epsilon\,w_c / K` (a scalar unweighted, a vector weighted), or None."""
    if not options.smoothing:
        return None
    if class_weights is None:
        return params.eps / num_classes
    return params.eps * class_weights / num_classes


def hyper_cotangents(
    g_row: jax.Array, half_nll: jax.Array | None, half_uniform: jax.Array | None,
    lse: jax.Array, w_y: jax.Array | None, params: Params, options: Options,
) -> Params:
    r"""Exact cotangents of :math:`\epsilon` and :math:`\lambda`, given each example's
    cotangent times its scale ``g_row``:
    :math:`\sum_i g_i(\mathrm{uniform}_i - w_{y_i}\mathrm{nll}_i)` (from the halves,
    doubled after the sum) and :math:`\sum_i g_i\,\mathrm{lse}_i^2` (0 for a term that is
    switched off statically)."""
    zero = jnp.zeros((), params.eps.dtype)
    d_eps = d_lam = zero
    if options.smoothing:
        assert half_uniform is not None and half_nll is not None
        hard = half_nll if w_y is None else times(w_y, half_nll)
        d_eps = 2.0 * jnp.sum(times(g_row, half_uniform - hard))
    if options.zloss:
        d_lam = jnp.sum(times(g_row, jnp.square(lse)))
    # A traced hyper-parameter out of range arrives as NaN and makes the loss NaN; its
    # derivatives are NaN too, not the plausible numbers the terms above would give.
    invalid = jnp.isnan(params.eps) | jnp.isnan(params.lam)
    d_eps, d_lam = (jnp.where(invalid, jnp.nan, d) for d in (d_eps, d_lam))
    return Params(d_eps.astype(params.eps.dtype), d_lam.astype(params.lam.dtype))
