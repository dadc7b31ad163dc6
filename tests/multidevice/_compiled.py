"""Reading a sharded program's collectives from its compiled text."""

from __future__ import annotations

import collections
import re

import jax
from jax.sharding import NamedSharding

_OP = re.compile(r"=\s*(\([^)]*\)|\S+)\s+(all-gather|collective-permute)(?:-start)?\(")


def collectives(fn, mesh, args) -> dict[str, collections.Counter]:
    """The all-gathers and collective-permutes of ``jax.jit(fn)`` compiled on ``mesh`` for
    ``args`` (``(shape, PartitionSpec, dtype)`` each), counted by result shape."""
    structs = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, p)) for s, p, d in args]
    with jax.set_mesh(mesh):
        text = jax.jit(fn).lower(*structs).compile().as_text()
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for shape, kind in _OP.findall(text):
        dims = re.search(r"\[([\d,]*)\]", shape)
        out[kind][tuple(int(a) for a in dims.group(1).split(",") if a) if dims else ()] += 1
    return out
