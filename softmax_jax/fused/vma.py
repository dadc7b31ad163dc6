"""Varying manual axes: the part of ``shard_map``'s type system the fused losses need.

Inside :func:`jax.shard_map` (with its default ``check_vma=True``) every array records the
mesh axes along which it differs from device to device. A ``custom_vjp`` there must return
cotangents typed like its primal inputs, and loop carries must keep one type, so the engine
marks its accumulators as varying over every axis its inputs vary over and, at the end, sums
each cotangent over the axes its primal does not vary over (:func:`match_varying`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Hashable, Iterator
from typing import Any

import jax
from jax import lax

_TOKEN_AXES: contextvars.ContextVar[tuple] = contextvars.ContextVar("token_axes", default=())


@contextlib.contextmanager
def reducing_over(axes: tuple) -> Iterator[None]:
    """While tracing inside, the fused losses' ``"mean"`` and ``"sum"`` run over the tokens of
    every device along ``axes`` (the automatic sharded paths, :mod:`.auto`, set it around
    their ``shard_map`` body); a user's own ``shard_map`` keeps each device's own mean."""
    token = _TOKEN_AXES.set(tuple(axes))
    try:
        yield
    finally:
        _TOKEN_AXES.reset(token)


_LOWERING: contextvars.ContextVar[bool] = contextvars.ContextVar("lowering", default=False)


@contextlib.contextmanager
def lowering() -> Iterator[None]:
    """While tracing inside, the mesh axes are bound but values carry no varying axes: the
    lowering of a custom-partitioned op (:mod:`.auto`), which sums the cotangents itself."""
    token = _LOWERING.set(True)
    try:
        yield
    finally:
        _LOWERING.reset(token)


def in_lowering() -> bool:
    """Whether a custom-partitioned op's lowering is being traced (see :func:`lowering`)."""
    return _LOWERING.get()


