"""Fixtures shared by the library's tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# The tests compile some two thousand programs, most of them small, and compiling is
# most of their time. LLVM's optimisation level 0 roughly halves the compile time of the
# fused programs. XLA's own passes (fusion, layout, buffer assignment) are unchanged, so
# the compiled-structure and memory tests read the same programs, and the numbers agree
# to float rounding (on a sample of the library's outputs and gradients, bit for bit but
# one value 2e-10 apart). Only the machine code is less tuned, which the tests' small
# shapes do not feel. Benchmarks and users keep XLA's default. Set before
# JAX starts its backend (importing JAX does not start it); a flag the environment
# already gives wins.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

_HERE = Path(__file__).parent


@pytest.fixture
def x64() -> Iterator[None]:
    """Runs a test with float64 enabled, without changing the setting for other tests."""
    with jax.enable_x64(True):
        yield


def pytest_ignore_collect(collection_path, config) -> bool | None:
    """Leaves ``tests/multidevice`` to its own pytest process (8 simulated devices), unless
    the command line names it."""
    if collection_path.name == "multidevice" and collection_path.parent == _HERE:
        named = (str(a) for a in config.args)
        return not any("multidevice" in a for a in named)
    return None
