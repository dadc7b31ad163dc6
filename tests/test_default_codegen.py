"""The tests compile with two fast-compile XLA:CPU flags (``tests/conftest.py``), under
which XLA fuses some programs differently; users get XLA's defaults. Every test that reads
a compiled program (its N x V passes, temporaries or collectives), and every check whose
outcome depends on the machine code, runs again here under XLA's defaults, in its own
process:

- NaN and +inf rows at the batch size where XLA:CPU hands reductions to its vectorised
  kernels (``test_softmax_invalid_rows_in_large_batches.py``);
- the compiled structure and temporaries of the core and fused functions, and of a GRPO
  step;
- the sharded programs' collectives and memory on 8 simulated devices.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
# Each process also checks that it compiles with the flags it was asked for.
_FLAGS_CHECK = "tests/test_default_codegen.py::test_the_xla_flags_follow_the_switch"
_FAST_COMPILE = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0")
_ONE_DEVICE = (
    _FLAGS_CHECK,
    "tests/core/test_softmax_invalid_rows_in_large_batches.py",
    "tests/core/test_compiled_structure.py",
    "tests/fused/test_engine_passes.py",
    "tests/fused/test_linear_cross_entropy.py::test_compiled_gradient_holds_no_n_by_v_buffer",
    "tests/fused/test_linear_cross_entropy_options.py"
    "::test_bf16_gradient_has_no_weight_sized_temporary",
    "tests/scripts/test_grpo.py::test_step_memory_compiles_both_losses",
)
_EIGHT_DEVICES = (
    _FLAGS_CHECK,
    "tests/multidevice/test_sharded_memory.py",
    "tests/multidevice/test_linear_log_probs_sharded_jit.py",
    "tests/multidevice/test_sharded_contrastive_labels.py",
)


@pytest.mark.parametrize("tests", [_ONE_DEVICE, _EIGHT_DEVICES], ids=["one", "eight"])
def test_compiled_program_tests_pass_under_xla_defaults(tests):
    env = dict(os.environ, SOFTMAX_JAX_TEST_XLA_DEFAULTS="1", XLA_FLAGS="")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *tests],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def test_the_xla_flags_follow_the_switch():
    """The fast-compile flags in the main run; none of them where
    ``SOFTMAX_JAX_TEST_XLA_DEFAULTS=1`` asks for XLA's defaults."""
    flags = os.environ.get("XLA_FLAGS", "")
    defaults = os.environ.get("SOFTMAX_JAX_TEST_XLA_DEFAULTS") == "1"
    for flag in _FAST_COMPILE:
        assert (flag.split("=")[0] in flags) != defaults, flags
