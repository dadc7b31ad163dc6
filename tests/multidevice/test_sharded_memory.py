"""Per-device temporaries of the compiled sharded fused cross-entropy (compile only:
``memory_analysis()``, no run).

With ``w`` replicated and the tokens split over every device (data parallel), each device
forms a partial ``dW`` of ``w``'s full ``[D, V]`` that is summed over the devices. The sum
is written back into that partial chunk by chunk, so the program holds one ``[D, V]`` (the
output) and a chunk, not a second ``[D, V]`` as a temporary.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import softmax_jax as sj

N, D, V = 256, 256, 32768
DW_BYTES = D * V * 4


def _compiled(kind):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind,) * 2)
    structs = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, p)) for s, p, d in
               [((N, D), P("data"), jnp.float32), ((D, V), P(), jnp.float32),
                ((N,), P("data"), jnp.int32)]]

    def loss(x, w, labels):
        return sj.linear_softmax_cross_entropy(x, w, labels)

    with jax.set_mesh(mesh):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*structs).compile()


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=lambda k: k.name)
def test_data_parallel_dw_is_summed_in_place(kind):
    exe = _compiled(kind)
    temp = exe.memory_analysis().temp_size_in_bytes
    assert temp < DW_BYTES // 2, f"{temp / 2**20:.1f} MiB of temporaries, dW is 32 MiB"
    # the sum over devices goes by chunks: no all-reduce of the whole [D, V]
    whole = re.findall(rf"f32\[{D},{V}\]\S* all-reduce\(", exe.as_text())
    assert not whole, whole
