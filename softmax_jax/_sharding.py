"""Shardings that are part of a value's type: what the core losses need on meshes with
Explicit axes (the default of :func:`jax.make_mesh`, used with :func:`jax.set_mesh`).

There, a gather or a scatter at the labels has an ambiguous output sharding and JAX asks for
one; the losses supply the sharding of the array the result is shaped like. On Auto meshes,
or outside any mesh, the partitioner decides and these helpers return None.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, PartitionSpec


def explicit_axes(mesh: Any) -> tuple[str, ...]:
    """The mesh axes of Explicit type (none for an empty or an Auto mesh)."""
    if mesh is None or mesh.empty:
        return ()
    return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
                 if t == AxisType.Explicit)


def typed_sharding(a: jax.Array) -> Any:
    """``a``'s sharding when it is part of its type (some mesh axis is Explicit), else None."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    if sharding is None or not explicit_axes(getattr(sharding, "mesh", None)):
        return None
    return sharding


def replicated(a: jax.Array) -> PartitionSpec | None:
    """``P()`` (whole on every device) where ``a``'s sharding is typed, else None: the
    output sharding of a per-class sum over sharded rows."""
    return None if typed_sharding(a) is None else PartitionSpec()


def check_class_axis(a: jax.Array, axis: int, name: str) -> None:
    """Raises when ``a``'s class ``axis`` is sharded over an Explicit mesh axis: the unfused
    losses normalise along a whole class axis (the fused losses shard the vocabulary)."""
    sharding = typed_sharding(a)
    if sharding is None:
        return
    spec = tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec))
    if spec[axis] is not None:
        raise ValueError(
            f"{name} (shape {tuple(a.shape)}) is sharded along its class axis {axis} over mesh"
            f" axis {spec[axis]!r} (sharding {sharding.spec}); the unfused losses need whole"
            " classes on each device: reshard it with jax.sharding.reshard, or use"
            " softmax_jax.linear_softmax_cross_entropy with w sharded along the vocabulary")
