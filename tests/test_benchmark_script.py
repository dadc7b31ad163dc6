"""The benchmark script runs end to end on small inputs and reports every row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra", [[], ["--hugepages"]], ids=["default", "hugepages"])
def test_core_benchmark_small_run_prints_a_complete_table(extra):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--n", "32", "--v", "50",
         "--repeats", "2", *extra],
        capture_output=True, text=True, check=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"},
    ).stdout
    header = out.splitlines()[0]
    assert ("glibc.malloc.hugetlb=1" in header) == bool(extra), header
    rows = [line for line in out.splitlines() if line.startswith("| softmax") or
            line.startswith("| log") or line.startswith("| sigmoid")]
    assert len(rows) == 8, out
    for row in rows:
        ratio = float(row.split("|")[5].strip().rstrip("x"))
        assert 0.0 < ratio < 100.0, row
