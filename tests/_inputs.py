"""Random test inputs drawn with NumPy and put on the device without compiling anything.

``jax.random`` compiles a program for every new shape (about a quarter of a second each on
the 2-core CPU machine, several hundred in the suite), and ``jnp.asarray`` of a NumPy array
one per shape and dtype; NumPy draws converted on the host and placed with
``jax.device_put`` compile nothing. Each helper takes a seed and returns a ``jax.Array`` of
the requested dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Shape = int | tuple[int, ...]


def device(x: Any, dtype: Any = None) -> jax.Array:
    """``x`` as a ``jax.Array`` of ``dtype`` (default: its own), converted on the host."""
    x = np.asarray(x)
    return jax.device_put(x if dtype is None else x.astype(dtype))


def set_at(x: Any, index: Any, value: Any) -> jax.Array:
    """A copy of ``x`` with ``x[index] = value``, written on the host (``x.at[index].set``
    compiles a scatter for each shape)."""
    out = np.array(x)
    out[index] = value
    return jax.device_put(out)


def normal(seed: int, shape: Shape, dtype: Any = jnp.float32, scale: float = 1.0) -> jax.Array:
    """Standard normal draws times ``scale``."""
    draws = scale * np.random.default_rng(seed).standard_normal(shape)
    return device(draws, dtype)


def uniform(seed: int, shape: Shape, low: float = 0.0, high: float = 1.0,
            dtype: Any = jnp.float32) -> jax.Array:
    """Uniform draws on ``[low, high)``."""
    return device(np.random.default_rng(seed).uniform(low, high, shape), dtype)


def integers(seed: int, shape: Shape, low: int, high: int | None = None,
             dtype: Any = jnp.int32) -> jax.Array:
    """Integer draws on ``[low, high)`` (on ``[0, low)`` when ``high`` is None)."""
    return device(np.random.default_rng(seed).integers(low, high, shape), dtype)


def probabilities(seed: int, shape: Shape, axis: int = -1, dtype: Any = jnp.float32
                  ) -> jax.Array:
    """Rows of a softmax of normal draws along ``axis``: positive, summing to 1."""
    z = np.random.default_rng(seed).standard_normal(shape)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return device(e / e.sum(axis=axis, keepdims=True), dtype)
