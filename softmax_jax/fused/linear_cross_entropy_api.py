r"""The public fused cross-entropy, :func:`linear_softmax_cross_entropy`: its arguments,
checked and turned into the engine's call, and the statistics it returns (:class:`FusedStats`).
The per-block rule, with the formulas, is :class:`.linear_cross_entropy.Rule`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
from jax import lax

from softmax_jax import _cross_entropy_terms as _ce
from softmax_jax import _validation as _v

from . import args, auto, blocks, vjp, vma
from .layout import BlockLayout
from .linear_cross_entropy import Consts, Params, Rule

__all__ = ["FusedStats", "linear_softmax_cross_entropy"]


class FusedStats(NamedTuple):
    r"""Per-token statistics from the loss's own pass.

    Attributes:
      lse: ``[N]`` log-sum-exp of each token's (soft-capped) logits over the global
        vocabulary, in the compute dtype (float32; float64 for float64 inputs).
        Differentiable: its cotangent :math:`\bar g` adds :math:`\bar g\,a` (the softmax)
        to the logit gradient in the loss's own backward pass, so a loss built on it, such
        as the selective log-softmax ``z_y - lse``, has its true gradient.
      argmax: ``[N]`` int32 predicted class (global id; the first of equal maxima; no
        gradient).
    """

    lse: jax.Array
    argmax: jax.Array


class _Call(NamedTuple):
    """The engine's call of one checked :func:`linear_softmax_cross_entropy`."""

    static: vjp.Static
    x: jax.Array  # [N, D]
    w: jax.Array
    b: jax.Array | None
    consts: Consts
    params: Params
    cap: jax.Array
    lead: tuple[int, ...]  # x's leading (token) shape


def _class_weights(weights: jax.Array | None, labels: jax.Array, ct: Any,
                   axis_name: Hashable | None) -> tuple[jax.Array | None, jax.Array | None]:
    """``(w_y, W)``: each label's class weight and the global sum of the (constant) class
    weights; both None unweighted."""
    if weights is None:
        return None, None
    weights = lax.stop_gradient(weights).astype(ct)
    weight_sum = jnp.sum(weights)
    if axis_name is not None:
        weight_sum = lax.psum(weight_sum, axis_name)
    return args.local_gather(weights, labels, axis_name), weight_sum


def _checked(x, w, labels, b, reduction, ignore_index, where, label_smoothing, z_loss,
             soft_cap, class_weights, return_stats, axis_name, token_block,
             vocab_block) -> _Call:
    """The arguments checked (each error names its argument) and the engine's call."""
    x, w, b, lead = args.head(x, w, b)
    label_arr, ignore_index = _ce.labels_and_ignore(labels, ignore_index)
    labels = args.labels_for(label_arr, lead)
    n, v = x.shape[0], w.shape[1]
    reduction = args.reduction(reduction)
    weights = _ce.check_class_weights(class_weights, v)
    params, options = _ce.hyperparameters(
        label_smoothing, z_loss, ignore_index, weights is not None)
    cap, capped = args.soft_cap(soft_cap)
    vma.check_vocab_axes(axis_name, x, {"w": w, "b": b, "class_weights": weights})
    layout = BlockLayout.resolve(n, x.shape[1], v, w.dtype.itemsize, token_block, vocab_block,
                                 per_token=reduction == "none")
    ct = args.compute_dtype(x, w)
    w_y, weight_sum = _class_weights(weights, labels, ct, axis_name)
    rule = Rule(options, blocks.num_classes(v, axis_name), bool(return_stats))
    static = args.static(rule, axis_name, layout, capped, reduction, bool(return_stats), x, w, b)
    full = Params(params.astype(ct), jnp.zeros((), ct) if weight_sum is None else weight_sum)
    consts = Consts(labels, w_y, None if weights is None else lax.stop_gradient(weights),
                    _v.token_where(where, lead))
    return _Call(static, x, w, b, consts, full, cap.astype(ct), lead)


@overload
def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    soft_cap: float | jax.typing.ArrayLike | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    return_stats: Literal[False] = False,
    axis_name: Hashable | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
) -> jax.Array: ...


@overload
def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    soft_cap: float | jax.typing.ArrayLike | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    return_stats: Literal[True],
    axis_name: Hashable | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
) -> tuple[jax.Array, FusedStats]: ...


