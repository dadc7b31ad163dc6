"""Compiled programs of the sharded losses under ``jax.jit``, compile only (no timing).

For each layout, on 8 simulated CPU devices, it compiles ``value_and_grad`` and reads, per
device, the temporaries (``memory_analysis().temp_size_in_bytes``) and the all-gathers and
collective-permutes by result shape in ``compile().as_text()``:

- the fused cross-entropy at ``N=8192, D=512, V=65536``, float32, on a 2 x 4
  ``('data', 'model')`` mesh, ``x`` sharded on ``data`` and ``w`` replicated, sharded along
  V on ``model`` or along D on ``model`` (FSDP), with Explicit and Auto axis types, against
  the hand-written ``jax.shard_map`` + ``axis_name`` path;
- CLIP and SigLIP at global ``N=16384, D=256`` batch-sharded on 8 devices, against the
  hand-written ring, and CLIP on the 2 x 4 mesh with the batch on ``data`` only.

Run: ``python scripts/bench_sharding.py [--small]`` (``--small`` for a quick check).
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import collections  # noqa: E402
import re  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import softmax_jax as sj  # noqa: E402

_COLLECTIVE = re.compile(
    r"=\s*(\([^)]*\)|\S+)\s+(all-gather|collective-permute|all-to-all|all-reduce)"
    r"(?:-start)?\(")


def collectives(hlo: str) -> dict[str, collections.Counter]:
    """Per kind (``all-gather``, ``collective-permute``, ``all-to-all``, ``all-reduce``), the
    result shapes of the compiled program's collectives and how often each occurs (a
    collective inside a loop counts once)."""
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for shape, kind in _COLLECTIVE.findall(hlo):
        out[kind][re.sub(r"\{[^}]*\}", "", shape)] += 1
    return out


def compiled(fn: Callable, mesh: jax.sharding.Mesh, args: list[tuple[tuple, P, object]]):
    """``jax.jit(fn)`` compiled for abstract arguments ``(shape, spec, dtype)`` on ``mesh``."""
    structs = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, p)) for s, p, d in args]
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*structs).compile()


def figures(exe) -> tuple[float, dict]:
    return exe.memory_analysis().temp_size_in_bytes / 2**20, collectives(exe.as_text())


def _mesh(shape, names, kind):
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def fused_rows(n: int, d: int, v: int) -> list[tuple[str, float, dict]]:
    f32, i32 = jnp.float32, jnp.int32
    rows = []

    def auto_loss(x, w, labels):
        return sj.linear_softmax_cross_entropy(x, w, labels)

    grad = jax.value_and_grad(auto_loss, argnums=(0, 1))
    for w_name, w_spec in (("replicated", P()), ("vocab", P(None, "model")),
                           ("fsdp", P("model", None))):
        for kind in (AxisType.Explicit, AxisType.Auto):
            mesh = _mesh((2, 4), ("data", "model"), kind)
            exe = compiled(grad, mesh, [((n, d), P("data"), f32), ((d, v), w_spec, f32),
                                        ((n,), P("data"), i32)])
            rows.append((f"fused CE, w {w_name}, {kind.name}", *figures(exe)))

    # The hand-written path: shard_map over the whole mesh, axis_name on the vocabulary.
    mesh = _mesh((2, 4), ("data", "model"), AxisType.Explicit)

    def by_hand(x, w, labels):
        def body(x, w, labels):
            local = sj.linear_softmax_cross_entropy(x, w, labels, axis_name="model",
                                                    reduction="sum")
            count = jnp.asarray(labels.shape[0], f32)
            return jax.lax.psum(local, "data") / jax.lax.psum(count, "data")
        return jax.shard_map(body, in_specs=(P("data"), P(None, "model"), P("data")),
                             out_specs=P())(x, w, labels)

    exe = compiled(jax.value_and_grad(by_hand, argnums=(0, 1)), mesh,
                   [((n, d), P("data"), f32), ((d, v), P(None, "model"), f32),
                    ((n,), P("data"), i32)])
    rows.append(("fused CE, w vocab, shard_map + axis_name by hand", *figures(exe)))
    return rows


def contrastive_rows(n: int, d: int) -> list[tuple[str, float, dict]]:
    f32, rows = jnp.float32, []
    losses = {"CLIP": sj.contrastive_loss, "SigLIP": sj.sigmoid_contrastive_loss}
    for name, loss in losses.items():
        grad = jax.value_and_grad(lambda x, y, loss=loss: loss(x, y), argnums=(0, 1))
        for kind in (AxisType.Explicit, AxisType.Auto):
            mesh = _mesh((8,), ("data",), kind)
            exe = compiled(grad, mesh, [((n, d), P("data"), f32)] * 2)
            rows.append((f"{name}, {kind.name}", *figures(exe)))
        mesh = _mesh((8,), ("data",), AxisType.Explicit)

        def by_hand(x, y, loss=loss):
            return jax.shard_map(lambda x, y: loss(x, y, axis_name="data"),
                                 in_specs=(P("data"), P("data")), out_specs=P())(x, y)

        exe = compiled(jax.value_and_grad(by_hand, argnums=(0, 1)), mesh,
                       [((n, d), P("data"), f32)] * 2)
        rows.append((f"{name}, ring by hand", *figures(exe)))
    # A mesh axis that splits neither x nor y (model) joins the ring.
    grad = jax.value_and_grad(lambda x, y: sj.contrastive_loss(x, y), argnums=(0, 1))
    for kind in (AxisType.Explicit, AxisType.Auto):
        exe = compiled(grad, _mesh((2, 4), ("data", "model"), kind),
                       [((n, d), P("data"), f32)] * 2)
        rows.append((f"CLIP, 2 x 4 mesh, batch on data, {kind.name}", *figures(exe)))
    return rows


def main(argv: list[str]) -> None:
    small = "--small" in argv
    n, d, v = (512, 64, 2048) if small else (8192, 512, 65536)
    cn, cd = (1024, 32) if small else (16384, 256)
    print(f"fused CE: N={n}, D={d}, V={v}, float32, 2 x 4 ('data', 'model'), x on data")
    print(f"CLIP/SigLIP: N={cn}, D={cd}, float32, 8 devices, batch-sharded")
    print("| program | temp MiB / device | all-gathers (result shape x count) |"
          " collective-permutes | all-to-alls | all-reduces |")
    print("|---|---:|---|---|---|---|")
    for label, temp, coll in fused_rows(n, d, v) + contrastive_rows(cn, cd):
        cells = [", ".join(f"{s} x{c}" for s, c in sorted(coll.get(k, {}).items())) or "none"
                 for k in ("all-gather", "collective-permute", "all-to-all", "all-reduce")]
        print(f"| {label} | {temp:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
