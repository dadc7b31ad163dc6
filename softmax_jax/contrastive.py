r"""Contrastive losses at any batch size: CLIP (:func:`contrastive_loss`) and SigLIP
(:func:`sigmoid_contrastive_loss`) over the similarity matrix :math:`z = s\,x y^\top`,
which is never materialised (blocks of the fused engine, :mod:`softmax_jax.fused.columns`),
on one device or around a ring of devices (:mod:`softmax_jax.fused.ring`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable

import jax

from softmax_jax import _cross_entropy_terms as _ce
from softmax_jax import _validation as _v
from softmax_jax.fused import args, auto, vma
from softmax_jax.fused import contrastive as _fc

__all__ = ["contrastive_loss", "sigmoid_contrastive_loss"]


def _pair(x_in: jax.typing.ArrayLike, y_in: jax.typing.ArrayLike,
          where_in: jax.typing.ArrayLike | None, axis_name: Hashable | None, diagonal: bool
          ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(x, y, where)`` checked: ``x`` ``[N, D]``, ``y`` ``[M, D]``, ``where`` ``[N]``."""
    x, y = _v.as_float_array("x", x_in), _v.as_float_array("y", y_in)
    for name, a in (("x", x), ("y", y)):
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError(f"{name} must be a 2-D [rows, D] array with at least one row,"
                             f" got {name}.shape={tuple(a.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same embedding size D, got x.shape="
                         f"{tuple(x.shape)} and y.shape={tuple(y.shape)}")
    if axis_name is not None and not vma.in_lowering():
        missing = vma.axis_set(axis_name) - vma.varying(y)
        if missing:
            raise ValueError(
                f"axis_name={axis_name!r}: y (shape {tuple(y.shape)}) does not vary over mesh"
                f" axis {vma.sorted_axes(missing)}. Call this inside jax.shard_map with x, y"
                " and where sharded along their first axis over axis_name"
                f" (in_specs=P({axis_name!r})), or pass axis_name=None")
    if (diagonal or where_in is not None) and x.shape[0] != y.shape[0]:
        why = "where marks pairs" if where_in is not None else "the positives are the diagonal"
        raise ValueError(f"x and y need the same number of rows N == M ({why}), got"
                         f" x.shape={tuple(x.shape)} and y.shape={tuple(y.shape)}")
    where = None if where_in is None else _v.boolean_mask("where", where_in, x.shape[:1])
    return x, y, where


def _scalar(name: str, value, ct) -> jax.Array:
    arr, _ = _v.hyperparameter(name, value, -math.inf, None, finite=True)
    return arr.astype(ct)


@functools.partial(jax.jit, static_argnames=("bidirectional", "reduction", "axis_name"))
def _clip_jit(x, y, s, labels, where, bidirectional, reduction, axis_name):
    return _fc.clip(x, y, s, labels, where, bidirectional, reduction, axis_name)


@functools.partial(jax.jit, static_argnames=("reduction", "axis_name"))
def _sigmoid_jit(x, y, s, b, where, reduction, axis_name):
    return _fc.sigmoid(x, y, s, b, where, reduction, axis_name)


