r"""The fused and contrastive losses under ``jax.jit`` with sharded inputs: the ``axis_name``
paths, called for the user.

The shardings of the inputs choose the layout:

- the axes that split ``x``'s tokens are the **token axes**: each device runs the engine on
  its own tokens, and ``"mean"``/``"sum"`` add up over them (:func:`.vma.reducing_over`);
- the axes that split ``w`` (along ``V``, or along ``D`` for FSDP) and not the tokens are the
  **vocabulary axes**: ``w`` is laid out ``[D, V / shards]`` on them and the engine runs
  vocabulary-parallel (``axis_name``), so neither ``w``'s ``[D, V]`` nor any ``[tokens, V]``
  array is ever gathered. A ``D``-sharded ``w`` is moved to that layout by an all-to-all;
  a ``w`` split along an axis that also splits the tokens is gathered over that axis;
- for the contrastive losses, the axes that split the batch carry the ring
  (:mod:`.ring`), joined by the mesh axes that split neither ``x`` nor ``y``;
- traced hyper-parameters (a learned temperature) are replicated operands of the sharded
  call, differentiated like the arrays.

Two mechanisms, one engine:

- **Explicit mesh axes** (the default of :func:`jax.make_mesh`): the shardings are part of
  the types (``jax.typeof(x).sharding``), so the layout is read while tracing and the
  ``axis_name`` path runs inside :func:`jax.shard_map` over the current mesh. A fused loss
  reduced to ``"mean"``/``"sum"`` takes the passes of :mod:`.auto_partition` as
  ``shard_map``\ s (their ``dW`` is summed over the token axes in place, which
  ``shard_map``'s varying-axes types cannot express);
- **Auto mesh axes**: the partitioner decides, so the loss is an op with its own
  partitioning rule (:mod:`jax.experimental.custom_partitioning`, :mod:`.auto_partition`),
  whose lowering is the same ``axis_name`` path.

Inside a user's own ``shard_map`` (manual axes) nothing here applies: ``axis_name`` is the
interface there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from . import auto_partition, vma

Spec = Any  # one entry of a PartitionSpec: None, an axis name or a tuple of names


def _names(entry: Spec) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _entry(axes: tuple[str, ...]) -> Spec:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _padded(spec: Any, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


class Layout(NamedTuple):
    """Where a fused call runs: ``tokens`` the spec entries of ``x``'s leading (token) axes,
    ``vocab`` the axes ``w``'s vocabulary is split over on each device."""

    tokens: tuple[Spec, ...]
    vocab: tuple[str, ...]
    given: tuple[Spec, ...] = ()  # the token axes' entries in x's own spec

    @property
    def token_axes(self) -> tuple[str, ...]:
        return tuple(a for e in self.tokens for a in _names(e))

    @property
    def axis_name(self) -> Any:
        """The engine's ``axis_name``: None without a vocabulary split."""
        return _entry(self.vocab)

    def spec(self, role: str) -> P:
        """The in-spec of an argument by role: ``"tokens"`` (``x``, ``[..., D]``),
        ``"rows"`` (labels, ``[...]``), ``"weights"`` (``w``, ``[D, V]``), ``"classes"``
        (``b``, class weights, ``[V]``); a teacher's arrays as the student's."""
        role = role.removeprefix("teacher_")
        if role == "scalar":
            return P()
        if role == "tokens":
            return P(*self.tokens, None)
        if role == "rows":
            return P(*self.tokens)
        if role == "given_rows":
            return P(*self.given)
        if role == "weights":
            return P(None, self.axis_name)
        return P(self.axis_name)


def layout(x_spec: Any, x_shape: tuple[int, ...], w_spec: Any, mesh_shape: Any) -> Layout:
    """The layout of a head from the specs of ``x`` (``[..., D]``) and ``w`` (``[D, V]``)
    on a mesh of axis sizes ``mesh_shape``.

    Mesh axes that split neither ``x`` nor ``w`` would make each device along them repeat
    the same work: they split the first token axis too when its size allows (a local slice,
    no communication)."""
    tokens = list(_padded(x_spec, len(x_shape))[:-1])
    taken = {a for e in tokens for a in _names(e)}
    w_d, w_v = _padded(w_spec, 2)
    vocab = tuple(a for a in _names(w_v) + _names(w_d) if a not in taken)
    given = tuple(tokens)
    idle = tuple(a for a in mesh_shape if a not in taken and a not in vocab)
    if idle and len(x_shape) > 1:
        first = _names(tokens[0]) + idle
        if x_shape[0] % math.prod(mesh_shape[a] for a in first) == 0:
            tokens[0] = _entry(first)
    return Layout(tuple(tokens), vocab, given)


