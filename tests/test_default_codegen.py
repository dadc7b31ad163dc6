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
_ONE_DEVICE = (
    "tests/core/test_softmax_invalid_rows_in_large_batches.py",
    "tests/core/test_compiled_structure.py",
    "tests/fused/test_engine_passes.py",
    "tests/fused/test_linear_cross_entropy.py::test_compiled_gradient_holds_no_n_by_v_buffer",
    "tests/fused/test_linear_cross_entropy_options.py"
    "::test_bf16_gradient_has_no_weight_sized_temporary",
    "tests/scripts/test_grpo.py::test_step_memory_compiles_both_losses",
)
_EIGHT_DEVICES = (
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


def test_the_fast_compile_flags_are_set_in_this_process():
    flags = os.environ.get("XLA_FLAGS", "")
    assert "--xla_cpu_use_fusion_emitters=false" in flags, flags
    assert "--xla_backend_optimization_level=0" in flags, flags
