"""One process of the two-process contrastive ring check
(``tests/multidevice/test_contrastive_ring.py``).

``python tests/multidevice/_contrastive_ring_check.py PROCESS_ID PORT OUT_DIR`` joins a
two-process JAX cluster (``jax.distributed.initialize`` with the coordinator on
``127.0.0.1:PORT``, two CPU devices each, gloo collectives told to use 127.0.0.1), runs every
case of :data:`CASES` inside ``jax.shard_map`` over the four devices, with ``x``, ``y`` and
``where`` sharded along their rows over the ring axis, so that the ring crosses processes,
and writes the value and the gradients to ``OUT_DIR/process{ID}.npz``.

The test process computes the same cases on one device, unsharded (:func:`value_and_grads`
with no mesh), and on its own 8 simulated devices (:func:`place`, then
:func:`value_and_grads` with the mesh), and compares.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _gloo import gloo_on_loopback

N, D = 24, 4  # rows divisible by 8 devices (3 each) and by 4 (6 each)
AXIS = "ring"
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
KEYS = ("value", "dx", "dy", "ds", "db")


@dataclass(frozen=True)
class Case:
    name: str
    loss: str  # "clip" or "sigmoid"
    reduction: str
    masked: bool
    blocks: tuple[int, int] | None = None  # tiles inside each ring step


CASES = [
    Case("clip_mean_where", "clip", "mean", True),
    Case("clip_sum_tiles", "clip", "sum", False, (2, 2)),
    Case("clip_none_where_tiles", "clip", "none", True, (2, 2)),
    Case("sigmoid_mean_where", "sigmoid", "mean", True),
    Case("sigmoid_none_where_tiles", "sigmoid", "none", True, (2, 2)),
]


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4321)
    keep = np.ones(N, bool)
    keep[[1, 7, 8, 20]] = False
    return {"x": rng.normal(size=(N, D)).astype(np.float32),
            "y": rng.normal(size=(N, D)).astype(np.float32),
            "where": keep, "ct": rng.normal(size=N).astype(np.float32),
            "s": np.float32(1.7), "b": np.float32(-0.6)}


def _loss(case: Case, x, y, s, b, where, ct, axis_name):
    import jax.numpy as jnp  # noqa: PLC0415

    from softmax_jax.fused import contrastive as fc  # noqa: PLC0415

    mask = where if case.masked else None
    if case.loss == "clip":
        out = fc.clip(x, y, s, None, mask, True, case.reduction, axis_name, case.blocks)
        out = out + 0.0 * b  # b has no part in CLIP: its gradient is 0
    else:
        out = fc.sigmoid(x, y, s, b, mask, case.reduction, axis_name, case.blocks)
    return jnp.sum(ct * out) if case.reduction == "none" else out


def value_and_grads(case: Case, a: dict, mesh: Any = None) -> dict[str, Any]:
    """Value and gradients of ``x``, ``y``, ``s``, ``b``: on one device when ``mesh`` is
    None, else inside ``jax.shard_map`` with the rows sharded over :data:`AXIS` and the
    results replicated."""
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    def f(x, y, s, b, where, ct):
        if mesh is None:
            return _loss(case, x, y, s, b, where, ct, None)

        def local(x, y, s, b, where, ct):
            out = _loss(case, x, y, s, b, where, ct, AXIS)
            # "none" is a sum of this device's pairs: the global sum is the loss
            return jax.lax.psum(out, AXIS) if case.reduction == "none" else out

        rows = P(AXIS)
        return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, P(), P(), rows, rows),
                             out_specs=P())(x, y, s, b, where, ct)

    fn = jax.value_and_grad(f, argnums=(0, 1, 2, 3))
    if mesh is not None:
        fn = jax.jit(fn, out_shardings=NamedSharding(mesh, P()))
    value, grads = fn(a["x"], a["y"], a["s"], a["b"], a["where"], a["ct"])
    return dict(zip(KEYS, (value, *grads), strict=True))


def place(mesh) -> dict[str, Any]:
    """:func:`inputs` on ``mesh``: arrays sharded along their rows over :data:`AXIS`,
    scalars replicated."""
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    placed = {}
    for name, v in inputs().items():
        spec = P(AXIS) if np.ndim(v) else P()
        placed[name] = jax.make_array_from_callback(
            np.shape(v), NamedSharding(mesh, spec), lambda idx, v=v: np.asarray(v)[idx])
    return placed


def _run(mesh, out_file: Path, tag: dict) -> None:
    placed = place(mesh)
    saved = {}
    for case in CASES:
        for key, arr in value_and_grads(case, placed, mesh).items():
            saved[f"{case.name}/{key}"] = np.asarray(arr.addressable_data(0))
        print(json.dumps({"case": case.name, **tag,
                          "value": float(saved[f"{case.name}/value"])}), flush=True)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_file, **saved)
    print(json.dumps({"case": "done", **tag, "devices": len(mesh.devices.ravel())}),
          flush=True)


def main(argv: list[str]) -> int:
    import jax  # noqa: PLC0415
    from jax.sharding import Mesh  # noqa: PLC0415

    jax.config.update("jax_platforms", "cpu")
    process_id, port, out_dir = int(argv[0]), int(argv[1]), Path(argv[2])
    jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    gloo_on_loopback()
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", coordinator_bind_address=f"127.0.0.1:{port}",
        num_processes=NUM_PROCESSES, process_id=process_id, initialization_timeout=120)
    assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS, jax.devices()
    _run(Mesh(np.array(jax.devices()), (AXIS,)), out_dir / f"process{process_id}.npz",
         {"mode": "dist", "process": process_id})
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