def _explicit_spec(a: Any) -> Any:
    """``a``'s spec when its sharding is part of its type on a mesh whose axes are all
    Explicit, else None."""
    if a is None:
        return None
    sharding: Any = getattr(jax.typeof(a), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None
    if any(t != AxisType.Explicit for t in mesh.axis_types):
        return None
    return sharding.spec


def _auto_mesh() -> Any:
    """The current mesh when all its axes are Auto (and it has more than one device), None
    inside the lowering of a partitioned op (which runs the ``axis_name`` path itself)."""
    if vma.in_lowering():
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    if any(t != AxisType.Auto for t in mesh.axis_types):
        return None
    return mesh


def _sharded(spec: Any) -> bool:
    return spec is not None and any(e is not None for e in spec)


def explicit_layout(x: Any, w: Any) -> Layout | None:
    """The layout of a head whose shardings are in its types, None when neither ``x`` nor
    ``w`` is sharded (or the mesh is not Explicit)."""
    xs, ws = _explicit_spec(x), _explicit_spec(w)
    if xs is None or ws is None or not (_sharded(xs) or _sharded(ws)):
        return None
    return layout(xs, tuple(x.shape), ws, dict(jax.typeof(x).sharding.mesh.shape))


def run_sharded(body: Callable[..., Any], lay: Layout, arrays: dict[str, tuple[str, Any]],
                out_roles: Any) -> Any:
    """``body(**arrays)`` inside ``jax.shard_map`` over the current mesh, each array (given
    as ``(role, array)``; None stays None) resharded to its role's spec first and the
    outputs laid out by ``out_roles`` (a pytree of roles, ``"scalar"`` for a replicated
    value). ``"mean"``/``"sum"`` inside reduce over the token axes."""
    names = [n for n, (_, a) in arrays.items() if a is not None]
    specs = tuple(lay.spec(arrays[n][0]) for n in names)
    values = tuple(jax.sharding.reshard(arrays[n][1], s)
                   for n, s in zip(names, specs, strict=True))
    out_specs = jax.tree.map(lambda r: P() if r == "scalar" else lay.spec(r), out_roles)

    def inner(*vals):
        with vma.reducing_over(lay.token_axes):
            return body(**dict(zip(names, vals, strict=True)))

    out = jax.shard_map(inner, in_specs=specs, out_specs=out_specs)(*values)
    # Per-token results come back laid out like x's tokens (a gather of [tokens] values).
    return jax.tree.map(
        lambda r, o: jax.sharding.reshard(o, lay.spec("given_rows")) if r == "rows" else o,
        out_roles, out)


def _split_traced(kwargs: dict) -> tuple[dict, dict | None]:
    """``(static, traced)``: the keyword arguments that are traced (a learned temperature,
    a scheduled smoothing) become replicated operands of the sharded call (a ``shard_map``
    cannot close over an Explicit-typed value, a partitioned op takes only operands); the
    others stay Python values. ``traced`` is None when one is not a scalar (the unrouted
    call raises its error)."""
    traced = {k: v for k, v in kwargs.items() if isinstance(v, jax.core.Tracer)}
    if any(jnp.ndim(v) != 0 for v in traced.values()):
        return kwargs, None
    return {k: v for k, v in kwargs.items() if k not in traced}, traced


def _differentiable(traced: dict) -> tuple[str, ...]:
    """The traced hyper-parameters that get a cotangent (the floating ones)."""
    return tuple(k for k, v in traced.items() if jnp.issubdtype(jnp.result_type(v), jnp.inexact))


class RingLayout(NamedTuple):
    """The contrastive ring's layout: ``ring`` the axes that split the batch."""

    ring: tuple[str, ...]

    @property
    def token_axes(self) -> tuple[str, ...]:
        return self.ring

    @property
    def axis_name(self) -> Any:
        return _entry(self.ring)

    def spec(self, role: str) -> P:
        if role == "scalar":
            return P()
        if role in ("batch_rows", "columns"):
            return P(self.axis_name, None)
        return P(self.axis_name)


def contrastive_call(fn: Callable[..., Any], arrays: dict[str, Any], per_row: bool,
                     **kwargs: Any) -> Any:
    """A contrastive loss ``fn(axis_name=..., **arrays, **kwargs)`` on batch-sharded
    inputs (the ring), or None where nothing needs routing."""
    x, y = arrays["x"], arrays["y"]
    kwargs, traced = _split_traced(kwargs)
    if traced is None:
        return None
    arrays = dict(arrays, **traced)
    ring = ring_axes(x, y)
    if ring is not None:
        out = run_ring(lambda axis, **a: fn(axis_name=axis, **a, **kwargs), ring, arrays,
                       per_row)
        # Per-row results come back laid out like x's rows (a gather of [N] values).
        given = _padded(_explicit_spec(x), 2)[0]
        return jax.sharding.reshard(out, P(given)) if per_row else out
    mesh = _auto_mesh()
    rows = (jnp.shape(x)[0], jnp.shape(y)[0])
    if mesh is None or any(r % mesh.size for r in rows):
        return None
    # With labels, y's rows are their own factor (M may differ from N).
    roles = dict({"x": "batch_rows", "y": "batch_rows" if rows[0] == rows[1] else "columns",
                  "where": "batch", "labels": "batch"}, **dict.fromkeys(traced, "scalar"))
    return auto_partition.Call(
        functools.partial(fn, **kwargs),
        {n: (roles[n], None if a is None else jnp.asarray(a)) for n, a in arrays.items()},
        ("x", "y", *_differentiable(traced)), "batch" if per_row else "scalar",
        lambda specs, mesh: RingLayout(ring_of(specs["x"], specs["y"], rows,
                                               dict(mesh.shape)) or ()), 0)()


def ring_of(xs: Any, ys: Any, rows: tuple[int, ...], mesh_shape: Any
            ) -> tuple[str, ...] | None:
    """The axes of the contrastive ring from the specs of ``x`` (``[N, D]``) and ``y``
    (``[M, D]``): those splitting ``x``'s (or ``y``'s) batch, then the mesh axes that split
    neither (each device along them would repeat the others' tiles), as far as ``rows``
    (``N`` and ``M``) divide evenly; None when even the first do not."""
    first = _names(_padded(xs, 2)[0] if _sharded(xs) else _padded(ys, 2)[0])
    taken = {a for e in (*_padded(xs, 2), *_padded(ys, 2)) for a in _names(e)}
    for ring in (first + tuple(a for a in mesh_shape if a not in taken), first):
        if all(r % math.prod(mesh_shape[a] for a in ring) == 0 for r in rows):
            return ring
    return None


def ring_axes(x: Any, y: Any) -> tuple[str, ...] | None:
    """The axes of the contrastive ring (:func:`ring_of`), when the mesh is Explicit and
    ``x`` or ``y`` is sharded."""
    xs, ys = _explicit_spec(x), _explicit_spec(y)
    if xs is None or ys is None or not (_sharded(xs) or _sharded(ys)):
        return None
    return ring_of(xs, ys, (x.shape[0], y.shape[0]), dict(jax.typeof(x).sharding.mesh.shape))


def whole(a: Any) -> Any:
    """``a`` replicated on every device when its sharding is Explicit (a batch that cannot
    go round the ring), else as it is."""
    return a if a is None or _explicit_spec(a) is None else jax.sharding.reshard(a, P())


def run_ring(body: Callable[..., Any], axes: tuple[str, ...], arrays: dict[str, Any],
             per_row: bool) -> Any:
    """``body(axis_name, **arrays)`` inside ``jax.shard_map`` with every array split along
    its first axis over ``axes`` (scalars replicated); the result is replicated, or split
    like the rows when ``per_row``."""
    batch = _entry(axes)
    names = [n for n, a in arrays.items() if a is not None]
    specs = tuple(P() if jnp.ndim(arrays[n]) == 0 else P(batch) for n in names)
    values = tuple(jax.sharding.reshard(arrays[n], s) for n, s in zip(names, specs, strict=True))

    def inner(*vals):
        return body(batch, **dict(zip(names, vals, strict=True)))

    return jax.shard_map(inner, in_specs=specs, out_specs=P(batch) if per_row else P())(
        *values)


def fused_call(fn: Callable[..., Any], arrays: dict[str, tuple[str, Any]],
               reduction: str | None, stats: Callable[[Any], Any] | None = None,
               **kwargs: Any) -> Any:
    """A fused loss ``fn`` on sharded inputs, or None where nothing needs routing (no mesh,
    a user's ``shard_map``, or nothing sharded): ``arrays`` maps keyword names to
    ``(role, array)`` (``x`` and ``w`` required), ``kwargs`` are the other arguments,
    ``stats`` builds the per-token statistics' container from its roles (or None).
    ``reduction=None``: ``fn`` takes no ``reduction`` and returns per-token rows (with
    ``stats``, the pair of the rows and the statistics)."""
    x, w = arrays["x"][1], arrays["w"][1]
    if reduction is not None:
        kwargs = dict(kwargs, reduction=reduction)
    kwargs, traced = _split_traced(kwargs)
    if traced is None:
        return None
    arrays = dict(arrays, **{k: ("scalar", v) for k, v in traced.items()})
    out: Any = "rows" if reduction in (None, "none") else "scalar"
    if stats is not None:
        out = (out, stats("rows"))
    lay = explicit_layout(x, w)
    if lay is None:
        if _auto_mesh() is None:
            return None
        ndim, shape = jnp.ndim(x), tuple(jnp.shape(x))
        return auto_partition.Call(
            functools.partial(fn, **kwargs),
            {n: (r, None if a is None else jnp.asarray(a)) for n, (r, a) in arrays.items()},
            ("x", "w", "b", *_differentiable(traced)), out,
            lambda specs, mesh: layout(specs["x"], shape, specs["w"], dict(mesh.shape)),
            ndim - 1)()
    if out != "scalar":
        # Per-token results: inside shard_map the backward pass reuses the forward pass's
        # per-token statistics (the partitioned passes would recompute them).
        return run_sharded(functools.partial(fn, axis_name=lay.axis_name, **kwargs), lay,
                           arrays, out)
    # A reduced loss forms its gradients in the forward pass: the same passes as on an Auto
    # mesh, whose dW is summed over the token axes in place.
    placed = {n: (r, jax.sharding.reshard(a, lay.spec(r)))
              for n, (r, a) in arrays.items() if a is not None}
    return auto_partition.Call(
        functools.partial(fn, **kwargs), placed, ("x", "w", "b", *_differentiable(traced)),
        out, lambda specs, mesh: lay, jnp.ndim(x) - 1, fixed=lay)()
