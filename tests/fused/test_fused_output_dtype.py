"""The fused losses return the compute dtype (float32 for bf16/f16 inputs) for every
reduction: per-token losses are weighted, ratioed and summed downstream."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import normal

import softmax_jax as sj
from softmax_jax.fused import linear_softmax_cross_entropy, linear_softmax_distillation

_X = normal(0, (6, 8))
_W = normal(1, (8, 11))
_LABELS = jnp.array([1, 0, 10, 3, 3, 7])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_losses_of_narrow_inputs_are_float32(dtype, reduction):
    x, w = _X.astype(dtype), _W.astype(dtype)
    ce, kd = jax.jit(lambda x, w: (
        linear_softmax_cross_entropy(x, w, _LABELS, reduction=reduction),
        linear_softmax_distillation(x, w, x, w, reduction=reduction)))(x, w)
    assert ce.dtype == jnp.float32 and kd.dtype == jnp.float32


def test_fused_per_token_bf16_loss_keeps_float32_digits():
    x, w = _X.astype(jnp.bfloat16), _W.astype(jnp.bfloat16)
    got, g = jax.jit(lambda x: (
        linear_softmax_cross_entropy(x, w, _LABELS, reduction="none"),
        jax.grad(lambda a: linear_softmax_cross_entropy(
            a, w, _LABELS, reduction="none").sum())(x)))(x)
    want = sj.softmax_cross_entropy_with_integer_labels(
        x.astype(jnp.float32) @ w.astype(jnp.float32), _LABELS)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert g.dtype == jnp.bfloat16
