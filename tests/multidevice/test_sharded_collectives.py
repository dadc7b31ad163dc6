"""The collectives of the compiled sharded losses, pinned (compile only).

On a 2 x 4 ``('data', 'model')`` mesh with ``x`` sharded on ``data`` and ``w`` along the
vocabulary on ``model``, the fused losses' ``value_and_grad`` must not all-gather ``w``'s
``[D, V]`` nor any ``[tokens, V]`` array, with Explicit and with Auto axis types; CLIP and
SigLIP batch-sharded on 8 devices go round the ring (``collective-permute``) and never
all-gather the batch.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import pytest
from _compiled import collectives
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import softmax_jax as sj

N, D, DT, V = 2048, 128, 64, 16384
CN, CD = 2048, 64




def _mesh(shape, names, kind):
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def _no_vocabulary_gather(gathers: collections.Counter) -> None:
    wide = {s: c for s, c in gathers.items() if s and s[-1] == V}
    assert not wide, f"all-gathers of vocabulary-wide arrays: {wide}"


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=lambda k: k.name)
def test_vocab_parallel_cross_entropy_gathers_no_vocabulary(kind):
    def loss(x, w, labels):
        return sj.linear_softmax_cross_entropy(x, w, labels, label_smoothing=0.1)

    coll = collectives(jax.value_and_grad(loss, argnums=(0, 1)),
                        _mesh((2, 4), ("data", "model"), kind),
                        [((N, D), P("data"), jnp.float32),
                         ((D, V), P(None, "model"), jnp.float32),
                         ((N,), P("data"), jnp.int32)])
    _no_vocabulary_gather(coll["all-gather"])


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=lambda k: k.name)
def test_vocab_parallel_distillation_gathers_no_vocabulary(kind):
    def loss(x, w, tx, tw):
        return sj.linear_softmax_distillation(x, w, tx, tw, temperature=2.0)

    coll = collectives(jax.value_and_grad(loss, argnums=(0, 1)),
                        _mesh((2, 4), ("data", "model"), kind),
                        [((N, D), P("data"), jnp.float32),
                         ((D, V), P(None, "model"), jnp.float32),
                         ((N, DT), P("data"), jnp.float32),
                         ((DT, V), P(None, "model"), jnp.float32)])
    _no_vocabulary_gather(coll["all-gather"])


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=lambda k: k.name)
@pytest.mark.parametrize("loss", [sj.contrastive_loss, sj.sigmoid_contrastive_loss],
                         ids=["clip", "siglip"])
def test_batch_sharded_contrastive_goes_round_the_ring(loss, kind):
    coll = collectives(jax.value_and_grad(lambda x, y: loss(x, y), argnums=(0, 1)),
                        _mesh((8,), ("data",), kind), [((CN, CD), P("data"), jnp.float32)] * 2)
    assert not coll["all-gather"], f"gathered: {dict(coll['all-gather'])}"
    # y's block of CN / 8 rows moves round the ring
    assert coll["collective-permute"][(CN // 8, CD)] >= 1, dict(coll["collective-permute"])


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=lambda k: k.name)
def test_contrastive_ring_spans_the_mesh_axes_that_split_nothing(kind):
    """On a 2 x 4 mesh with the batch split over ``data`` only, the ring runs over all 8
    devices (blocks of ``CN / 8`` rows), so that no device along ``model`` repeats another's
    tiles."""
    coll = collectives(jax.value_and_grad(lambda x, y: sj.contrastive_loss(x, y),
                                           argnums=(0, 1)),
                        _mesh((2, 4), ("data", "model"), kind),
                        [((CN, CD), P("data"), jnp.float32)] * 2)
    permutes = coll["collective-permute"]
    assert permutes[(CN // 8, CD)] >= 1 and not permutes[(CN // 2, CD)], dict(permutes)
