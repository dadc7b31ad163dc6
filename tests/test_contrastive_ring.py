"""The contrastive ring (``axis_name``) against one device: 8 simulated devices in one
subprocess, and two processes with ``jax.distributed`` (gloo on 127.0.0.1, two devices
each). The workers are ``tests/_contrastive_ring_check.py``; this process computes every
case unsharded and compares the value and the gradients of ``x``, ``y``, the logit scale
and the bias."""

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

WORKER = Path(__file__).with_name("_contrastive_ring_check.py")
_spec = importlib.util.spec_from_file_location("_contrastive_ring_check", WORKER)
assert _spec is not None and _spec.loader is not None
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check  # dataclasses look their module up there
_spec.loader.exec_module(check)

TIMEOUT_S = 300
ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env | extra


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(procs: list[subprocess.Popen]) -> list[str]:
    outputs, failed = [], []
    deadline = time.monotonic() + TIMEOUT_S
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


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both runs at once (they are independent): ``{name: (arrays, json lines, logs)}``."""
    out = tmp_path_factory.mktemp("contrastive_ring")
    sim = _start(["sim", str(out)],
                 _env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    port = _free_port()
    dist = [_start(["dist", str(i), str(port), str(out)], _env())
            for i in range(check.NUM_PROCESSES)]
    logs = {"sim": _wait([sim]), "dist": _wait(dist)}
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
