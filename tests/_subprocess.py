"""The environment of every subprocess the tests start."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repo_env(drop: tuple[str, ...] = (), **overrides: str) -> dict[str, str]:
    """``os.environ`` with ``PYTHONPATH`` led by the repository root, so that a subprocess
    imports the code beside the test rather than an installed copy; ``drop`` names variables
    to leave out, ``overrides`` sets others."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(overrides)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a ``jax.distributed`` coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[str]:
    """Waits for every process within one shared deadline and returns their outputs; fails
    with all outputs when one exits non-zero or runs past the deadline (all are then killed,
    so that a worker blocked on a collective cannot hang the suite)."""
    outputs, failed = [], []
    deadline = time.monotonic() + timeout_s
    for i, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            failed.append(f"process {i} still running after {timeout_s} s: killed")
        if proc.returncode != 0:
            failed.append(f"process {i} exited with {proc.returncode}")
        outputs.append(f"--- process {i} ---\n{out[-6000:]}")
    assert not failed, "; ".join(failed) + "\n" + "\n".join(outputs)
    return outputs
