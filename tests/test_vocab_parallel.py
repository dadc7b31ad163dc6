"""Vocab-parallel (shard_map) and batch-sharded (jit + NamedSharding) fused loss on 8 devices.

JAX fixes its device count when it starts, so the checks run in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; see ``_vocab_parallel_check.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from _subprocess import repo_env

from softmax_jax.fused import linear_softmax_cross_entropy

SCRIPT = Path(__file__).with_name("_vocab_parallel_check.py")


@pytest.fixture(scope="module")
def check_results() -> list[dict]:
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = repo_env(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_check_ran_and_passed(check_results):
    names = [r["name"] for r in check_results]
    assert names[-1] == "done"
    # 3 reductions x 3 option sets x 2 meshes, plus 4 small-block runs.
    assert sum(n.startswith("vocab_parallel") for n in names) == 22


def test_vocab_only_mesh_matches_unsharded(check_results):
    rows = [r for r in check_results
            if r["name"].startswith("vocab_parallel") and "mesh={'vocab': 8}" in r["name"]]
    assert len(rows) == 11
    assert max(r["max_err"] for r in rows) < 1e-5


def test_data_by_vocab_mesh_matches_unsharded(check_results):
    rows = [r for r in check_results if r["name"].startswith("vocab_parallel")
            and "mesh={'data': 2, 'vocab': 4}" in r["name"]]
    assert len(rows) == 11
    assert max(r["max_err"] for r in rows) < 1e-5


def test_label_smoothing_is_over_the_global_vocabulary(check_results):
    # Megatron's bug would divide by the local vocabulary: the sharded result would differ.
    rows = [r for r in check_results if "smoothing" in r["name"]]
    assert rows and max(r["max_err"] for r in rows) < 1e-5


def test_batch_sharded_jit_matches_unsharded(check_results):
    rows = [r for r in check_results if r["name"].startswith("jit, batch-sharded")]
    assert len(rows) == 2 and max(r["max_err"] for r in rows) < 1e-5


def test_bf16_and_invalid_labels_sharded(check_results):
    names = {r["name"] for r in check_results}
    assert "bf16 vocab-parallel vs f32" in names
    # each bf16 gradient within its rounding bound (the script asserts ratio <= 1)
    bound = [r for r in check_results if r["name"] == "bf16 gradients within their rounding bound"]
    assert len(bound) == 1 and bound[0]["max_err"] <= 1.0
    assert "out-of-range label is NaN" in names
    assert "check_vma=False is refused" in names


def test_argmax_ties_take_the_first_index_across_shards(check_results):
    # one vocabulary block per shard, and several blocks per shard
    rows = [r for r in check_results if r["name"].startswith("argmax ties across shards")]
    assert len(rows) == 2


def test_distillation_vocab_parallel_matches_unsharded(check_results):
    rows = [r for r in check_results if r["name"].startswith("distill_parallel")]
    # beta 0 / 0.5 / 1 on the vocabulary mesh, and two data x vocab runs (one in small blocks).
    assert len(rows) == 5
    assert max(r["max_err"] for r in rows) < 1e-5


def test_class_weights_vocab_parallel_match_unsharded(check_results):
    rows = [r for r in check_results if r["name"].startswith("class_weights_parallel")]
    assert len(rows) == 3
    assert max(r["max_err"] for r in rows) < 1e-5


def test_negative_infinite_shard_and_unnamed_sharding(check_results):
    names = {r["name"] for r in check_results}
    # The last shard's bias all -inf gives finite values equal to the unsharded call, and a
    # vocabulary-sharded w without axis_name raises instead of normalising locally.
    assert "-inf last shard is finite" in names
    assert "sharded w without axis_name is refused" in names


def test_plus_infinite_logit_in_one_shard_is_nan(check_results):
    # Token 5's +inf logit is NaN sharded and unsharded; the other tokens match.
    rows = [r for r in check_results if r["name"] == "+inf logit in one shard is nan"]
    assert len(rows) == 1 and rows[0]["max_err"] < 1e-6


def test_axis_name_outside_shard_map_is_refused():
    x, w, labels = jnp.ones((4, 3)), jnp.ones((3, 5)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="axis_name='vocab'.*does not vary"):
        linear_softmax_cross_entropy(x, w, labels, axis_name="vocab")
    with pytest.raises(ValueError, match="does not vary"):
        jax.jit(lambda x, w: linear_softmax_cross_entropy(x, w, labels, axis_name="v"))(x, w)