def contrastive_loss(
    x: jax.typing.ArrayLike,
    y: jax.typing.ArrayLike,
    *,
    logit_scale: float | jax.typing.ArrayLike = 1.0,
    labels: jax.typing.ArrayLike | None = None,
    bidirectional: bool = True,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""CLIP's contrastive loss: softmax cross-entropy over the rows and the columns of
    :math:`z = s\,x y^\top`, without materialising the ``N x M`` matrix.

    .. math::
        \ell_i = \mathrm{lse}_j\, z_{ij} - z_{i\ell_i}, \qquad
        \ell'_j = \mathrm{lse}_i\, z_{ij} - z_{jj}, \qquad
        \text{per pair } \tfrac12(\ell_i + \ell'_i)

    (big_vision's ``bidirectional_contrastive_loss``; :math:`\ell_i` alone when
    ``bidirectional=False``). The positive logit comes from the same tile product as the
    log-sum-exp, and each term is formed as :math:`(m - z_+) + \log s` from the running
    maximum and sum, so a per-pair loss is never negative and ``"mean"`` adds per-pair
    terms (no cancellation between two batch sums). The tiles are :math:`(s\,x) y^\top`,
    one rounded product that the maximum and the exponent both see. The gradient of the
    mean is, per tile,
    :math:`\partial/\partial z = (\mathrm{softmax_{rows}}(z) - I)/2N +
    (\mathrm{softmax_{cols}}(z) - I)/2N`, carried to ``x``, ``y`` and ``logit_scale`` by
    :math:`\bar x = s\,\delta y`, :math:`\bar y = s\,\delta^\top x`,
    :math:`\bar s = \sum \delta \odot x y^\top = \sum_i x_i \cdot (\delta y)_i`. Two
    passes of ``token_block x col_block`` tiles (statistics, then gradients), four matrix
    products per tile. bfloat16 embeddings meet :math:`s\,x` in float32, so their products
    run in float32.

    Args:
      x: ``[N, D]`` embeddings (e.g. images), normalised by the caller.
      y: ``[M, D]`` embeddings (e.g. texts).
      logit_scale: the scalar :math:`s`, finite (a traced value is differentiated; CLIP
        learns :math:`s = e^t`). An infinite one raises ``ValueError``, or gives NaN when
        traced.
      labels: optional ``[N]`` integer column of each row's positive, for
        ``bidirectional=False``; None means the diagonal (``N == M``). A label outside
        ``[0, M)`` (or naming a column ``where`` leaves out) gives NaN for its row and NaN
        gradients (for ``"none"``: where its cotangent is non-zero; a pair whose cotangent
        is exactly 0 gets gradients of exactly 0).
      bidirectional: add the column term (needs the diagonal).
      where: optional boolean ``[N]``: the valid pairs of a padded batch. A pair left out is
        in no normaliser and no sum, as row or as column; its loss and gradients are 0, and
        the result equals that of the batch with it sliced away.
      reduction: ``"mean"`` over kept pairs (0 when none is kept), ``"sum"``, or ``"none"``
        (``[N]`` per pair).
      axis_name: inside :func:`jax.shard_map`, the axis along which ``x``, ``y`` and
        ``where`` are sharded (positives on the global diagonal). The result is the loss of
        the global batch (replicated for ``"mean"``/``"sum"``; this device's pairs for
        ``"none"``), the gradients the local slices of the global ones. ``y`` goes round
        the devices with ``lax.ppermute``; no device holds all of it.

    Returns:
      float32 (at least) loss: a scalar, or ``[N]`` for ``"none"``. Gradients come back in
      the inputs' dtypes; bf16/f16 inputs are computed in float32.

    Raises:
      TypeError: non-floating ``x``/``y``, non-integer ``labels``, non-boolean ``where``.
      ValueError: a ``D`` mismatch, ``N != M`` with the diagonal or ``where``, ``labels``
        with ``bidirectional=True`` or ``axis_name``, bad shapes, an unknown reduction,
        ``y`` not sharded over ``axis_name``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> print(sj.contrastive_loss(x, x, logit_scale=2.0))
      0.1269
    """
    diagonal = labels is None
    if not diagonal and bidirectional:
        raise ValueError("labels need bidirectional=False: the column term uses the diagonal"
                         " positives (pass labels=None, or bidirectional=False)")
    if not diagonal and axis_name is not None:
        raise ValueError("labels cannot be combined with axis_name: the ring puts the"
                         " positives on the global diagonal (pass labels=None)")
    if axis_name is None:  # jit with batch-sharded inputs: the ring, for you
        routed = auto.contrastive_call(
            _clip, {"x": x, "y": y, "where": where, "labels": labels}, reduction == "none",
            logit_scale=logit_scale, bidirectional=bidirectional, reduction=reduction)
        if routed is not None:
            return routed
        if labels is not None:  # rows that do not divide over the ring: the whole batch
            x, y, labels, where = (auto.whole(a) for a in (x, y, labels, where))
    return _clip(x, y, labels=labels, where=where, logit_scale=logit_scale,
                 bidirectional=bidirectional, reduction=reduction, axis_name=axis_name)


def _clip(x, y, *, logit_scale, bidirectional, reduction, axis_name, labels=None, where=None):
    """:func:`contrastive_loss` once routed: under ``axis_name`` (the ring) ``labels`` are
    global column ids."""
    xa, ya, mask = _pair(x, y, where, axis_name, labels is None)
    reduction = args.reduction(reduction)
    lab = None if labels is None else args.labels_for(_ce.integer_labels(labels), xa.shape[:1])
    s = _scalar("logit_scale", logit_scale, args.compute_dtype(xa, ya))
    return _clip_jit(xa, ya, s, lab, mask, bool(bidirectional), reduction, axis_name)


def sigmoid_contrastive_loss(
    x: jax.typing.ArrayLike,
    y: jax.typing.ArrayLike,
    *,
    logit_scale: float | jax.typing.ArrayLike = 1.0,
    logit_bias: float | jax.typing.ArrayLike = 0.0,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""SigLIP's pairwise sigmoid loss over :math:`z = s\,x y^\top + b`, without
    materialising it.

    .. math::
        \mathrm{nll}_i = -\sum_j \log \sigma(t_{ij} z_{ij}), \qquad
        t_{ij} = \begin{cases} +1 & i = j \\ -1 & i \ne j \end{cases}, \qquad
        \frac{\partial\,\mathrm{nll}_i}{\partial z_{ij}} = t_{ij}\,(\sigma(t_{ij} z_{ij}) - 1).

    No normaliser: for ``"mean"``/``"sum"`` one pass of tiles forms the loss and the
    gradients (three products per tile). Gradients of ``x``, ``y``, ``logit_scale``
    (:math:`\sum \delta \odot x y^\top`) and ``logit_bias`` (:math:`\sum \delta`) are exact.

    Args:
      x: ``[N, D]`` embeddings. y: ``[N, D]`` embeddings (``N == M``: the positives are the
        diagonal).
      logit_scale, logit_bias: finite scalars :math:`s` and :math:`b` (SigLIP learns
        :math:`s = e^t` and :math:`b`); traced values are differentiated. An infinite one
        raises ``ValueError``, or gives NaN when traced.
      where: optional boolean ``[N]``: valid pairs; as in :func:`contrastive_loss`.
      reduction: ``"mean"`` (the total over :math:`N` kept pairs, the paper's
        normalisation), ``"sum"``, or ``"none"`` (``nll``, ``[N]``).
      axis_name: the ``shard_map`` axis of the ring, as in :func:`contrastive_loss`.

    Returns:
      The float32 (at least) loss; gradients in the inputs' dtypes.

    Raises:
      TypeError, ValueError: as :func:`contrastive_loss`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> print(sj.sigmoid_contrastive_loss(x, x, logit_scale=2.0, logit_bias=-1.0))
      0.6265
    """
    if axis_name is None:  # jit with batch-sharded inputs: the ring, laid out for you
        routed = auto.contrastive_call(
            sigmoid_contrastive_loss, {"x": x, "y": y, "where": where}, reduction == "none",
            logit_scale=logit_scale, logit_bias=logit_bias, reduction=reduction)
        if routed is not None:
            return routed
    xa, ya, mask = _pair(x, y, where, axis_name, True)
    reduction = args.reduction(reduction)
    ct = args.compute_dtype(xa, ya)
    s = _scalar("logit_scale", logit_scale, ct)
    b = _scalar("logit_bias", logit_bias, ct)
    return _sigmoid_jit(xa, ya, s, b, mask, reduction, axis_name)
