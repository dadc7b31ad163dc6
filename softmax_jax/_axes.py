"""Normalising over several axes at once, as optax and ``jax.nn`` allow with a tuple ``axis``.

The class axes are moved to the end, in the caller's order, and merged into one; the
single-axis function runs on that, and same-shape results are put back. An integer label
is then a flat (C-order) index into the slice spanned by the class axes, in the caller's
order, which is optax's convention. Gradients flow through the transpose and reshape as
usual; the ``custom_vjp`` rules see one class axis.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax import _validation as _v
from softmax_jax._validation import Mask


def class_axes(axis: object, ndim: int, name: str = "x") -> int | tuple[int, ...]:
    """``axis`` as a non-negative int, or as a tuple of two or more distinct non-negative
    ints (in the caller's order). A one-element tuple is read as its element, and ``None``
    means every axis, as in ``jax.nn`` and optax."""
    if axis is None:
        if ndim == 0:
            raise ValueError(f"{name} must have at least one dimension, got a scalar")
        axis = tuple(range(ndim))
    if not isinstance(axis, tuple):
        return _v.canonical_axis(axis, ndim, name)
    if not axis:
        raise ValueError("axis must name at least one axis, got ()")
    for a in axis:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral):
            raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}")
    axes = tuple(_v.canonical_axis(a, ndim, name) for a in axis)
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis={axis!r} names the same axis of {name} twice")
    return axes[0] if len(axes) == 1 else axes


class Flattening(NamedTuple):
    """How an array of ``shape`` maps to one with the class axes merged at the end."""

    shape: tuple[int, ...]
    batch: tuple[int, ...]  # the other axes, in order
    classes: tuple[int, ...]  # the class axes, in the caller's order

    @staticmethod
    def of(shape: tuple[int, ...], classes: tuple[int, ...]) -> Flattening:
        batch = tuple(d for d in range(len(shape)) if d not in classes)
        return Flattening(tuple(shape), batch, classes)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[d] for d in self.batch)

    def flatten(self, x: jax.Array) -> jax.Array:
        """``x`` (of ``shape``) as ``batch_shape + (prod of the class sizes,)``."""
        # The class size is spelled out: a -1 cannot be inferred when a batch axis is empty.
        k = int(np.prod([self.shape[d] for d in self.classes]))
        return jnp.transpose(x, self.batch + self.classes).reshape(self.batch_shape + (k,))

    def unflatten(self, y: jax.Array) -> jax.Array:
        """The inverse of :meth:`flatten`."""
        order = self.batch + self.classes
        y = y.reshape(tuple(self.shape[d] for d in order))
        return jnp.transpose(y, tuple(int(i) for i in np.argsort(order)))

    def where(self, where: jax.typing.ArrayLike | None) -> jax.Array | None:
        """The mask for the flattened array, from a mask that broadcasts to ``shape``
        (NumPy broadcasting, nothing more)."""
        if where is None:
            return None
        mask = _v.check_where(where, self.shape, self.classes)
        return self.flatten(jnp.broadcast_to(mask, self.shape))


# Per-class and per-row helpers for a single class axis ``axis`` (kept as size 1 where a
# result is per row).


def class_count(shape: tuple[int, ...], axis: int, mask: Mask) -> jax.Array | int:
    """K, the number of classes taking part: the axis length, or the unmasked count per row."""
    if mask is None:
        return shape[axis]
    return jnp.sum(jnp.broadcast_to(mask, shape), axis=axis, keepdims=True)


def any_unmasked(mask: Mask, shape: tuple[int, ...], axis: int) -> jax.Array | None:
    """Per row: does any class take part (None without a mask)?"""
    return None if mask is None else jnp.any(jnp.broadcast_to(mask, shape), axis=axis)


def along_shape(ndim: int, axis: int) -> tuple[int, ...]:
    """The shape that makes a per-class vector broadcast along ``axis`` of ``ndim`` axes."""
    return tuple(-1 if d == axis else 1 for d in range(ndim))


def along(vector: jax.Array | None, ndim: int, axis: int) -> jax.Array | None:
    """A per-class vector shaped to broadcast along ``axis`` of an ``ndim``-D array."""
    return None if vector is None else vector.reshape(along_shape(ndim, axis))


def reduce_to_classes(x: jax.Array, axis: int) -> jax.Array:
    """Sums ``x`` over every axis but ``axis``: a per-class cotangent."""
    return jnp.sum(x, axis=tuple(d for d in range(x.ndim) if d != axis))
