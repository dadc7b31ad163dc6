r"""The plain materialised contrastive formulas (CLIP and SigLIP), differentiated by
``jax.grad``: the references of :func:`softmax_jax.contrastive_loss` and
:func:`softmax_jax.sigmoid_contrastive_loss` in the tests and benchmarks.

As in :mod:`softmax_jax.reference` they build the whole ``N x M`` matrix and take no
masks: a padded batch is compared by slicing it. Each is one ``jax.jit`` program, with
``reduction`` and ``bidirectional`` static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from softmax_jax.reference import logsumexp


def _reduce(per: jax.Array, reduction: str) -> jax.Array:
    if reduction == "none":
        return per
    return jnp.sum(per) if reduction == "sum" else jnp.mean(per)


@functools.partial(jax.jit, static_argnames=("bidirectional", "reduction"))
def clip_loss(x: jax.Array, y: jax.Array, logit_scale=1.0, labels: jax.Array | None = None,
              bidirectional: bool = True, reduction: str = "mean") -> jax.Array:
    r""":math:`z = s\,x y^\top`; per row :math:`\mathrm{lse}_j z_{ij} - z_{i\ell_i}`, and with
    ``bidirectional`` the mean of it and the column term :math:`\mathrm{lse}_i z_{ij} - z_{jj}`."""
    z = logit_scale * x @ y.T
    n = x.shape[0]
    rows = jnp.arange(n)
    lab = rows if labels is None else labels
    per = logsumexp(z, axis=1) - z[rows, lab]
    if bidirectional:
        per = 0.5 * (per + logsumexp(z, axis=0) - z[rows, rows])
    return _reduce(per, reduction)


@functools.partial(jax.jit, static_argnames="reduction")
def sigmoid_contrastive_loss(x: jax.Array, y: jax.Array, logit_scale=1.0, logit_bias=0.0,
                             reduction: str = "mean") -> jax.Array:
    r""":math:`\mathrm{nll}_i = \sum_j \log(1 + e^{-t_{ij} z_{ij}})`, :math:`t = 2I - 1`,
    :math:`z = s\,x y^\top + b`; ``"mean"`` is the total over :math:`N`."""
    z = logit_scale * x @ y.T + logit_bias
    t = 2.0 * jnp.eye(x.shape[0], dtype=z.dtype) - 1.0
    # log(1 + e^u) written as max(u, 0) + log(1 + e^-|u|): the plain form overflows at the
    # large logits the tests use.
    u = -t * z
    per = jnp.sum(jnp.maximum(u, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(u))), axis=1)
    if reduction == "mean":
        return jnp.sum(per) / x.shape[0]
    return _reduce(per, reduction)
