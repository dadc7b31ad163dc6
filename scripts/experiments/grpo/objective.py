r"""The GRPO objective on the policy's per-token log-probabilities and entropies.

For a group of :math:`G` completions of one prompt with rewards :math:`R_g`, the advantage
of every token of completion :math:`g` is :math:`A_g = (R_g - \mathrm{mean}(R)) /
(\mathrm{std}(R) + 10^{-6})`. With :math:`\rho = e^{\log\pi - \log\pi_{old}}` and the k3
estimator of :math:`\mathrm{KL}(\pi \| \pi_{ref})`, :math:`k_3 = e^{d} - d - 1`,
:math:`d = \log\pi_{ref} - \log\pi`, the loss is the token mean of

.. math::
    -\min(\rho A, \mathrm{clip}(\rho, 1 - \epsilon, 1 + \epsilon) A) + \beta k_3 - \gamma H .

:func:`grpo_loss` takes every :math:`\log\pi` and :math:`H` from
:func:`softmax_jax.linear_log_probs`; :func:`materialised_grpo_loss` is the same loss on the
full ``[tokens, vocab]`` logits (``log_softmax``, a gather and the entropy), to compare
their compiled memory.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import softmax_jax as sj
from experiments.lm.model import Params, features

__all__ = ["Batch", "Weights", "group_advantages", "grpo_loss", "loss_from_log_probs",
           "materialised_grpo_loss", "policy_log_probs"]


class Batch(NamedTuple):
    """One batch of sampled completions, ``[B, T]`` per token (``B`` = prompts x group)."""

    contexts: jax.Array  # [B, T, context] int
    tokens: jax.Array  # [B, T] the sampled tokens
    mask: jax.Array  # [B, T] the tokens that count
    old_logp: jax.Array  # [B, T] log pi_old at sampling time
    ref_logp: jax.Array  # [B, T] log pi_ref of the frozen reference
    advantages: jax.Array  # [B]


class Weights(NamedTuple):
    """The clip :math:`\\epsilon`, the KL weight :math:`\\beta`, the entropy bonus
    :math:`\\gamma`."""

    clip: float = 0.2
    kl: float = 0.04
    entropy: float = 0.01


DEFAULT_WEIGHTS = Weights()


def group_advantages(rewards: jax.Array, group: int) -> jax.Array:
    """``[P * group]`` rewards normalised within each group of ``group`` consecutive
    completions (one prompt's)."""
    r = rewards.reshape(-1, group)
    adv = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, keepdims=True) + 1e-6)
    return adv.reshape(-1)


def _hidden(params: Params, contexts: jax.Array) -> jax.Array:
    b, t, c = contexts.shape
    return features(params, contexts.reshape(b * t, c)).reshape(b, t, -1)


def policy_log_probs(params: Params, contexts: jax.Array, tokens: jax.Array,
                     where: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(logp, entropy)`` of ``tokens`` under the policy, ``[B, T]``, from the fused head."""
    return sj.linear_log_probs(_hidden(params, contexts), params["head_w"], tokens,
                               params["head_b"], where=where, return_entropy=True)


def loss_from_log_probs(logp: jax.Array, ent: jax.Array, batch: Batch,
                        weights: Weights) -> tuple[jax.Array, dict[str, Any]]:
    """The GRPO loss of per-token ``logp`` and ``ent`` (``[B, T]``) and its ``kl`` and
    ``entropy`` (token means)."""
    ratio = jnp.exp(logp - batch.old_logp)
    adv = batch.advantages[:, None]
    surrogate = jnp.minimum(ratio * adv,
                            jnp.clip(ratio, 1.0 - weights.clip, 1.0 + weights.clip) * adv)
    d = batch.ref_logp - logp
    k3 = jnp.exp(d) - d - 1.0
    per_token = -surrogate + weights.kl * k3 - weights.entropy * ent
    count = jnp.maximum(jnp.sum(batch.mask), 1)

    def mean(a):
        return jnp.sum(jnp.where(batch.mask, a, 0.0)) / count

    return mean(per_token), {"kl": mean(k3), "entropy": mean(ent)}


def grpo_loss(params: Params, batch: Batch, weights: Weights = DEFAULT_WEIGHTS):
    """``(loss, {"kl", "entropy"})`` with the fused log-probabilities."""
    logp, ent = policy_log_probs(params, batch.contexts, batch.tokens, batch.mask)
    return loss_from_log_probs(logp, ent, batch, weights)


def materialised_grpo_loss(params: Params, batch: Batch, weights: Weights = DEFAULT_WEIGHTS):
    """The same loss on the materialised logits: ``log_softmax``, a gather, the entropy."""
    z = _hidden(params, batch.contexts) @ params["head_w"] + params["head_b"]
    log_p = jax.nn.log_softmax(z)
    logp = jnp.take_along_axis(log_p, batch.tokens[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    return loss_from_log_probs(logp, ent, batch, weights)
