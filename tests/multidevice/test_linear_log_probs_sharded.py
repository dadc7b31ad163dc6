"""linear_log_probs with the vocabulary sharded over 8 simulated devices (``axis_name``)
against the same call on one device: values, entropies and gradients under any cotangent."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import normal
from jax.sharding import PartitionSpec as P

import softmax_jax as sj


@pytest.mark.parametrize("blocks", [{}, {"token_block": 8, "vocab_block": 3}])
def test_vocab_parallel_log_probs_and_entropy_match_one_device(blocks) -> None:
    x, w, b = normal(0, (4, 5, 8)), normal(1, (8, 56), scale=0.7), normal(2, (56,), scale=0.3)
    labels = np.random.default_rng(3).integers(0, 56, (4, 5))
    labels[1, 1] = -100
    y = jnp.asarray(labels, jnp.int32)
    keep = jnp.arange(5)[None, :] >= jnp.array([[1], [0], [2], [1]])
    cot = normal(4, (2, 4, 5))
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))

    def objective(logp, ent):
        return jnp.sum(cot[0] * logp) + jnp.sum(cot[1] * ent)

    def sharded(x, w, b, t):
        def body(x, w, b, t):
            logp, ent = sj.linear_log_probs(x, w, y, b, temperature=t, where=keep,
                                            ignore_index=-100, return_entropy=True,
                                            axis_name="model", **blocks)
            return objective(logp, ent)
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, "model"), P("model"), P()),
                             out_specs=P())(x, w, b, t)

    def one(x, w, b, t):
        logp, ent = sj.linear_log_probs(x, w, y, b, temperature=t, where=keep,
                                        ignore_index=-100, return_entropy=True)
        return objective(logp, ent)

    args = (x, w, b, jnp.asarray(0.8))
    got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))(*args)
    want = jax.value_and_grad(one, argnums=(0, 1, 2, 3))(*args)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-6)
    assert float(jnp.abs(got[1][1]).max()) > 0 and float(jnp.abs(got[1][3])) > 0


def test_vocab_sharded_w_without_axis_name_raises() -> None:
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    x, w, y = jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.zeros((4,), jnp.int32)

    def body(x, w):
        return sj.linear_log_probs(x, w, y)

    with pytest.raises(ValueError, match="axis_name"):
        jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, "model")),
                      out_specs=P())(x, w)
