r"""The network itself: Nielsen's initialisation and feedforward (``network2.Network``).

Sigmoid hidden layers and a linear read-out :math:`z`; the output activation is left to the
cost (:mod:`.costs`), because the softmax and the sigmoid outputs share the same :math:`z`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import softmax_jax as sj

__all__ = ["Params", "forward", "init_params"]

#: Network parameters: one ``{"w": [n_in, n_out], "b": [n_out]}`` dict per layer.
Params = list[dict[str, jax.Array]]


def init_params(key: jax.Array, sizes: tuple[int, ...] | list[int]) -> Params:
    r"""Nielsen's default initialisation: :math:`w \sim \mathcal N(0, 1/n_{in})`,
    :math:`b \sim \mathcal N(0, 1)`.

    Scaling the weights by :math:`1/\sqrt{n_{in}}` keeps each hidden :math:`z` of order 1, so
    the sigmoid units start out unsaturated (the weight-initialisation section of the notes).

    All values come from one normal draw carved into the layers: each ``jax.random.normal``
    call of a new shape compiles its own threefry program (most of a second on a small CPU),
    so one draw keeps start-up fast.

    Args:
      key: a PRNG key.
      sizes: layer widths from input to output, e.g. ``(64, 30, 10)``.
    """
    layers = list(zip(sizes[:-1], sizes[1:], strict=True))
    total = sum(n_in * n_out + n_out for n_in, n_out in layers)
    flat = jax.random.normal(key, (total,), jnp.float32)
    params: Params = []
    offset = 0
    for n_in, n_out in layers:
        w = flat[offset : offset + n_in * n_out].reshape(n_in, n_out)
        offset += n_in * n_out
        b = flat[offset : offset + n_out]
        offset += n_out
        params.append({"w": w / jnp.sqrt(jnp.float32(n_in)), "b": b})
    return params


def forward(params: Params, x: jax.Array) -> jax.Array:
    """The output layer's weighted input ``z`` (logits) for a batch ``x [n, features]``.

    Hidden layers use :func:`softmax_jax.sigmoid`; the output activation belongs to the cost.
    """
    h = x
    for layer in params[:-1]:
        h = sj.sigmoid(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]
