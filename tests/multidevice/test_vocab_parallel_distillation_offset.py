"""x"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from softmax_jax import reference


def _kd_reference64(x, w, b, tx, tw, temperature: float, beta: float) -> np.ndarray:
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    zs = f64(x) @ f64(w) + (0.0 if b is None else f64(b))
    return reference.np_distillation(zs, f64(tx) @ f64(tw), temperature, beta)


_SHARDED = textwrap.dedent("""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from softmax_jax.fused import linear_softmax_distillation
    rng = np.random.default_rng(0)
    n, d, v = 16, 8, 400
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    # Shards far apart: each has its own maxima, the merge must shift their sums exactly.
    b = jnp.asarray(np.repeat([1000.0, 990.0, 1003.0, 996.0], v // 4)
                    + rng.normal(size=v) * 1e-2, jnp.float32)
    mesh = Mesh(np.array(jax.devices()), ("vocab",))
    out = {}
    for beta in (0.0, 1.0):
        def f(x, w, b, tw):
            return linear_softmax_distillation(x, w, x, tw, b=b, beta=beta, reduction="none",
                                               axis_name="vocab", vocab_block=40)
        g = jax.shard_map(f, mesh=mesh, in_specs=(P(), P(None, "vocab"), P("vocab"),
                                                  P(None, "vocab")), out_specs=P())
        out[str(beta)] = np.asarray(jax.jit(g)(x, w, b, w)).tolist()
    print(json.dumps({"x": np.asarray(x).tolist(), "w": np.asarray(w).tolist(),
                      "b": np.asarray(b).tolist(), "loss": out}))
""")


def test_kl_offset_merge_over_vocabulary_shards():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    x, w, b = (np.asarray(res[k], np.float32) for k in ("x", "w", "b"))
    for beta, got in res["loss"].items():
        ref = _kd_reference64(x, w, b, x, w, 1.0, float(beta))
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=2e-6)
