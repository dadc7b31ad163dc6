"""The contrastive ring (``axis_name``) against one device: 8 simulated devices in one
subprocess, and two processes with ``jax.distributed`` (gloo on 127.0.0.1, two devices
each). The workers are ``tests/_contrastive_ring_check.py``; this process computes every
case unsharded and compares the value and the gradients of ``x``, ``y``, the logit scale
and the bias."""

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

WORKER = Path(__file__).with_name("_contrastive_ring_check.py")
check = load_module(WORKER, "_contrastive_ring_check")

TIMEOUT_S = 300


def _env(**extra: str) -> dict[str, str]:
    return repo_env(drop=("XLA_FLAGS",), JAX_PLATFORMS="cpu", **extra)


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both runs at once (they are independent): ``{name: (arrays, json lines, logs)}``."""
    out = tmp_path_factory.mktemp("contrastive_ring")
    sim = _start(["sim", str(out)],
                 _env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    port = free_port()
    dist = [_start(["dist", str(i), str(port), str(out)], _env())
            for i in range(check.NUM_PROCESSES)]
    logs = {"sim": wait_all([sim], TIMEOUT_S), "dist": wait_all(dist, TIMEOUT_S)}
    arrays = {"sim": dict(np.load(out / "sim.npz"))}
    for i in range(check.NUM_PROCESSES):
        arrays[f"process{i}"] = dict(np.load(out / f"process{i}.npz"))
    lines = [json.loads(line) for log in (*logs["sim"], *logs["dist"])
             for line in log.splitlines() if line.startswith("{")]
    return {"arrays": arrays, "lines": lines, "logs": "\n".join(logs["sim"] + logs["dist"])}


def test_rings_ran_on_8_and_4_devices(runs):
    done = {(r["mode"], r.get("process")): r["devices"] for r in runs["lines"]
            if r["case"] == "done"}
    assert done == {("sim", None): 8, ("dist", 0): 4, ("dist", 1): 4}, runs["logs"]


@pytest.mark.parametrize("case", check.CASES, ids=lambda c: c.name)
def test_ring_matches_one_device(runs, case):
    want = check.value_and_grads(case, {k: jax.numpy.asarray(v)
                                        for k, v in check.inputs().items()})
    assert np.isfinite(float(want["value"]))
    assert np.any(np.asarray(want["dy"])), "an all-zero dy would prove nothing"
    for run, arrays in runs["arrays"].items():
        for key in check.KEYS:
            got = arrays.get(f"{case.name}/{key}")
            assert got is not None, f"{run} did not write {case.name}/{key}"
            expected = np.asarray(want[key])
            assert got.shape == expected.shape, (run, key, got.shape, expected.shape)
            scale = max(1.0, float(np.max(np.abs(expected))))
            err = float(np.max(np.abs(got - expected))) / scale
            assert err < 2e-5, f"{run}, {case.name}, {key}: relative error {err:.2e}"
        masked = ~check.inputs()["where"] if case.masked else np.zeros(check.N, bool)
        assert np.all(arrays[f"{case.name}/dx"][masked] == 0), run
