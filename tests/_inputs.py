"""Random test inputs drawn with NumPy.

``jax.random`` compiles a program for every new shape (about a quarter of a second each on
the 2-core CPU machine, several hundred in the suite); NumPy draws cost nothing to compile.
Each helper takes a seed and returns a ``jax.Array`` of the requested dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Shape = int | tuple[int, ...]


def normal(seed: int, shape: Shape, dtype: Any = jnp.float32, scale: float = 1.0) -> jax.Array:
    """Standard normal draws times ``scale``."""
    draws = scale * np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(draws, dtype=dtype)


def uniform(seed: int, shape: Shape, low: float = 0.0, high: float = 1.0,
            dtype: Any = jnp.float32) -> jax.Array:
    """Uniform draws on ``[low, high)``."""
    return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape), dtype=dtype)


def integers(seed: int, shape: Shape, low: int, high: int | None = None,
             dtype: Any = jnp.int32) -> jax.Array:
    """Integer draws on ``[low, high)`` (on ``[0, low)`` when ``high`` is None)."""
    return jnp.asarray(np.random.default_rng(seed).integers(low, high, shape), dtype=dtype)


def probabilities(seed: int, shape: Shape, axis: int = -1, dtype: Any = jnp.float32
                  ) -> jax.Array:
    """Rows of a softmax of normal draws along ``axis``: positive, summing to 1."""
    z = np.random.default_rng(seed).standard_normal(shape)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return jnp.asarray(e / e.sum(axis=axis, keepdims=True), dtype=dtype)
