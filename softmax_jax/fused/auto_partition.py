r"""The sharded losses on meshes with Auto axes: ops with their own partitioning rule.

On an Auto mesh the shardings of traced values are not in their types; the partitioner
chooses them, and left to itself it gathers a vocabulary-sharded ``w`` (three all-gathers of
the whole ``[D, V]`` in the fused cross-entropy's ``value_and_grad``). Here the loss is a
:func:`jax.experimental.custom_partitioning` op: its ``partition`` callback sees the
operands' shardings, picks the layout (:func:`.auto.layout`, the same rule as on Explicit
meshes) and lowers to the ``axis_name`` path on each device's shards.

Gradients: a ``custom_vjp`` whose forward and backward passes are each such an op.

- ``"mean"``/``"sum"``: one op returns the loss and the cotangents of the differentiated
  arrays (the engine forms them in its forward pass anyway); the backward pass scales them.
- ``"none"``: the forward op returns the per-token losses; the backward op takes the
  per-token cotangent and runs the ``axis_name`` path's VJP.

Inside the lowering the mesh axes are bound but values carry no varying axes, so each
cotangent is summed here over the layout's axes that its operand is not split over (what
:func:`.vma.match_varying` does inside ``shard_map``): ``dx`` over the vocabulary axes,
``dW`` and ``db`` over the token axes (in place, by chunks: :func:`.vma.psum_in_place`), a
traced hyper-parameter's over the token axes. Integer outputs (an argmax) take no cotangent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import vma

# Factors of the Shardy rule per role: the token axes are "t0 t1 ...", the model widths
# "d" (student) and "e" (teacher), the vocabulary "v", the contrastive batch "n" (and "m"
# for y's rows when they are not x's), the embedding width "k".
_FACTORS = {"tokens": "{t} d", "teacher_tokens": "{t} e", "rows": "{t}", "weights": "d v",
            "teacher_weights": "e v", "classes": "v", "batch_rows": "n k", "batch": "n",
            "columns": "m k",
            "scalar": ""}


def _rule(roles: list[str], outs: list[str], n_tokens: int) -> str:
    t = " ".join(f"t{i}" for i in range(n_tokens))
    fmt = [_FACTORS[r].format(t=t) for r in roles]
    return ", ".join(fmt) + " -> " + ", ".join(_FACTORS[r].format(t=t) for r in outs)


def _spec_axes(spec: P) -> set:
    return {a for e in spec if e is not None for a in (e if isinstance(e, tuple) else (e,))}


class Call:
    """One automatic call: ``fn(**arrays, axis_name=...)`` with ``arrays`` by role.

    ``layout_of(specs, mesh)`` maps the operands' specs (by name) to an object with
    ``spec(role)``, ``token_axes`` and ``axis_name``; ``diff`` names the differentiated
    arrays; ``out_role`` is ``"scalar"`` or the per-row role of the result, or a pytree of
    per-row roles for a result of several per-row arrays of that structure.

    ``fixed``: the layout, when it is known while tracing (an Explicit mesh, the arrays
    already laid out by it): each op is then a :func:`jax.shard_map` over the current mesh
    running the same lowering (values without varying axes, ``check_vma=False``), so that
    the cotangents are summed here too (:func:`.vma.psum_in_place`).
    """

    def __init__(self, fn: Callable[..., Any], arrays: dict[str, tuple[str, Any]],
                 diff: tuple[str, ...], out_role: Any, layout_of: Callable[..., Any],
                 n_tokens: int, fixed: Any = None):
        self.fn, self.layout_of, self.fixed = fn, layout_of, fixed
        self.out_roles, self.out_tree = jax.tree.flatten(out_role)
        self.names = [n for n, (_, a) in arrays.items() if a is not None]
        self.roles = [arrays[n][0] for n in self.names]
        self.diff = [n for n in self.names if n in diff]
        self.values = [arrays[n][1] for n in self.names]
        self.n_tokens = n_tokens

    def _layout(self, mesh, arg_shapes) -> Any:
        specs = {n: s.sharding.spec for n, s in zip(self.names, arg_shapes, strict=False)}
        return self.layout_of(specs, mesh)

    def _local(self, lay: Any, arrays: list) -> tuple:
        """The result's leaves."""
        with vma.reducing_over(lay.token_axes), vma.lowering():
            return tuple(jax.tree.leaves(self.fn(**dict(zip(self.names, arrays, strict=True)),
                                                 axis_name=lay.axis_name)))

    def _summed(self, lay: Any, cts: list) -> list:
        """Each cotangent summed over the layout's axes its operand is not split over. A
        hyper-parameter's (``"scalar"``) is formed from per-row statistics, already whole
        over the vocabulary axes: it is summed over the token axes only."""
        used = set(lay.token_axes) | _spec_axes(P(lay.axis_name))
        out = []
        for n, ct in zip(self.diff, cts, strict=True):
            role = self.roles[self.names.index(n)]
            over = set(lay.token_axes) if role == "scalar" else used
            missing = tuple(sorted(over - _spec_axes(lay.spec(role))))
            out.append(vma.psum_in_place(ct, missing) if missing else ct)
        return out

    def _vjp(self, lay: Any, arrays: list, g: Any, live: tuple[bool, ...]) -> tuple:
        """The outputs and the summed cotangents, from the outputs' cotangents ``g`` (those
        of the ``live`` outputs; None: ones)."""
        idx = [self.names.index(n) for n in self.diff]

        def f(*diff):
            full = list(arrays)
            for i, d in zip(idx, diff, strict=True):
                full[i] = d
            out = self._local(lay, full)
            return (tuple(o for o, k in zip(out, live, strict=True) if k),
                    tuple(o for o, k in zip(out, live, strict=True) if not k))

        # The backward passes are traced by ``pull``: inside the same context.
        with vma.reducing_over(lay.token_axes), vma.lowering():
            out, pull, dead = jax.vjp(f, *(arrays[i] for i in idx), has_aux=True)
            cts = pull(tuple(jnp.ones_like(o) for o in out) if g is None else g)
        out, dead = iter(out), iter(dead)
        return (tuple(next(out) if k else next(dead) for k in live),
                self._summed(lay, list(cts)))

    def op(self, with_grad: bool, live: tuple[bool, ...] | None) -> Callable[..., Any]:
        """The custom-partitioned op: ``(*arrays[, g]) -> out`` or ``(out, *cotangents)``;
        ``live`` flags the outputs whose cotangent ``g`` is an operand (None: none is; the
        integer outputs, an argmax, have none)."""
        with_ct = live is not None
        roles = self.roles + [r for r, k in zip(self.out_roles, live or (), strict=with_ct)
                              if k]
        outs = self.out_roles + ([self.roles[self.names.index(n)] for n in self.diff]
                                 if with_grad else [])
        single = not with_grad and len(self.out_roles) == 1
        every = (True,) * len(self.out_roles)

        def run(lay, args):
            k = len(self.names)
            arrays, g = list(args[:k]), tuple(args[k:]) if with_ct else None
            if not with_grad:
                out = self._local(lay, arrays)
                return out[0] if single else out
            out, cts = self._vjp(lay, arrays, g, live or every)
            return (*out, *cts)

        if self.fixed is not None:  # an Explicit mesh: the layout is known while tracing
            lay = self.fixed
            out_specs = tuple(lay.spec(r) for r in outs)
            return jax.shard_map(lambda *args: run(lay, args),
                                 in_specs=tuple(lay.spec(r) for r in roles),
                                 out_specs=out_specs[0] if single else out_specs,
                                 check_vma=False)

        def plain(*args):  # one device, the ordinary call
            return run(_NoLayout(), args)

        def partition(mesh, arg_shapes, result_shape):
            lay = self._layout(mesh, arg_shapes)
            in_sh = tuple(NamedSharding(mesh, lay.spec(r)) for r in roles)
            out_sh = [NamedSharding(mesh, lay.spec(r)) for r in outs]

            def lower(*args):
                return run(lay, args)

            return mesh, lower, out_sh[0] if single else tuple(out_sh), in_sh

        cp = custom_partitioning(plain)
        cp.def_partition(partition=partition, sharding_rule=_rule(roles, outs, self.n_tokens))
        return cp

    def __call__(self) -> Any:
        value_op = self.op(False, None)
        reduced = self.out_roles == ["scalar"]
        idx = [self.names.index(n) for n in self.diff]
        k = len(self.out_roles)

        @jax.custom_vjp
        def loss(*arrays):
            return value_op(*arrays)

        def fwd(*arrays):
            if reduced:
                out, *cts = self.op(True, None)(*arrays)
                return out, (None, tuple(cts))
            return value_op(*arrays), (arrays, None)

        def bwd(res, g):
            arrays, cts = res
            if reduced:
                cts = tuple(g * c for c in cts)
            else:
                gs = g if k > 1 else (g,)
                live = tuple(c.dtype != jax.dtypes.float0 for c in gs)
                cts = tuple(self.op(True, live)(
                    *arrays, *(c for c, keep in zip(gs, live, strict=True) if keep))[k:])
            full: list = [None] * len(self.names)
            for i, c in zip(idx, cts, strict=True):
                full[i] = c
            return tuple(full)

        loss.defvjp(fwd, bwd)
        out = loss(*self.values)
        return jax.tree.unflatten(self.out_tree, out if k > 1 else (out,))


class _NoLayout:
    """The layout of one device: nothing split."""

    token_axes: tuple = ()
    axis_name = None

    def spec(self, role: str) -> P:
        return P()

