"""``log_likelihood``, ``sigmoid_binary_cross_entropy`` and ``quadratic_cost`` against the
plain formulas and optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cross_entropy_inputs import N, V, data, value_and_grads

import softmax_jax as sj
from softmax_jax import reference as ref


@pytest.mark.parametrize(
    "fn,ref_fn,make",
    [
        (sj.log_likelihood, ref.log_likelihood,
         lambda k: (jax.nn.softmax(jax.random.normal(k, (N, V), jnp.float64)),
                    jax.nn.softmax(2 * jax.random.normal(k, (N, V), jnp.float64)))),
        (sj.sigmoid_binary_cross_entropy, ref.sigmoid_binary_cross_entropy,
         lambda k: (5 * jax.random.normal(k, (N, V), jnp.float64),
                    jax.random.uniform(k, (N, V), jnp.float64))),
        (sj.quadratic_cost, ref.quadratic_cost,
         lambda k: (jax.random.uniform(k, (N, V), jnp.float64),
                    jax.random.uniform(jax.random.split(k)[0], (N, V), jnp.float64))),
    ],
    ids=["log_likelihood", "sigmoid_bce", "quadratic"],
)
def test_other_losses_match_reference_float64(x64, fn, ref_fn, make):
    args = make(jax.random.PRNGKey(3))
    v1, g1 = value_and_grads(fn, *args, argnums=(0, 1))
    v2, g2 = value_and_grads(ref_fn, *args, argnums=(0, 1))
    np.testing.assert_allclose(v1, v2, rtol=1e-12, atol=1e-14)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_sigmoid_bce_takes_integer_labels_and_broadcast_labels_like_optax():
    logits, _, soft = data(seed=22)
    binary = (soft > soft.mean()).astype(jnp.int32)
    for labels in (binary, binary.astype(bool), binary.astype(jnp.uint8)):
        np.testing.assert_allclose(sj.sigmoid_binary_cross_entropy(logits, labels),
                                   optax.sigmoid_binary_cross_entropy(logits, labels),
                                   rtol=1e-6, atol=1e-7)
    row = soft[0]  # one target vector for every example
    got = sj.sigmoid_binary_cross_entropy(logits, row)
    np.testing.assert_allclose(got, optax.sigmoid_binary_cross_entropy(logits, row),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, sj.sigmoid_binary_cross_entropy(
        logits, jnp.broadcast_to(row, logits.shape)), rtol=0, atol=0)
    # the broadcast labels' gradient is summed back to their shape: -sum_n g z
    gz, gy = jax.grad(lambda z, y: sj.sigmoid_binary_cross_entropy(z, y).sum(),
                      argnums=(0, 1))(logits, row)
    np.testing.assert_allclose(gy, -logits.sum(0), rtol=1e-5)
    np.testing.assert_allclose(gz, jax.nn.sigmoid(logits) - row, rtol=1e-5, atol=1e-7)


def test_log_likelihood_reverse_over_reverse_has_no_nan(x64):
    probs, labels = jnp.array([0.0, 1.0]), jnp.array([0.0, 1.0])
    hess = jax.jacrev(jax.grad(sj.log_likelihood))(probs, labels)
    np.testing.assert_array_equal(hess, jax.hessian(sj.log_likelihood)(probs, labels))
    np.testing.assert_array_equal(hess, [[0.0, 0.0], [0.0, 1.0]])  # y / a^2 on the diagonal


def test_log_likelihood_points_integer_labels_to_the_integer_loss():
    with pytest.raises(TypeError, match="softmax_cross_entropy_with_integer_labels"):
        sj.log_likelihood(jnp.full((2, 3), 1 / 3), jnp.array([0, 2]))
