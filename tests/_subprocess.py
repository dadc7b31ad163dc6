"""The environment of every subprocess the tests start."""

from __future__ import annotations

import os
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
