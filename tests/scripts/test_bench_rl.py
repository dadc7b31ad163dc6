"""scripts/bench_rl.py at tiny shapes: its functions agree, and both tables print."""

from __future__ import annotations

import jax
import numpy as np
from _scripts import load_script

bench = load_script("bench_rl.py")


def test_speed_functions_agree_with_the_materialised_composition():
    args = bench.speed_inputs(16, 8, 50)
    fns = bench.speed_functions()
    want = jax.jit(fns["materialised"])(*args)
    got = jax.jit(fns["fused"])(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_quick_run_prints_both_tables(capsys):
    bench.main(["--quick", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "Memory: one GRPO step" in out and "| fused |" in out
    assert bench.grpo_step_memory(quick=True)["materialised"] > 0
