"""One process of the two-process sharded-jit check (``test_multiprocess_sharded.py``).

``python _multiprocess_sharded_worker.py PROCESS_ID PORT OUT_DIR`` joins a two-process JAX
cluster (coordinator and gloo on 127.0.0.1, two CPU devices per process), builds global
arrays from each process's own rows with :func:`jax.make_array_from_process_local_data`, and
under ``jax.jit`` (no ``shard_map``, no ``axis_name``) takes the value and gradients of:

- the fused cross-entropy with ``x`` on ``data`` and ``w`` along the vocabulary on
  ``model`` of a 2 x 2 mesh, Explicit and Auto axis types;
- CLIP with ``x`` and ``y`` batch-sharded over a 4-device ``data`` mesh.

It writes the results, whole on every device, to ``OUT_DIR/process{PROCESS_ID}.npz``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

N, D, V = 16, 8, 64
IGNORE = -100


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4321)
    labels = rng.integers(0, V, N).astype(np.int32)
    labels[[1, 6]] = IGNORE
    return {"x": rng.normal(size=(N, D)).astype(np.float32),
            "w": (0.7 * rng.normal(size=(D, V))).astype(np.float32),
            "labels": labels,
            "y": (0.5 * rng.normal(size=(N, D))).astype(np.float32)}


def cross_entropy(x, w, labels):
    import softmax_jax as sj  # noqa: PLC0415

    return sj.linear_softmax_cross_entropy(x, w, labels, ignore_index=IGNORE,
                                           label_smoothing=0.1)


def clip(x, y):
    import softmax_jax as sj  # noqa: PLC0415

    return sj.contrastive_loss(x, y, logit_scale=2.0)


def _local_part(host: np.ndarray, sharding) -> np.ndarray:
    """This process's block of ``host``: the union of its devices' shards (contiguous)."""
    index = sharding.addressable_devices_indices_map(host.shape).values()
    block = []
    for d in range(host.ndim):
        starts = [i[d].start or 0 for i in index]
        stops = [host.shape[d] if i[d].stop is None else i[d].stop for i in index]
        block.append(slice(min(starts), max(stops)))
    return host[tuple(block)]


def _global(host: np.ndarray, mesh, spec):
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415

    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_process_local_data(sharding, _local_part(host, sharding),
                                                  host.shape)


def _whole(fn, argnums, mesh):
    """``jit(value_and_grad(fn))`` with every result laid out whole on every device."""
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    return jax.jit(jax.value_and_grad(fn, argnums=argnums),
                   out_shardings=NamedSharding(mesh, P()))


def main(argv: list[str]) -> int:
    process_id, port, out_dir = int(argv[0]), int(argv[1]), Path(argv[2])
    import jax  # noqa: PLC0415
    from _gloo import gloo_on_loopback  # noqa: PLC0415

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    gloo_on_loopback()
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               coordinator_bind_address=f"127.0.0.1:{port}",
                               num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    from jax.sharding import AxisType  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    host = inputs()
    saved: dict[str, np.ndarray] = {}
    for kind in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(kind, kind))
        with jax.set_mesh(mesh):
            args = (_global(host["x"], mesh, P("data")),
                    _global(host["w"], mesh, P(None, "model")),
                    _global(host["labels"], mesh, P("data")))
            value, (dx, dw) = _whole(cross_entropy, (0, 1), mesh)(*args)
        for key, arr in (("value", value), ("dx", dx), ("dw", dw)):
            saved[f"ce_{kind.name}/{key}"] = np.asarray(arr.addressable_data(0))
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        args = (_global(host["x"], mesh, P("data")), _global(host["y"], mesh, P("data")))
        value, (dx, dy) = _whole(clip, (0, 1), mesh)(*args)
    for key, arr in (("value", value), ("dx", dx), ("dy", dy)):
        saved[f"clip/{key}"] = np.asarray(arr.addressable_data(0))
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / f"process{process_id}.npz", **saved)
    print(f"process {process_id}: {jax.process_count()} processes, {jax.device_count()}"
          " devices, done", flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
