"""The sharded losses under ``jax.jit`` across two processes, against one process.

Two workers (``_multiprocess_sharded_worker.py``) form a JAX cluster with
``jax.distributed.initialize`` on 127.0.0.1 (gloo, two CPU devices each), build their global
arrays with ``jax.make_array_from_process_local_data`` and run the fused cross-entropy with
a vocabulary-sharded ``w`` (Explicit and Auto axis types) and CLIP with batch-sharded
embeddings, under ``jax.jit`` with no ``shard_map``. This process computes the same values and
gradients on one device and compares.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _scripts import load_module
from _subprocess import free_port, repo_env, wait_all

WORKER = Path(__file__).with_name("_multiprocess_sharded_worker.py")
worker = load_module(WORKER, "_multiprocess_sharded_worker")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("multiprocess_sharded")
    env = repo_env(drop=("XLA_FLAGS",), JAX_PLATFORMS="cpu")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(out_dir)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    wait_all(procs, 300)
    return [dict(np.load(out_dir / f"process{i}.npz")) for i in range(2)]


def _one_process(fn, args, names) -> dict:
    value, grads = jax.value_and_grad(fn, argnums=(0, 1))(*(jnp.asarray(a) for a in args))
    return {"value": value, **dict(zip(names, grads, strict=True))}


@pytest.mark.parametrize("kind", ["Explicit", "Auto"])
def test_vocab_sharded_cross_entropy_in_two_processes_equals_one(results, kind):
    a = worker.inputs()
    want = _one_process(worker.cross_entropy, (a["x"], a["w"], a["labels"]),
                        ("dx", "dw"))
    for got in results:
        for key, ref in want.items():
            np.testing.assert_allclose(got[f"ce_{kind}/{key}"], np.asarray(ref), rtol=2e-5,
                                       atol=2e-6)


def test_batch_sharded_clip_in_two_processes_equals_one(results):
    a = worker.inputs()
    want = _one_process(worker.clip, (a["x"], a["y"]), ("dx", "dy"))
    for got in results:
        for key, ref in want.items():
            np.testing.assert_allclose(got[f"clip/{key}"], np.asarray(ref), rtol=2e-5,
                                       atol=2e-6)