def total(x: jax.Array, axis_name: Hashable) -> jax.Array:
    """``lax.psum(x, axis_name)`` of a per-device partial value that is differentiated.

    Inside ``shard_map`` the cotangent of the (invariant) sum reaches each device's part
    unchanged. In a partitioned op's lowering values carry no varying axes and ``psum``
    would transpose to another ``psum`` (each part's cotangent times the device count),
    so there the sum's cotangent is passed through as it is."""
    if not _LOWERING.get():
        return lax.psum(x, axis_name)
    return _total(x, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _total(x: jax.Array, axis_name: Hashable) -> jax.Array:
    return lax.psum(x, axis_name)


def _total_fwd(x, axis_name):
    return lax.psum(x, axis_name), None


def _total_bwd(axis_name, res, g):
    return (g,)


_total.defvjp(_total_fwd, _total_bwd)


# Chunk of an in-place sum over devices (:func:`psum_in_place`), in bytes.
PSUM_CHUNK = 4 << 20


def psum_in_place(x: jax.Array, axes: tuple) -> jax.Array:
    """``lax.psum(x, axes)`` of a per-device partial sum that is dead afterwards, written
    back into ``x`` chunk by chunk along its first axis.

    An all-reduce does not write into its operand's buffer (XLA gives it a new one), so
    ``lax.psum`` of a ``[D, V]`` ``dW`` holds two of them; reduced in chunks of
    ``PSUM_CHUNK`` bytes, each written back with ``dynamic_update_slice`` (in place), the
    sum lives in ``x``'s buffer and only a chunk is added. The data moved is the same. For
    values without varying mesh axes (a partitioned op's lowering, :func:`lowering`): the
    chunks would vary while the whole does not."""
    rows = x.shape[0] if x.ndim else 1
    size = x.size * x.dtype.itemsize
    n = next((k for k in range(max(1, -(-size // PSUM_CHUNK)), rows + 1) if rows % k == 0),
             rows)
    if x.ndim == 0 or n <= 1:
        return lax.psum(x, axes)
    step = rows // n

    def body(k, acc):
        part = lax.psum(lax.dynamic_slice_in_dim(acc, k * step, step), axes)
        return lax.dynamic_update_slice_in_dim(acc, part, k * step, 0)

    return lax.fori_loop(0, n, body, x)


def token_axes() -> tuple:
    """The mesh axes over which the tokens of a ``"mean"``/``"sum"`` are split (see
    :func:`reducing_over`)."""
    return _TOKEN_AXES.get()


def varying(x: Any) -> frozenset:
    """Mesh axes along which ``x`` varies inside ``shard_map`` (empty outside of it)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


def sorted_axes(axes: frozenset) -> tuple:
    return tuple(sorted(axes, key=str))


def axis_set(axis_name: Hashable | None) -> frozenset:
    """``axis_name`` (an axis, a tuple of axes or None) as a set of axes."""
    if axis_name is None:
        return frozenset()
    if isinstance(axis_name, (tuple, list)):
        return frozenset(axis_name)
    return frozenset((axis_name,))


def vary(x: jax.Array, axes: frozenset) -> jax.Array:
    """Marks ``x`` as varying over ``axes`` (a no-op at run time)."""
    missing = axes - varying(x)
    if not missing or _LOWERING.get():
        return x
    pcast = getattr(lax, "pcast", None)
    if pcast is not None:
        return pcast(x, sorted_axes(missing), to="varying")
    return lax.pvary(x, sorted_axes(missing))  # type: ignore[attr-defined]


def vary_all(tree: Any, axes: frozenset) -> Any:
    """:func:`vary` on every array of a pytree (None leaves stay None)."""
    if not axes:
        return tree
    return jax.tree.map(lambda t: vary(t, axes), tree)


def match_varying(ct: jax.Array, target: frozenset) -> jax.Array:
    """A cotangent with exactly its primal's varying axes.

    A cotangent that varies over an axis its primal does not (``dx`` over the vocabulary
    axis, ``dW`` over a data axis) holds one partial sum per device: it is ``psum``-ed.
    """
    extra = varying(ct) - target
    if extra:
        ct = lax.psum(ct, sorted_axes(extra))
    return vary(ct, target)


def check_vocab_axes(
    axis_name: Hashable | None, x: jax.Array, sharded: dict[str, jax.Array | None]
) -> None:
    """Refuses vocabulary-sharded arrays the call was not told about, and the reverse.

    ``sharded`` maps argument names to the arrays that hold a slice of the vocabulary
    (``w``, ``b``, class weights, the teacher's ``w``). Without ``axis_name``, such an array
    that varies over a manual axis that ``x`` does not is a vocabulary slice: normalising
    over it alone would give a plausible but wrong loss, so this raises. With ``axis_name``,
    ``w`` must vary over it.
    """
    axes = axis_set(axis_name)
    base = varying(x) | axes
    for name, arr in sharded.items():
        if arr is None:
            continue
        extra = varying(arr) - base
        if extra:
            raise ValueError(
                f"{name} (shape {tuple(arr.shape)}) varies over mesh axis"
                f" {sorted_axes(extra)} inside shard_map but x does not, so it holds a slice"
                f" of the vocabulary; pass axis_name={sorted_axes(extra)[0]!r} (the axis it"
                " is sharded over) so that the softmax is normalised over the whole"
                f" vocabulary (got axis_name={axis_name!r})"
            )
    w = sharded.get("w")
    if axes and w is not None and not _LOWERING.get():
        missing = axes - varying(w)
        if missing:
            raise ValueError(
                f"axis_name={axis_name!r}: w (shape {tuple(w.shape)}) does not vary over mesh"
                f" axis {sorted_axes(missing)}. Call this inside jax.shard_map (with the"
                " default check_vma=True) with w sharded along V over that axis, e.g."
                " in_specs=P(None, axis_name) for w; use axis_name=None when w holds the"
                " whole vocabulary"
            )