def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    soft_cap: float | jax.typing.ArrayLike | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    return_stats: bool = False,
    axis_name: Hashable | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
) -> jax.Array | tuple[jax.Array, FusedStats]:
    r"""Softmax cross-entropy of a linear layer's logits, without materialising the logits.

    With logits :math:`z = x W + b` (capped to :math:`\mathrm{cap}\,\tanh(z/\mathrm{cap})`
    when ``soft_cap`` is set) and class weights :math:`w_c` (1 without ``class_weights``),
    per token

    .. math::
        \ell = (1 - \epsilon)\,w_y\,(\mathrm{lse}(z) - z_y)
             + \frac{\epsilon}{V} \sum_{c=1}^{V} w_c\,(\mathrm{lse}(z) - z_c)
             + \lambda\,\mathrm{lse}(z)^2 ,

    exactly :func:`softmax_jax.softmax_cross_entropy_with_integer_labels` applied to
    ``x @ w + b``, with :math:`V` the full (global) vocabulary. The gradients follow the
    notes' output-layer rules with
    :math:`\delta = \partial\ell/\partial z = c\,a - (1 - \epsilon)\,w_y\,
    \mathrm{onehot}(y) - \epsilon w/V`, :math:`c = (1 - \epsilon) w_y + \epsilon W/V +
    2\lambda\,\mathrm{lse}` (:math:`a - y` unweighted without smoothing or z-loss; times
    :math:`1 - \tanh^2(z/\mathrm{cap})` under a soft cap):

    .. math::
        \frac{\partial\ell}{\partial x} = \delta W^\top, \qquad
        \frac{\partial\ell}{\partial W} = x^\top \delta, \qquad
        \frac{\partial\ell}{\partial b} = \textstyle\sum_i \delta_i .

    The derivatives with respect to ``label_smoothing``, ``z_loss`` and ``soft_cap`` are
    exact too; ``class_weights`` are constants: their cotangent is 0, unlike the core
    losses' (use :func:`softmax_jax.softmax_cross_entropy_with_integer_labels` to learn
    them). Only
    ``token_block x vocab_block`` logits exist at any time (:mod:`softmax_jax.fused.engine`).
    Reverse mode only: ``jax.jvp`` of the loss raises.

    Args:
      x: ``[N, D]`` floating-point inputs of the output layer (hidden states), or
        ``[..., D]`` with any leading token axes (``[B, T, D]``, as a language model hands
        them over; flattened inside, so the gradient comes back in ``x``'s shape).
      w: ``[D, V]`` weights (the ``x @ w`` convention of JAX dense layers); under
        ``axis_name``, this device's ``[D, V / shards]`` slice of the vocabulary.
      labels: integer class ids in ``[0, V)`` of ``x``'s leading shape (``[N]``,
        ``[B, T]``; global ids under ``axis_name``).
      b: optional ``[V]`` bias (this device's slice under ``axis_name``).
      reduction: ``"mean"`` (over the tokens that are not ignored, or, with class weights,
        divided by their summed label weights as PyTorch does, so NaN, as in PyTorch, when
        the kept tokens' label weights add up to 0; 0 when no token is kept, where PyTorch
        gives NaN), ``"sum"`` or ``"none"`` (per-token losses, ``x``'s leading shape).
      ignore_index: a label value (e.g. ``-100``, a Python or NumPy int) whose tokens get
        loss 0 and gradient 0 and are left out of the mean; checked against the labels' own
        dtype (``uint8`` labels with ``-100`` raise).
      where: optional boolean mask of ``x``'s leading shape, or one that broadcasts to it
        (NumPy broadcasting: ``[T]`` for the same positions of every sequence, ``[B, 1]``
        for whole sequences), one flag per token: a token whose flag is False is an ignored
        one (loss 0, gradient 0, left out of the mean), whatever its label holds. Another
        dtype raises ``TypeError``, another shape ``ValueError``.
      label_smoothing: :math:`\epsilon \in [0, 1]`, PyTorch's convention, over the global
        vocabulary.
      z_loss: finite :math:`\lambda \ge 0`, weight of the :math:`\mathrm{lse}^2` penalty.
      soft_cap: optional :math:`\mathrm{cap} > 0` for Gemma-style logit soft-capping;
        ``float("inf")`` means no cap.
      class_weights: optional ``[V]`` float weights, PyTorch's ``weight`` (this device's
        slice under ``axis_name``); treated as constants.
      return_stats: also return :class:`FusedStats` (per-token log-sum-exp and argmax) from
        the same pass; the log-sum-exp is differentiable (its gradient joins the loss's
        backward pass).
      axis_name: the ``shard_map`` mesh axis (or tuple of axes) over which ``w``, ``b`` and
        ``class_weights`` are sharded along the vocabulary (``check_vma=True``, the default,
        is required); None when the vocabulary is not sharded. ``labels`` stay global ids;
        any other mesh axis (a data axis) is left alone, so ``"mean"`` is over this device's
        tokens.
      token_block, vocab_block: block sizes; by default
        :meth:`softmax_jax.fused.BlockLayout.default`. ``vocab_block >= V`` holds whole rows
        (three matrix products); smaller recomputes each block in the gradient pass.

    Returns:
      The loss: for ``"mean"``/``"sum"`` a scalar in the compute dtype, float32 for
      bfloat16, float16 and float32 inputs and float64 for float64 ones (under x64, as
      optax's loss of float32 inputs stays float32), accumulated in it; for ``"none"``
      per-token losses of ``x``'s leading shape, in the same compute dtype (float32 for
      bfloat16 inputs: they are weighted and summed downstream). With ``return_stats``,
      ``(loss, stats)`` (``stats`` of ``x``'s leading shape). A label outside ``[0, V)``
      that is not ``ignore_index`` gives NaN for its token (and, for ``"none"``, NaN
      gradients where its cotangent is non-zero, exactly 0 where it is 0), a traced
      hyper-parameter out of range NaN for the loss and every derivative. Gradients come
      back in each input's dtype, accumulated in float32 (at least); with mixed dtypes
      (float32 ``x``, bfloat16 ``w``) the wider input's gradient keeps its own dtype's accuracy.

    Raises:
      TypeError: non-floating ``x``/``w``/``b``/``class_weights`` or non-integer ``labels``.
      ValueError: inconsistent shapes, an unknown ``reduction``, a hyper-parameter out of
        range, bad block sizes, or a vocabulary-sharded ``w`` inside ``shard_map`` without
        ``axis_name``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> from softmax_jax.fused import linear_softmax_cross_entropy
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[2.0, 3.0, 4.0], [1.0, 1.0, 1.0]])  # logits x @ w: the notes' rows
      >>> labels = jnp.array([1, 0])
      >>> print(linear_softmax_cross_entropy(x, w, labels, reduction="none"))
      [1.4076 1.0986]
      >>> print(sj.softmax_cross_entropy_with_integer_labels(x @ w, labels))
      [1.4076 1.0986]
      >>> print(jax.grad(linear_softmax_cross_entropy, argnums=1)(x, w, labels))  # x^T (a - y) / N
      [[ 0.0450 -0.3776  0.3326]
       [-0.3333  0.1667  0.1667]]
      >>> loss, stats = linear_softmax_cross_entropy(x, w, labels, return_stats=True)
      >>> print(stats.lse, stats.argmax)
      [4.4076 2.0986] [2 0]
    """
    if axis_name is None:  # jit with sharded inputs: the axis_name path, laid out for you
        routed = auto.fused_call(
            linear_softmax_cross_entropy,
            {"x": ("tokens", x), "w": ("weights", w), "labels": ("rows", labels),
             "b": ("classes", b), "class_weights": ("classes", class_weights),
             "where": ("rows", _v.where_like(where, jnp.shape(x)[:-1]))},
            reduction, (lambda r: FusedStats(r, r)) if return_stats else None,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            soft_cap=soft_cap, return_stats=return_stats, token_block=token_block,
            vocab_block=vocab_block)
        if routed is not None:
            return routed
    call = _checked(x, w, labels, b, reduction, ignore_index, where, label_smoothing, z_loss,
                    soft_cap, class_weights, return_stats, axis_name, token_block,
                    vocab_block)
    loss, aux = vjp.dispatch(call.static, call.x, call.w, call.b, call.consts, call.params,
                             call.cap)
    if call.static.reduction == "none":
        loss = loss.reshape(call.lead)
    if not return_stats:
        return loss
    lse, argmax = aux
    return loss, FusedStats(lse.reshape(call.lead), argmax.reshape(call.lead))
