"""The contrastive losses' argument checks inside a user's ``jax.shard_map``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import softmax_jax as sj


def test_clip_y_not_sharded_over_axis_name_gets_the_sharding_message() -> None:
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])
    x = jnp.ones((4, 3))

    def body(a, b):
        return sj.contrastive_loss(a, b, axis_name="data")

    f = jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P()), out_specs=P())
    with pytest.raises(ValueError, match="y .* does not vary over mesh axis"):
        f(x, x)
