"""The notes' formulas that no other test pins down, each checked through the library.

docs/derivations.md cites these tests by name next to the formula each one checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_jax as sj
from softmax_jax import reference as ref


def test_output_layer_gradients_are_the_notes_rules(x64):
    # z_j = sum_k w_jk a_k^{L-1} + b_j, softmax output, log-likelihood cost:
    # dC/db_j = a_j - y_j and dC/dw_jk = a_k^{L-1} (a_j - y_j).
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    w = jax.random.normal(k1, (4, 5), jnp.float64)  # w[j, k]: output j, input k
    b = jax.random.normal(k2, (4,), jnp.float64)
    a_prev = jax.random.uniform(k3, (5,), jnp.float64)
    y = jnp.array([0.0, 0.0, 1.0, 0.0])

    def cost(w, b):
        return sj.log_likelihood(sj.softmax(w @ a_prev + b), y)

    def cost_from_logits(w, b):
        return sj.softmax_cross_entropy_with_integer_labels(w @ a_prev + b, 2)

    a = np.asarray(ref.softmax(w @ a_prev + b))
    delta = a - np.asarray(y)
    for fn in (cost, cost_from_logits):
        dw, db = jax.grad(fn, argnums=(0, 1))(w, b)
        np.testing.assert_allclose(db, delta, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(dw, np.outer(delta, a_prev), rtol=1e-12, atol=1e-15)


def test_unnormalised_targets_give_sum_y_times_a_minus_y(x64):
    # The notes' last step uses sum_k y_k = 1; in general dC/dz = (sum_k y_k) a - y.
    z = jnp.array([2.0, 3.0, 4.0])
    y = jnp.array([0.5, 1.0, 0.0])
    g = jax.grad(sj.softmax_cross_entropy)(z, y)
    a = np.asarray(ref.softmax(z))
    np.testing.assert_allclose(g, 1.5 * a - np.asarray(y), rtol=1e-12)
    np.testing.assert_allclose(g, jax.grad(ref.softmax_cross_entropy)(z, y), rtol=1e-12)
    assert not np.allclose(g, a - np.asarray(y))


def _neuron_grads(cost: str, w: float, b: float, x: float = 1.0, y: float = 0.0):
    def c(w, b):
        z = w * x + b
        if cost == "quadratic":
            return sj.quadratic_cost(sj.sigmoid(z)[None], jnp.array([y]))
        return sj.sigmoid_binary_cross_entropy(z, jnp.asarray(y))

    return jax.grad(c, argnums=(0, 1))(jnp.asarray(w), jnp.asarray(b))


@pytest.mark.parametrize("w,b,x", [(0.6, 0.9, 1.0), (2.0, 2.0, 1.0), (-1.5, 0.3, 2.5)])
def test_quadratic_cost_behind_a_sigmoid_has_the_sigma_prime_factor(x64, w, b, x):
    # dC/dw = (a - y) sigma'(z) x and dC/db = (a - y) sigma'(z), with y = 0.
    z = w * x + b
    a = 1.0 / (1.0 + np.exp(-z))
    dw, db = _neuron_grads("quadratic", w, b, x)
    np.testing.assert_allclose(db, a * a * (1 - a), rtol=1e-12)
    np.testing.assert_allclose(dw, a * a * (1 - a) * x, rtol=1e-12)


@pytest.mark.parametrize("w,b,x", [(0.6, 0.9, 1.0), (2.0, 2.0, 1.0), (-1.5, 0.3, 2.5)])
def test_binary_cross_entropy_weight_gradient_is_x_times_error(x64, w, b, x):
    # dC/dw = x (sigma(z) - y), dC/db = sigma(z) - y: no sigma'(z) factor.
    a = 1.0 / (1.0 + np.exp(-(w * x + b)))
    dw, db = _neuron_grads("cross_entropy", w, b, x)
    np.testing.assert_allclose(db, a, rtol=1e-12)
    np.testing.assert_allclose(dw, x * a, rtol=1e-12)


def test_learning_slowdown_numbers():
    # Nielsen's neuron, x = 1, y = 0. The worse start (output 0.98) gets a seven times
    # smaller quadratic-cost gradient than the better one (0.82); the cross-entropy
    # gradient is the error itself, so the worse start gets the larger one.
    good = [float(g) for g in _neuron_grads("quadratic", 0.6, 0.9)]
    bad = [float(g) for g in _neuron_grads("quadratic", 2.0, 2.0)]
    assert f"{good[1]:.4f}" == "0.1219" and f"{bad[1]:.5f}" == "0.01735"
    assert good[1] / bad[1] > 7.0
    good_ce = float(_neuron_grads("cross_entropy", 0.6, 0.9)[1])
    bad_ce = float(_neuron_grads("cross_entropy", 2.0, 2.0)[1])
    assert f"{good_ce:.4f}" == "0.8176" and f"{bad_ce:.4f}" == "0.9820"


def test_max_shift_changes_nothing():
    z = jnp.array([2.0, 3.0, 4.0])
    cot = jnp.array([0.3, -1.0, 2.0])
    a, pull = jax.vjp(sj.softmax, z)
    for c in (-50.0, 998.0, 1e4):
        a_c, pull_c = jax.vjp(sj.softmax, z + c)
        np.testing.assert_allclose(a_c, a, rtol=1e-5)
        np.testing.assert_allclose(pull_c(cot)[0], pull(cot)[0], rtol=1e-5, atol=1e-6)
    # Unshifted, the exponentials overflow; shifted, [1000, 1001, 1002] is the worked example.
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(np.float32([1000.0, 1001.0, 1002.0]))
        assert np.all(np.isnan(e / e.sum()))
    assert [f"{v:.4f}" for v in np.asarray(sj.softmax(z + 998.0))] == ["0.0900", "0.2447", "0.6652"]
    # Every row of the Jacobian sums to zero: moving all logits together changes nothing.
    np.testing.assert_allclose(jax.jacrev(sj.softmax)(z).sum(axis=1), 0.0, atol=1e-7)


def test_a_gradient_step_needs_a_learning_rate(x64):
    # a - y is the gradient. A step z <- z - eta (a - y) lowers the loss by about
    # eta |a - y|^2 for small eta; eta = 1, the notes' "z_i = z_i - (a_i - y_i)", is one
    # particular (large) step, not the rule itself.
    z = jnp.array([2.0, 3.0, 4.0])

    def loss(z):
        return sj.softmax_cross_entropy_with_integer_labels(z, 1)

    g = jax.grad(loss)(z)
    for eta in (1.0, 0.1, 1e-4):
        assert loss(z - eta * g) < loss(z)
    eta = 1e-4
    np.testing.assert_allclose((loss(z) - loss(z - eta * g)) / eta, g @ g, rtol=1e-3)
    assert f"{float(loss(z - g)):.4f}" == "0.5959"
