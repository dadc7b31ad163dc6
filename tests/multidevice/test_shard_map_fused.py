"""The vocabulary-parallel fused cross-entropy inside a user's ``jax.shard_map``
(``axis_name``) against the same call on one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from _inputs import integers, normal
from jax.sharding import PartitionSpec as P

import softmax_jax as sj


def test_vocab_parallel_mean_matches_one_device() -> None:
    x, w, y = normal(0, (16, 8)), normal(1, (8, 64), scale=0.5), integers(2, (16,), 64)
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))

    def sharded(x, w, y):
        def body(x, w, y):
            return sj.linear_softmax_cross_entropy(x, w, y, axis_name="model")
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, "model"), P()),
                             out_specs=P())(x, w, y)

    def one(x, w, y):
        return sj.linear_softmax_cross_entropy(x, w, y)

    got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(x, w, y)
    want = jax.value_and_grad(one, argnums=(0, 1))(x, w, y)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-6)
    assert float(jnp.abs(got[1][1]).max()) > 0
