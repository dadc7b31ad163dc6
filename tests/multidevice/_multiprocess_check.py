"""One process of the two-process vocab-parallel check (``tests/multidevice/test_multiprocess.py``).

``python tests/multidevice/_multiprocess_check.py PROCESS_ID PORT OUT_DIR`` joins a two-process JAX
cluster through ``jax.distributed.initialize`` with the coordinator on ``127.0.0.1:PORT``,
two CPU devices per process and CPU collectives through gloo, so the global mesh has four
devices in two processes. For every entry of :data:`CASES` it runs the fused loss inside
``jax.shard_map`` over that mesh, with ``w`` (and ``b``, and for distillation ``teacher_w``
and ``teacher_b``) sharded along the vocabulary axis ``"v"`` and everything else
replicated, takes the value and the gradients of ``x``, ``w`` and ``b``, and writes them,
replicated back onto every device, to ``OUT_DIR/process{PROCESS_ID}.npz`` (keys
``{case}/value``, ``{case}/dx``, ``{case}/dw``, ``{case}/db``). Each process also computes
every case unsharded on one of its devices and prints, per case, one JSON line with the
value and the largest relative errors (:func:`compare`), then a verdict line; it exits with
status 1 when any case differs by more than :data:`TOLERANCE`. The test process computes the
same losses unsharded, in one process with no distribution, with :func:`value_and_grads` and
:func:`inputs` from this module, and compares with what each process wrote.

Everything listens on 127.0.0.1 only: the coordinator is bound there, and gloo is told to
use that address rather than whatever the machine's host name resolves to.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _gloo import gloo_on_loopback

N, D, DT, V = 16, 8, 6, 64  # V divisible by the 4 devices
IGNORE = -100
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
AXIS = "v"


@dataclass(frozen=True)
class Case:
    """One loss call: ``loss`` is "cross_entropy" or "distillation", ``kwargs`` its keyword
    arguments besides the arrays, ``axis_name`` and the bias."""

    name: str
    loss: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)


CASES = [
    Case("ce_mean", "cross_entropy", {"ignore_index": IGNORE}),
    Case("ce_sum_smoothing_zloss", "cross_entropy",
         {"reduction": "sum", "label_smoothing": 0.2, "z_loss": 1e-2,
          "ignore_index": IGNORE}),
    Case("ce_none", "cross_entropy", {"reduction": "none", "ignore_index": IGNORE}),
    Case("distill_forward_kl", "distillation", {"temperature": 2.0}),
    Case("distill_jsd_hard", "distillation",
         {"temperature": 1.5, "beta": 0.5, "hard_weight": 0.3, "ignore_index": IGNORE}),
]

# Where each array lives on the mesh: the vocabulary axis of the heads is split over "v".
SPECS = {"x": (), "w": (None, AXIS), "b": (AXIS,), "tx": (), "tw": (None, AXIS),
         "tb": (AXIS,), "labels": (), "ct": ()}


# Largest error of a sharded result, relative to max(1, the unsharded result's largest entry):
# float32 summation in another order over four shards.
TOLERANCE = 2e-5
KEYS = ("value", "dx", "dw", "db")


def compare(got: dict[str, Any], want: dict[str, Any]) -> dict[str, float]:
    """Per key of :data:`KEYS`, the largest error of ``got`` against ``want`` relative to
    ``max(1, max |want|)``; shapes must agree."""
    errs = {}
    for key in KEYS:
        g, w = np.asarray(got[key], np.float64), np.asarray(want[key], np.float64)
        assert g.shape == w.shape, (key, g.shape, w.shape)
        errs[key] = float(np.max(np.abs(g - w))) / max(1.0, float(np.max(np.abs(w))))
    return errs


def inputs() -> dict[str, np.ndarray]:
    """The same arrays in every process (NumPy's generator, not device-dependent)."""
    rng = np.random.default_rng(1234)
    labels = rng.integers(0, V, N).astype(np.int32)
    labels[[2, 9]] = IGNORE
    return {
        "x": rng.normal(size=(N, D)).astype(np.float32),
        "w": (0.7 * rng.normal(size=(D, V))).astype(np.float32),
        "b": (0.3 * rng.normal(size=V)).astype(np.float32),
        "tx": rng.normal(size=(N, DT)).astype(np.float32),
        "tw": (0.9 * rng.normal(size=(DT, V))).astype(np.float32),
        "tb": (0.2 * rng.normal(size=V)).astype(np.float32),
        "labels": labels,
        "ct": rng.normal(size=N).astype(np.float32),  # cotangent for reduction="none"
    }


def _loss(case: Case, a: dict, axis_name: str | None):
    """The case's scalar loss of the arrays ``a`` (local shards under shard_map)."""
    import jax.numpy as jnp  # noqa: PLC0415

    import softmax_jax as sj  # noqa: PLC0415

    if case.loss == "cross_entropy":
        out = sj.linear_softmax_cross_entropy(a["x"], a["w"], a["labels"], a["b"],
                                              axis_name=axis_name, **case.kwargs)
    else:
        # Labels only where the case uses them (hard_weight, ignore_index): the shared labels
        # hold IGNORE, which is out of range without ignore_index.
        uses_labels = case.kwargs.get("hard_weight") or "ignore_index" in case.kwargs
        out = sj.linear_softmax_distillation(
            a["x"], a["w"], a["tx"], a["tw"], labels=a["labels"] if uses_labels else None,
            b=a["b"], teacher_b=a["tb"], axis_name=axis_name, **case.kwargs)
    if case.kwargs.get("reduction") == "none":
        out = jnp.sum(out * a["ct"])
    return out


def value_and_grads(case: Case, a: dict, mesh: Any = None) -> dict[str, Any]:
    """Value and gradients of ``x``, ``w`` and ``b``: unsharded when ``mesh`` is None, else
    inside ``jax.shard_map`` over ``mesh`` with the arrays laid out as in :data:`SPECS`
    (``a`` then holds global arrays already placed that way) and the results replicated."""
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    names = sorted(a)

    def f(x, w, b, rest):
        arrays = dict(rest, x=x, w=w, b=b)
        if mesh is None:
            return _loss(case, arrays, None)
        sharded = jax.shard_map(
            lambda *vals: _loss(case, dict(zip(names, vals, strict=True)), AXIS),
            mesh=mesh,
            in_specs=tuple(P(*SPECS[n]) for n in names),
            out_specs=P(),
        )
        return sharded(*(arrays[n] for n in names))

    rest = {n: a[n] for n in names if n not in ("x", "w", "b")}
    grad_fn = jax.value_and_grad(f, argnums=(0, 1, 2))
    if mesh is not None:  # every output whole on every device, so each process can read it
        grad_fn = jax.jit(grad_fn, out_shardings=NamedSharding(mesh, P()))
    value, (dx, dw, db) = grad_fn(a["x"], a["w"], a["b"], rest)
    return {"value": value, "dx": dx, "dw": dw, "db": db}


def _local(arr: Any) -> np.ndarray:
    """A replicated global array's value, read from this process's first device."""
    return np.asarray(arr.addressable_data(0))



def main(argv: list[str]) -> int:
    process_id, port, out_dir = int(argv[0]), int(argv[1]), Path(argv[2])
    import jax  # noqa: PLC0415

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    gloo_on_loopback()
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        coordinator_bind_address=f"127.0.0.1:{port}",
        num_processes=NUM_PROCESSES,
        process_id=process_id,
        initialization_timeout=120,
    )
    from jax.sharding import Mesh, NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    assert jax.process_count() == NUM_PROCESSES, jax.process_count()
    assert jax.local_device_count() == DEVICES_PER_PROCESS, jax.local_devices()
    assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS, jax.devices()
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    host = inputs()
    placed = {
        n: jax.make_array_from_callback(
            v.shape, NamedSharding(mesh, P(*SPECS[n])), lambda idx, v=v: v[idx])
        for n, v in host.items()
    }
    saved: dict[str, np.ndarray] = {}
    mismatched = []
    for case in CASES:
        result = value_and_grads(case, placed, mesh)
        for key, arr in result.items():
            saved[f"{case.name}/{key}"] = _local(arr)
        got = {key: saved[f"{case.name}/{key}"] for key in KEYS}
        want = value_and_grads(case, {n: jax.numpy.asarray(v) for n, v in host.items()})
        errs = compare(got, want)
        match = max(errs.values()) < TOLERANCE
        if not match:
            mismatched.append(case.name)
        print(json.dumps({"case": case.name, "process": process_id,
                          "value": float(got["value"]), "unsharded": float(want["value"]),
                          "max_rel_err": errs, "match": match}), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / f"process{process_id}.npz", **saved)
    print(json.dumps({"case": "done", "process": process_id,
                      "devices": [str(d) for d in jax.devices()]}), flush=True)
    verdict = (f"all {len(CASES)} cases match" if not mismatched else
               f"{len(mismatched)} of {len(CASES)} cases differ: {', '.join(mismatched)}")
    print(f"process {process_id}: sharded over {jax.device_count()} devices in "
          f"{jax.process_count()} processes vs unsharded (value, dx, dw, db; relative error "
          f"< {TOLERANCE:g}): {verdict}", flush=True)
    jax.distributed.shutdown()
    return 1 if mismatched else 0


if __name__ == "__main__":
    # Run by hand, import the package beside this file, as the tests' subprocesses do.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main(sys.argv[1:]))
