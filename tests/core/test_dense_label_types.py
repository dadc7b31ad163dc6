"""Integer and boolean labels of the dense cross-entropy must be one-hot along the class
axes; class indices (``(N,)``, ``(N, 1)``) are refused with a pointer to the integer loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_jax as sj

_Z = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
_IDX = jnp.array([1, 2, 0])


@pytest.mark.parametrize("labels", [_IDX, _IDX[:, None], _IDX[:, None].astype(bool)])
def test_dense_loss_refuses_class_indices(labels):
    with pytest.raises(ValueError, match="softmax_cross_entropy_with_integer_labels"):
        sj.softmax_cross_entropy(_Z, labels)


def test_dense_loss_refuses_class_indices_along_another_axis():
    with pytest.raises(ValueError, match="softmax_cross_entropy_with_integer_labels"):
        sj.softmax_cross_entropy(_Z.T, _IDX[None, :], axis=0)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_])
def test_dense_loss_accepts_one_hot_labels_of_the_logits_shape(dtype):
    want = sj.softmax_cross_entropy_with_integer_labels(_Z, _IDX)
    one_hot = jax.nn.one_hot(_IDX, 4).astype(dtype)
    np.testing.assert_allclose(sj.softmax_cross_entropy(_Z, one_hot), want, rtol=1e-6)
    row = (jnp.arange(4) == 2)[None, :].astype(dtype)  # one row for every example
    np.testing.assert_allclose(sj.softmax_cross_entropy(_Z, row),
                               sj.softmax_cross_entropy_with_integer_labels(_Z, jnp.full(3, 2)),
                               rtol=1e-6)
