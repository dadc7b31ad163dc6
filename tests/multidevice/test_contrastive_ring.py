"""The contrastive ring (``axis_name``) against one device: on this process's 8 simulated
devices, and across two processes with ``jax.distributed`` (gloo on 127.0.0.1, two devices
each; the workers are ``tests/multidevice/_contrastive_ring_check.py``). This process
computes every case unsharded and compares the value and the gradients of ``x``, ``y``, the
logit scale and the bias."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _scripts import load_module
from _subprocess import free_port, repo_env, wait_all
from jax.sharding import Mesh

WORKER = Path(__file__).with_name("_contrastive_ring_check.py")
check = load_module(WORKER, "_contrastive_ring_check")

TIMEOUT_S = 300


@functools.cache
def _one_device(case) -> dict[str, np.ndarray]:
    """The case's value and gradients on one device, computed once for every run compared
    with it (the 8 devices and each of the two processes)."""
    want = check.value_and_grads(case, {k: jax.numpy.asarray(v)
                                        for k, v in check.inputs().items()})
    return {k: np.asarray(v) for k, v in want.items()}


def _assert_matches_one_device(case, arrays: dict[str, np.ndarray], run: str) -> None:
    want = _one_device(case)
    assert np.isfinite(float(want["value"]))
    assert np.any(np.asarray(want["dy"])), "an all-zero dy would prove nothing"
    for key in check.KEYS:
        got = arrays.get(key)
        assert got is not None, f"{run} did not write {case.name}/{key}"
        expected = np.asarray(want[key])
        assert got.shape == expected.shape, (run, key, got.shape, expected.shape)
        scale = max(1.0, float(np.max(np.abs(expected))))
        err = float(np.max(np.abs(got - expected))) / scale
        assert err < 2e-5, f"{run}, {case.name}, {key}: relative error {err:.2e}"
    masked = ~check.inputs()["where"] if case.masked else np.zeros(check.N, bool)
    assert np.all(arrays["dx"][masked] == 0), run


@pytest.mark.parametrize("case", check.CASES, ids=lambda c: c.name)
def test_ring_on_8_devices_matches_one_device(case):
    mesh = Mesh(np.array(jax.devices()), (check.AXIS,))
    assert mesh.devices.size == 8
    got = check.value_and_grads(case, check.place(mesh), mesh)
    _assert_matches_one_device(case, {k: np.asarray(v) for k, v in got.items()}, "8 devices")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    """Both workers' ``{process: arrays}``, their JSON lines and their logs."""
    out = tmp_path_factory.mktemp("contrastive_ring")
    env = repo_env(drop=("XLA_FLAGS",), JAX_PLATFORMS="cpu")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for i in range(check.NUM_PROCESSES)]
    logs = wait_all(procs, TIMEOUT_S)
    arrays = {i: dict(np.load(out / f"process{i}.npz")) for i in range(check.NUM_PROCESSES)}
    lines = [json.loads(line) for log in logs for line in log.splitlines()
             if line.startswith("{")]
    return {"arrays": arrays, "lines": lines, "logs": "\n".join(logs)}


def test_two_processes_formed_one_four_device_ring(two_processes):
    done = {r.get("process"): r["devices"] for r in two_processes["lines"]
            if r["case"] == "done"}
    assert done == {0: 4, 1: 4}, two_processes["logs"]


@pytest.mark.parametrize("case", check.CASES, ids=lambda c: c.name)
def test_ring_across_two_processes_matches_one_device(two_processes, case):
    for i, arrays in two_processes["arrays"].items():
        mine = {k: arrays[f"{case.name}/{k}"] for k in check.KEYS if f"{case.name}/{k}" in arrays}
        _assert_matches_one_device(case, mine, f"process {i}")
