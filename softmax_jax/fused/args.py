"""Argument checks shared by the fused losses' public functions."""

from __future__ import annotations

import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from softmax_jax import _validation as _v

from . import engine, vjp, vma
from .layout import BlockLayout

REDUCTIONS = ("mean", "sum", "none")


def head(
    x: jax.typing.ArrayLike, w: jax.typing.ArrayLike, b: jax.typing.ArrayLike | None,
    prefix: str = "",
) -> tuple[jax.Array, jax.Array, jax.Array | None, tuple[int, ...]]:
    """``(x, w, b, lead)`` as arrays, checked: ``x`` ``[..., D]`` (any leading axes, e.g.
    ``[B, T, D]``) flattened to ``[N, D]`` with ``lead`` its leading shape, ``w`` ``[D, V]``,
    ``b`` ``[V]``."""
    nx, nw, nb = f"{prefix}x", f"{prefix}w", f"{prefix}b"
    x_arr = _v.as_float_array(nx, x)
    w_arr = _v.as_float_array(nw, w)
    if x_arr.ndim < 2:
        raise ValueError(f"{nx} must be a 2-D [N, D] array, or [..., D] with more leading"
                         f" token axes ([B, T, D]), got {nx}.shape={tuple(x_arr.shape)}")
    lead = tuple(x_arr.shape[:-1])
    x_arr = x_arr.reshape((math.prod(lead), x_arr.shape[-1]))
    b_arr = None if b is None else _v.as_float_array(nb, b)
    return (*_head_shapes(x_arr, w_arr, b_arr, prefix, lead), lead)


def _head_shapes(
    x: jax.Array, w: jax.Array, b: jax.Array | None, prefix: str, lead: tuple[int, ...]
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    nx, nw, nb = f"{prefix}x", f"{prefix}w", f"{prefix}b"
    shape = lead + x.shape[1:]
    if w.ndim != 2:
        raise ValueError(f"{nw} must be a 2-D [D, V] array, got {nw}.shape={tuple(w.shape)}")
    n, d = x.shape
    if w.shape[0] != d:
        raise ValueError(
            f"{nw} must be [D, V] with D = {nx}.shape[-1] = {d}, got {nw}.shape={tuple(w.shape)}"
            f" ({nx}.shape={shape}); pass the kernel of x @ w, not its transpose")
    if n == 0 or w.shape[1] == 0:
        raise ValueError(
            f"{nx} and {nw} need at least one token and one class, got {nx}.shape="
            f"{shape}, {nw}.shape={tuple(w.shape)}")
    if b is not None:
        if b.shape != (w.shape[1],):
            raise ValueError(f"{nb} must be a 1-D [V] array with V = {nw}.shape[1] ="
                             f" {w.shape[1]}, got {nb}.shape={tuple(b.shape)}")
    return x, w, b


def tokens_like(name: str, shape: tuple[int, ...], lead: tuple[int, ...]) -> None:
    """Raises unless ``shape``, the token axes of ``name`` (``labels.shape``,
    ``teacher_x.shape[:-1]``), is ``x``'s leading shape ``lead``."""
    if tuple(shape) != lead:
        raise ValueError(f"{name} must have x's leading shape {lead} (one entry per token),"
                         f" got {name}={tuple(shape)}")


def labels_for(labels: jax.Array, lead: tuple[int, ...]) -> jax.Array:
    """``labels`` of shape ``lead`` (checked), flattened to ``[N]``."""
    tokens_like("labels.shape", labels.shape, lead)
    return labels.reshape(-1)


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def soft_cap(value: object) -> tuple[jax.Array, bool]:
    """``(cap, capped)``: None and ``inf`` mean no cap (``inf * tanh(z / inf)`` would be NaN
    at ``z = 0``; its limit is ``z``). Checked as every hyper-parameter is
    (:func:`softmax_jax._validation.hyperparameter`): a concrete ``cap <= 0`` raises; a traced
    one out of range makes the loss and its derivatives NaN (the custom VJP's validity check,
    ``cap > 0``, as for the temperature)."""
    if value is None:
        return jnp.ones((), jnp.float32), False
    cap, _ = _v.hyperparameter("soft_cap", value, 0.0, None, low_open=True)
    if isinstance(value, jax.core.Tracer):
        return cap, True
    return cap, not math.isinf(float(np.asarray(value)))


def static(rule, axis_name, layout: BlockLayout, capped: bool, reduction_: str,
           want_argmax: bool, x, w, b) -> vjp.Static:
    return vjp.Static(
        rule=rule,
        engine=engine.Options(axis_name, layout, capped, want_argmax),
        reduction=reduction_,
        vma_x=vma.varying(x), vma_w=vma.varying(w),
        vma_b=frozenset() if b is None else vma.varying(b),
        dtypes=(str(x.dtype), str(w.dtype), None if b is None else str(b.dtype)),
        token_axes=vma.token_axes(),
    )


def compute_dtype(*arrays) -> np.dtype:
    """:func:`softmax_jax._validation.compute_dtype` of the arrays given (None skipped)."""
    return _v.compute_dtype(*(a.dtype for a in arrays if a is not None))


def local_gather(values: jax.Array, labels: jax.Array, axis_name: Hashable | None) -> jax.Array:
    """``values[labels]`` for a per-class vector that is this shard's slice under
    ``axis_name`` (0 for labels outside it before the ``psum``; invalid labels read 0)."""
    v = values.shape[0]
    loc = labels
    if axis_name is not None:
        loc = labels - lax.axis_index(axis_name).astype(labels.dtype) * v
    inside = (loc >= 0) & (loc < v)
    out = jnp.where(inside, values[jnp.clip(loc, 0, v - 1)], 0.0)
    return out if axis_name is None else lax.psum(out, axis_name)
