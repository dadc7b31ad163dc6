"""``ignore_index`` is checked against the labels' own dtype, in the core and fused losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_jax as sj
from softmax_jax.fused import linear_softmax_cross_entropy, linear_softmax_distillation

_X = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
_W = jax.random.normal(jax.random.PRNGKey(1), (4, 5))


def _losses(labels, ignore_index):
    yield sj.softmax_cross_entropy_with_integer_labels(_X @ _W, labels,
                                                       ignore_index=ignore_index)
    yield linear_softmax_cross_entropy(_X, _W, labels, ignore_index=ignore_index,
                                       reduction="none")
    yield linear_softmax_distillation(_X, _W, _X, _W, labels=labels, hard_weight=0.5,
                                      ignore_index=ignore_index, reduction="none")


@pytest.mark.parametrize("dtype,ignore_index", [(jnp.uint8, -100), (jnp.int8, 300),
                                                (jnp.uint16, -1), (jnp.int16, 2**15)])
def test_ignore_index_outside_the_labels_dtype_raises(dtype, ignore_index):
    labels = jnp.array([1, 0, 2], dtype)
    for i in range(3):
        with pytest.raises(ValueError, match=f"ignore_index={ignore_index} lies outside"):
            list(_losses(labels, ignore_index))[i]


def test_uint32_labels_ignore_their_largest_value():
    labels = jnp.array([1, 2**32 - 1, 2], jnp.uint32)
    want = list(_losses(jnp.array([1, -100, 2]), -100))
    got = list(_losses(labels, 2**32 - 1))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
        assert float(g[1]) == 0.0


def test_uint32_labels_out_of_range_but_not_ignored_are_nan():
    labels = jnp.array([1, 2**32 - 2, 2], jnp.uint32)
    for out in _losses(labels, 2**32 - 1):
        assert np.isnan(float(out[1])) and np.isfinite(float(out[0]))


def test_numpy_uint8_labels_with_a_valid_ignore_index_work():
    labels = np.array([1, 255, 2], np.uint8)
    want = list(_losses(jnp.array([1, -100, 2]), -100))
    for g, w in zip(_losses(labels, 255), want, strict=True):
        np.testing.assert_array_equal(g, w)
