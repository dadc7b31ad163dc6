"""The wheel holds the library alone: the training programs, their importable pieces and the
benchmark anchors stay in the repository's ``scripts/`` folder."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import softmax_jax

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_library(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = tmp_path.glob("softmax_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if ".dist-info/" not in n]
    assert code, names
    assert all(n.startswith("softmax_jax/") for n in code), code
    assert not [n for n in code if "experiments" in n or n.startswith("softmax_jax/scripts")]
    shipped = {n for n in code if n.endswith(".py")}
    here = {p.relative_to(ROOT).as_posix() for p in (ROOT / "softmax_jax").rglob("*.py")}
    assert shipped == here
    assert f"-{softmax_jax.__version__}-" in wheel.name
