"""Compile, time and measure jitted functions the same way for every benchmark table.

``scripts/benchmark.py`` and ``scripts/bench_fused.py`` both use these helpers, so that every
row of every table is measured alike:

* :func:`compile_fn` compiles ahead of time and reads XLA's own account of the program's
  temporary memory, ``memory_analysis().temp_size_in_bytes``: the buffers allocated beyond
  the arguments and the outputs. ``args`` may be ``jax.ShapeDtypeStruct`` s, so a program too
  big to run here can still be measured (:func:`temp_bytes`).
* :func:`interleaved_medians` times several functions round-robin (a, b, c, a, b, c, ...) on
  the same arguments and returns each one's median wall time, so that drift in machine load
  hits all of them alike.
* :func:`max_rel_err` checks that two implementations return the same numbers before their
  times are compared.

Only JAX is needed (no ``scripts`` extra).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "compile_fn",
    "interleaved_medians",
    "max_rel_err",
    "mib",
    "temp_bytes",
]


def compile_fn(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Callable[..., Any], int]:
    """Jit-compiles ``fn`` for ``args``; returns the executable and its temporary bytes.

    The temporary size is 0 when the backend gives no memory analysis.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, _temp_of(compiled)


def temp_bytes(fn: Callable[..., Any], args: Sequence[Any]) -> int:
    """Temporary bytes of ``jax.jit(fn)`` compiled for ``args``, without running it.

    Pass ``jax.ShapeDtypeStruct(shape, dtype)`` for arguments too large to allocate.
    """
    return compile_fn(fn, args)[1]


def _temp_of(compiled: Any) -> int:
    mem = compiled.memory_analysis()
    return int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0


def interleaved_medians(
    fns: Sequence[Callable[..., Any]], args: Sequence[Any], repeats: int, warmup: int = 2
) -> list[float]:
    """Median wall time in seconds of each of ``fns`` on ``args``, measured round-robin.

    Each function first runs ``warmup`` times untimed; then ``repeats`` rounds each call every
    function once, in order, waiting for its result (``jax.block_until_ready``).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in fns:
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def max_rel_err(got: Any, want: Any) -> float:
    """Largest difference between two pytrees of arrays, leaf by leaf, relative to the
    largest magnitude of that leaf of ``want`` (absolute where that leaf is all zeros).

    Relative to each leaf's own scale, so that the gradient of a mean loss (entries of order
    1/N) is judged as strictly as the loss itself.
    """
    errs = []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if not w64.size:
            continue
        scale = float(np.max(np.abs(w64)))
        errs.append(float(np.max(np.abs(g64 - w64))) / (scale if scale > 0 else 1.0))
    return max(errs, default=0.0)


def mib(nbytes: float) -> float:
    """Bytes in MiB."""
    return nbytes / 2**20

