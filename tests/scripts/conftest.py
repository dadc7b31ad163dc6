"""Fixtures shared by the scripts' tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _scripts import load_script


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One ``train.py --epochs 2`` run on digits, trained once (in this process) for every
    test that starts from a trained run; a test that changes it works on a copy
    (:func:`trained_run_copy`)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPLBACKEND", "Agg")
        code = load_script("train.py").main(["--epochs", "2", "--out", str(out),
                                             "--no-progress"])
    assert code == 0
    return out


@pytest.fixture
def trained_run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of :func:`trained_run` in this test's ``tmp_path``."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))
