"""Inputs shared by the core tests: random logits with integer and dense labels, class
weights, and a value-and-gradients helper with unequal cotangents."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ROWS, CLASSES = 7, 5


WEIGHTS = np.array([1.0, 2.0, 0.5, 0.0, 3.0])


def numpy_data(seed=0, n=ROWS, v=CLASSES, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logits = (3.0 * rng.standard_normal((n, v))).astype(dtype)
    labels = rng.integers(0, v, n)
    soft = rng.dirichlet(np.ones(v), n).astype(dtype)
    return logits, labels, soft


N, V = 6, 11


def data(dtype=jnp.float32, seed=0, n=N, v=V, scale=3.0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    logits = (scale * jax.random.normal(k1, (n, v))).astype(dtype)
    labels = jax.random.randint(k2, (n,), 0, v)
    soft = jax.nn.softmax(jax.random.normal(k3, (n, v))).astype(dtype)
    return logits, labels, soft


def value_and_grads(fn, *args, argnums=(0,)):
    value = fn(*args)
    grads = jax.grad(lambda *a: (fn(*a) * jnp.arange(1.0, 1.0 + value.size).reshape(
        value.shape)).sum(), argnums=argnums)(*args)
    return value, grads


OPTIONS = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.25, 0.3)]


def random_logits(n, k, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, k), jnp.float32) * 2.0
