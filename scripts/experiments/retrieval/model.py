r"""The two towers and the contrastive objective.

Each tower maps a padded row of token ids to a unit vector:

.. math::
    e = \frac{1}{L}\sum_{l < L} E_{t_l}, \qquad
    h = \mathrm{gelu}(e W_1 + b_1), \qquad
    u = \frac{e + h W_2 + b_2}{\lVert e + h W_2 + b_2 \rVert}

(mean pooling over the ``L`` real tokens, then a one-hidden-layer MLP added to its input and
L2 normalisation). The query tower reads docstrings and the code tower reads functions. They
share the token embeddings :math:`E` but not the MLPs: the sub-words of a docstring and of the
code it describes are the same words (``count``, ``path``), and with one table a word learned
on one side is known on the other. With the residual, an untrained model already scores pairs
by their shared words, and the MLPs learn what differs between the two sides. On the
standard library both choices matter: with two tables and a plain MLP, held-out recall@1 at
batch 256 is about a third of what it is with them.

The similarity of query :math:`i` and code :math:`j` is :math:`z_{ij} = s\, u_i \cdot v_j`
(:math:`+\, b` for SigLIP), with a learned temperature: CLIP learns :math:`t` with
:math:`s = \min(e^t, 100)`, starting at :math:`s = 1/0.07`, and SigLIP learns :math:`t` and
:math:`b` with :math:`s = e^t`, starting at :math:`s = 10`, :math:`b = -10` (the papers'
initialisations). The losses are :func:`softmax_jax.contrastive_loss` and
:func:`softmax_jax.sigmoid_contrastive_loss`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

import softmax_jax as sj
from experiments.retrieval.config import RetrievalConfig

__all__ = ["Params", "batch_loss", "embed", "init_params", "logit_params"]

Params = dict[str, Any]

#: CLIP clips its learned scale here so that the logits cannot run away.
MAX_CLIP_SCALE = 100.0


def _init_mlp(key: jax.Array, cfg: RetrievalConfig) -> Params:
    e, h = cfg.embed_dim, cfg.hidden
    return {
        "w1": jax.random.normal(key, (e, h)) * math.sqrt(2.0 / e),
        "b1": jnp.zeros((h,)),
        # Zero: each tower starts as the identity on the pooled embedding (see the module doc).
        "w2": jnp.zeros((h, e)),
        "b2": jnp.zeros((e,)),
    }


def init_params(key: jax.Array, cfg: RetrievalConfig, vocab_size: int) -> Params:
    """The shared embeddings, both towers' MLPs and the temperature (and bias) at the papers'
    starting values."""
    k_embed, k_query, k_code = jax.random.split(key, 3)
    # float32, not weakly typed: Adam's first update would otherwise change the parameters'
    # type and compile the step again.
    if cfg.loss == "clip":
        logit = {"log_scale": jnp.asarray(math.log(1 / 0.07), jnp.float32)}
    else:
        logit = {"log_scale": jnp.asarray(math.log(10.0), jnp.float32),
                 "bias": jnp.asarray(-10.0, jnp.float32)}
    return {
        "embed": jax.random.normal(k_embed, (vocab_size, cfg.embed_dim)) / math.sqrt(cfg.embed_dim),
        "query": _init_mlp(k_query, cfg),
        "code": _init_mlp(k_code, cfg),
        "logit": logit,
    }


def embed(params: Params, side: str, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """Unit vectors ``[n, embed_dim]`` of padded token rows ``[n, L]`` with true ``lengths``,
    through the ``side`` (``"query"`` or ``"code"``) tower."""
    mask = jnp.arange(tokens.shape[1]) < lengths[:, None]
    vectors = jnp.take(params["embed"], tokens, axis=0)
    # An empty row (batch padding) pools to 0 rather than 0/0.
    pooled = jnp.where(mask[..., None], vectors, 0.0).sum(1) / jnp.maximum(lengths, 1)[:, None]
    mlp = params[side]
    out = pooled + jax.nn.gelu(pooled @ mlp["w1"] + mlp["b1"]) @ mlp["w2"] + mlp["b2"]
    # The floor keeps the norm's gradient finite for an all-zero output.
    return out * jax.lax.rsqrt(jnp.maximum(jnp.sum(out * out, -1, keepdims=True), 1e-12))


def logit_params(params: Params, loss: str) -> tuple[jax.Array, jax.Array]:
    """``(scale, bias)`` of the similarity logits; the bias is 0 for CLIP."""
    log_scale = params["logit"]["log_scale"]
    if loss == "clip":
        return jnp.minimum(jnp.exp(log_scale), MAX_CLIP_SCALE), jnp.zeros(())
    return jnp.exp(log_scale), params["logit"]["bias"]


def batch_loss(
    params: Params,
    query_tokens: jax.Array,
    query_lengths: jax.Array,
    code_tokens: jax.Array,
    code_lengths: jax.Array,
    where: jax.Array,
    *,
    loss: str,
    axis_name: str | None = None,
) -> jax.Array:
    """The contrastive loss of one batch of (query, code) pairs, positives on the diagonal.

    ``where`` marks the real pairs (the rest pad the batch to a multiple of the devices).
    With ``axis_name``, call inside :func:`jax.shard_map` with the batch sharded along that
    axis: the result is the whole batch's loss, replicated.
    """
    u = embed(params, "query", query_tokens, query_lengths)
    v = embed(params, "code", code_tokens, code_lengths)
    scale, bias = logit_params(params, loss)
    if loss == "clip":
        return sj.contrastive_loss(u, v, logit_scale=scale, where=where, axis_name=axis_name)
    return sj.sigmoid_contrastive_loss(u, v, logit_scale=scale, logit_bias=bias, where=where,
                                       axis_name=axis_name)
