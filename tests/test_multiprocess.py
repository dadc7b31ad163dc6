"""The vocab-parallel fused losses across two processes, against one unsharded process.

Two worker processes (``tests/_multiprocess_check.py``) form a JAX cluster with
``jax.distributed.initialize`` on 127.0.0.1, two CPU devices each and gloo collectives, and
run every case of ``CASES`` inside ``jax.shard_map`` over the four devices, with the heads
sharded along the vocabulary. This process computes the same values and gradients (``x``,
``w``, ``b``) without any sharding and compares them with what each worker wrote. The
distillation cases are skipped while ``softmax_jax.linear_softmax_distillation`` does not
exist.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

WORKER = Path(__file__).with_name("_multiprocess_check.py")
_spec = importlib.util.spec_from_file_location("_multiprocess_check", WORKER)
assert _spec is not None and _spec.loader is not None
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check  # dataclasses look their module up there
_spec.loader.exec_module(check)

TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out_dir: Path) -> list[str]:
    """Starts both workers, waits for both, and returns their combined output; fails with
    both outputs when either fails or runs past the timeout."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), str(out_dir)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(check.NUM_PROCESSES)
    ]
    outputs, failed = [], []
    deadline = time.monotonic() + TIMEOUT_S  # for both together
    for i, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            failed.append(f"process {i} still running after {TIMEOUT_S} s: killed")
        if proc.returncode != 0:
            failed.append(f"process {i} exited with {proc.returncode}")
        outputs.append(f"--- process {i} ---\n{out[-6000:]}")
    assert not failed, "; ".join(failed) + "\n" + "\n".join(outputs)
    return outputs


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("multiprocess")
    logs = _run_workers(out_dir)
    results = {
        i: dict(np.load(out_dir / f"process{i}.npz")) for i in range(check.NUM_PROCESSES)
    }
    lines = [json.loads(line) for log in logs for line in log.splitlines()
             if line.startswith("{")]
    return {"arrays": results, "lines": lines, "logs": "\n".join(logs)}


def test_workers_formed_one_four_device_cluster(worker_results):
    done = [r for r in worker_results["lines"] if r["case"] == "done"]
    assert sorted(r["process"] for r in done) == [0, 1], worker_results["logs"]
    for r in done:  # each process saw the global device list, two of them its own
        assert len(r["devices"]) == check.NUM_PROCESSES * check.DEVICES_PER_PROCESS


@pytest.mark.parametrize("case", check.CASES, ids=lambda c: c.name)
def test_two_processes_match_one(worker_results, case):
    if case.loss == "distillation" and not check.distillation_available():
        pytest.skip("softmax_jax.linear_softmax_distillation does not exist yet")
    want = check.value_and_grads(case, {k: jax.numpy.asarray(v) for k, v in
                                        check.inputs().items()})
    assert np.isfinite(float(want["value"])), want["value"]
    for i, arrays in worker_results["arrays"].items():
        for key in ("value", "dx", "dw", "db"):
            got = arrays.get(f"{case.name}/{key}")
            assert got is not None, f"process {i} did not write {case.name}/{key}"
            expected = np.asarray(want[key])
            assert got.shape == expected.shape, (i, key, got.shape, expected.shape)
            scale = max(1.0, float(np.max(np.abs(expected))))
            err = float(np.max(np.abs(got - expected))) / scale
            assert err < 2e-5, f"process {i}, {case.name}, {key}: relative error {err:.2e}"
        assert np.any(arrays[f"{case.name}/dw"]), "an all-zero dw would prove nothing"
