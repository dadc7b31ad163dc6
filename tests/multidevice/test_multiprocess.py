"""The vocab-parallel fused losses across two processes, against one unsharded process.

Two worker processes (``tests/multidevice/_multiprocess_check.py``) form a JAX cluster with
``jax.distributed.initialize`` on 127.0.0.1, two CPU devices each and gloo collectives, and
run every case of ``CASES`` inside ``jax.shard_map`` over the four devices, with the heads
sharded along the vocabulary. This process computes the same values and gradients (``x``,
``w``, ``b``) without any sharding and compares them with what each worker wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _scripts import load_module
from _subprocess import free_port, repo_env, wait_all

WORKER = Path(__file__).with_name("_multiprocess_check.py")
check = load_module(WORKER, "_multiprocess_check")

TIMEOUT_S = 300


def _run_workers(out_dir: Path) -> list[str]:
    """Starts both workers, waits for both, and returns their combined output; fails with
    both outputs when either fails or runs past the timeout."""
    env = repo_env(drop=("XLA_FLAGS",), JAX_PLATFORMS="cpu")
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), str(out_dir)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(check.NUM_PROCESSES)
    ]
    return wait_all(procs, TIMEOUT_S)


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
    want = check.value_and_grads(case, {k: jax.numpy.asarray(v) for k, v in
                                        check.inputs().items()})
    assert np.isfinite(float(want["value"])), want["value"]
    for i, arrays in worker_results["arrays"].items():
        missing = [k for k in check.KEYS if f"{case.name}/{k}" not in arrays]
        assert not missing, f"process {i} did not write {case.name}/{missing}"
        errs = check.compare({k: arrays[f"{case.name}/{k}"] for k in check.KEYS}, want)
        assert max(errs.values()) < check.TOLERANCE, (i, case.name, errs)
        assert np.any(arrays[f"{case.name}/dw"]), "an all-zero dw would prove nothing"


def test_each_worker_compared_every_case_and_printed_a_verdict(worker_results):
    # What a run by hand shows: per case the errors against the unsharded run, then a verdict.
    for i in range(check.NUM_PROCESSES):
        rows = [r for r in worker_results["lines"]
                if r.get("process") == i and "match" in r]
        assert [r["case"] for r in rows] == [c.name for c in check.CASES]
        assert all(r["match"] for r in rows), rows
        assert f"process {i}: sharded over 4 devices in 2 processes vs unsharded" in (
            worker_results["logs"])
    assert worker_results["logs"].count(f"all {len(check.CASES)} cases match") == 2
