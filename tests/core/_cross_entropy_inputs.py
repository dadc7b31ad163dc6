"""Inputs shared by the core tests: random logits with integer and dense labels, class
weights, and a value-and-gradients helper with unequal cotangents.

The draws are NumPy's, put on the device with ``jax.device_put``: nothing here compiles a
program (``jax.random`` compiles one per shape, and ``jnp.asarray`` one per shape and dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from _inputs import device

ROWS, CLASSES = 7, 5


WEIGHTS = np.array([1.0, 2.0, 0.5, 0.0, 3.0])


def numpy_data(seed=0, n=ROWS, v=CLASSES, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logits = (3.0 * rng.standard_normal((n, v))).astype(dtype)
    labels = rng.integers(0, v, n)
    soft = rng.dirichlet(np.ones(v), n).astype(dtype)
    return logits, labels, soft


N, V = 6, 11


def np_softmax_rows(z):
    """The softmax of each row of a NumPy array, in NumPy (a positive row summing to 1)."""
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def data(dtype=jnp.float32, seed=0, n=N, v=V, scale=3.0):
    """Logits ``scale * N(0, 1)`` of shape ``(n, v)``, integer labels, and dense labels (the
    softmax of other normal draws), logits and dense labels of ``dtype``."""
    rng = np.random.default_rng(seed)
    logits = device(scale * rng.standard_normal((n, v)), dtype)
    labels = device(rng.integers(0, v, n), np.int32)
    soft = device(np_softmax_rows(rng.standard_normal((n, v))), dtype)
    return logits, labels, soft


def value_and_grads(fn, *args, argnums=(0,)):
    value = fn(*args)
    grads = jax.grad(lambda *a: (fn(*a) * jnp.arange(1.0, 1.0 + value.size).reshape(
        value.shape)).sum(), argnums=argnums)(*args)
    return value, grads


OPTIONS = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.25, 0.3)]


def normal(seed, shape, scale=1.0, dtype=np.float32):
    """``scale * N(0, 1)`` draws of ``shape`` and ``dtype``."""
    return device(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def uniform(seed, shape, low=0.0, high=1.0, dtype=np.float32):
    """Uniform draws on ``[low, high)``."""
    return device(np.random.default_rng(seed).uniform(low, high, shape), dtype)


def random_logits(n, k, seed=0):
    """``2 N(0, 1)`` float32 logits of shape ``(n, k)``."""
    return device(2.0 * np.random.default_rng(seed).standard_normal((n, k)), np.float32)
