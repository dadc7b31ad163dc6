"""A soft cap far above the logits changes nothing: ``cap * tanh(z / cap)`` is ``z`` where
``z / cap`` is too small to matter, even when it would underflow to a subnormal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import normal

import softmax_jax as sj
from softmax_jax.fused import linear_softmax_cross_entropy

_X = normal(0, (6, 5))
_W = normal(1, (5, 9))
_LABELS = jnp.array([1, 0, 8, 3, 3, 7])


@pytest.mark.parametrize("cap", [1e30, 1e38, 3e38, float(np.finfo(np.float32).max)])
def test_huge_soft_cap_gives_the_uncapped_loss_and_gradients(cap):
    def capped(x, w):
        return linear_softmax_cross_entropy(x, w, _LABELS, soft_cap=cap, reduction="none")

    def plain(x, w):
        return sj.softmax_cross_entropy_with_integer_labels(x @ w, _LABELS)

    np.testing.assert_allclose(capped(_X, _W), plain(_X, _W), rtol=1e-6)
    got = jax.grad(lambda x, w: capped(x, w).sum(), (0, 1))(_X, _W)
    want = jax.grad(lambda x, w: plain(x, w).sum(), (0, 1))(_X, _W)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)
    d_cap = jax.grad(lambda c: linear_softmax_cross_entropy(_X, _W, _LABELS, soft_cap=c))(
        jnp.float32(cap))
    assert float(d_cap) == 0.0


@pytest.mark.parametrize("cap", [0.5, 30.0])
def test_soft_cap_matches_the_capped_formula(cap):
    z = _X @ _W
    want = sj.softmax_cross_entropy_with_integer_labels(cap * jnp.tanh(z / cap), _LABELS)
    got = linear_softmax_cross_entropy(_X, _W, _LABELS, soft_cap=cap, reduction="none")
    np.testing.assert_allclose(got, want, rtol=1e-6)
