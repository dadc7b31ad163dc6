r"""The output costs and Nielsen's L2 term (``network2.QuadraticCost``, ``CrossEntropyCost``).

``network2.py`` gives each cost a ``fn`` (the value) and a ``delta`` (the output error
:math:`\partial C/\partial z`, written by hand). Here only the value is written; the
``delta`` is the ``custom_vjp`` rule of the library function, reached by ``jax.grad``:

* ``softmax_ce``: :math:`\partial C/\partial z = a - y`;
* ``sigmoid_ce``: :math:`\partial C/\partial z = a - y`;
* ``quadratic``: :math:`\partial C/\partial z = (a - y)\,\sigma'(z)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import softmax_jax as sj
from experiments.mlp.config import COSTS
from experiments.mlp.model import Params

__all__ = ["l2_penalty", "per_example_cost"]


def per_example_cost(cost: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cost of output-layer ``logits [n, classes]`` against integer ``labels [n]``.

    See the module docstring for the three costs and their gradients.
    """
    if cost == "softmax_ce":
        return sj.softmax_cross_entropy_with_integer_labels(logits, labels)
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if cost == "sigmoid_ce":
        return jnp.sum(sj.sigmoid_binary_cross_entropy(logits, one_hot), axis=-1)
    if cost == "quadratic":
        return sj.quadratic_cost(sj.sigmoid(logits), one_hot)
    raise ValueError(f"cost must be one of {', '.join(COSTS)}; got {cost!r}")


def l2_penalty(params: Params, l2: float, n_train: int) -> jax.Array:
    r"""Nielsen's :math:`\frac{\lambda}{2n}\sum w^2`, over the weights only (biases are free)."""
    if l2 == 0:
        return jnp.zeros((), jnp.float32)  # keep the squares out of the compiled step
    total = sum(jnp.sum(jnp.square(layer["w"])) for layer in params)
    return (0.5 * l2 / n_train) * jnp.asarray(total)
