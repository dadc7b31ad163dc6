"""Fixtures shared by the scripts' tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _scripts import SCRIPTS
from _subprocess import repo_env


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One ``train.py --epochs 2`` run on digits, trained once for every test that starts
    from a trained run; a test that changes it works on a copy (:func:`trained_run_copy`)."""
    cwd = tmp_path_factory.mktemp("trained")
    out = cwd / "run"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "train.py"), "--epochs", "2", "--out", str(out),
         "--no-progress"],
        cwd=cwd, env=repo_env(JAX_PLATFORMS="cpu", MPLBACKEND="Agg"), capture_output=True,
        text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def trained_run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of :func:`trained_run` in this test's ``tmp_path``."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))
