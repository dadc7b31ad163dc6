"""``softmax_cross_entropy`` with dense labels alone: the float64 reference, class weights
against PyTorch and labels that broadcast, as in optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from _cross_entropy_inputs import (
    OPTIONS,
    WEIGHTS,
    data,
    numpy_data,
    random_logits,
    value_and_grads,
)

import softmax_jax as sj
from softmax_jax import reference as ref


@pytest.mark.parametrize("eps,lam", OPTIONS)
def test_dense_ce_matches_reference_float64(x64, eps, lam):
    logits, _, soft = data(jnp.float64)
    f = lambda z, y: sj.softmax_cross_entropy(z, y, label_smoothing=eps, z_loss=lam)  # noqa: E731
    r = lambda z, y: ref.softmax_cross_entropy(z, y, label_smoothing=eps, z_loss=lam)  # noqa: E731
    v1, g1 = value_and_grads(f, logits, soft, argnums=(0, 1))
    v2, g2 = value_and_grads(r, logits, soft, argnums=(0, 1))
    np.testing.assert_allclose(v1, v2, rtol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dense_class_weights_match_pytorch(eps):
    logits, _, soft = numpy_data(seed=1)
    zt = torch.tensor(logits, requires_grad=True)
    yt = torch.tensor(soft, requires_grad=True)
    want = torch.nn.functional.cross_entropy(
        zt, yt, weight=torch.tensor(WEIGHTS, dtype=torch.float32), label_smoothing=eps,
        reduction="none")
    want.sum().backward()
    f = lambda z, y: sj.softmax_cross_entropy(  # noqa: E731
        z, y, label_smoothing=eps, class_weights=WEIGHTS)
    np.testing.assert_allclose(f(logits, soft), want.detach().numpy(), rtol=1e-5, atol=1e-6)
    gz, gy = jax.grad(lambda z, y: f(z, y).sum(), argnums=(0, 1))(logits, soft)
    np.testing.assert_allclose(gz, zt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gy, yt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_dense_labels_broadcast_and_integer_one_hot_match_optax():
    z = random_logits(4, 5)
    y = jax.nn.softmax(jnp.arange(5.0))
    np.testing.assert_allclose(sj.softmax_cross_entropy(z, y),
                               optax.softmax_cross_entropy(z, y), rtol=1e-6)
    g = jax.grad(lambda z, y: sj.softmax_cross_entropy(z, y).sum(), (0, 1))(z, y)
    g_ref = jax.grad(lambda z, y: optax.softmax_cross_entropy(z, y).sum(), (0, 1))(z, y)
    assert g[1].shape == (5,)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    onehot = jnp.eye(5, dtype=jnp.int32)[jnp.array([0, 3, 1, 4])]
    np.testing.assert_allclose(sj.softmax_cross_entropy(z, onehot),
                               optax.softmax_cross_entropy(z, onehot), rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda z: sj.softmax_cross_entropy(z, onehot).sum())(z),
        jax.grad(lambda z: optax.softmax_cross_entropy(z, onehot).sum())(z), rtol=1e-6,
        atol=1e-7)
    with pytest.raises(ValueError, match="softmax_cross_entropy_with_integer_labels"):
        sj.softmax_cross_entropy(z, jnp.array([0, 3, 1, 4]))  # class indices
