"""Fixtures shared by the library's tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# The tests compile some two thousand programs, most of them small, and compiling is
# most of their time. Two XLA:CPU flags make it about twice as fast: LLVM's optimisation
# level 0, and XLA's loop emitter instead of its newer fusion emitters. The numbers agree
# to float rounding, but XLA fuses some programs differently under the second flag, so
# every test that reads a compiled program (passes, temporaries, collectives), and the
# checks that depend on the machine code, run again under XLA's defaults in
# tests/test_default_codegen.py (which sets SOFTMAX_JAX_TEST_XLA_DEFAULTS=1). Benchmarks
# and users keep XLA's defaults. Set before JAX starts its backend (importing JAX does not
# start it); a flag the environment already gives wins.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
if os.environ.get("SOFTMAX_JAX_TEST_XLA_DEFAULTS") != "1":
    _given = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join(
        [_given] + [f for f in _FAST_COMPILE if f.split("=")[0] not in _given]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

_HERE = Path(__file__).parent


@pytest.fixture
def x64() -> Iterator[None]:
    """Runs a test with float64 enabled, without changing the setting for other tests."""
    with jax.enable_x64(True):
        yield


def pytest_configure(config) -> None:
    """Keeps compiled programs in pytest's cache folder (``.pytest_cache/d/jax``), keyed by
    XLA on the program's text, its options and the JAX version.

    Many tests build fresh closures that compile to the same program, and the two xdist
    workers and the multidevice run compile many of the same references: the cache compiles
    each once. A full run writes about 50 MiB; a later run compiles and adds only the
    programs a change touched. No size cap is set: JAX's eviction rescans the whole folder
    under a file lock on every write, which costs more than the cache saves.
    ``pytest --cache-clear`` empties it, ``-p no:cacheprovider`` turns it off, and a
    ``JAX_COMPILATION_CACHE_DIR`` in the environment wins.
    """
    cache = getattr(config, "cache", None)
    if cache is None or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", str(cache.mkdir("jax")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_ignore_collect(collection_path, config) -> bool | None:
    """Leaves ``tests/multidevice`` to its own pytest process (8 simulated devices), unless
    the command line names it."""
    if collection_path.name == "multidevice" and collection_path.parent == _HERE:
        named = (str(a) for a in config.args)
        return not any("multidevice" in a for a in named)
    return None
