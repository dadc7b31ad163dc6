"""The per-token statistics of the fused cross-entropy (``return_stats``): the log-sum-exp
is differentiable, so a loss built on it (``z_y - stats.lse``, the selective log-softmax)
has its true gradient, in every reduction and both block layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import reference as ref
from softmax_jax.fused import linear_softmax_cross_entropy

N, D, V = 11, 5, 23
LAYOUTS = {"held": {}, "tiles": {"token_block": 4, "vocab_block": 8}}


def _inputs(dtype=jnp.float64):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(N, D)), dtype)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.7, dtype)
    b = jnp.asarray(rng.normal(size=(V,)) * 0.5, dtype)
    labels = jnp.asarray(rng.integers(0, V, N))
    coef = jnp.asarray(rng.normal(size=(N,)), dtype)
    return x, w, b, labels, coef


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_selective_log_softmax_from_the_stats_has_the_true_gradient(layout):
    x, w, b, labels, coef = _inputs()

    def fused(x, w, b):
        # z_y from a gather of this token's column, lse from the fused pass.
        z_y = jnp.sum(x * w.T[labels], axis=1) + b[labels]
        _, stats = linear_softmax_cross_entropy(x, w, labels, b, reduction="none",
                                                return_stats=True, **LAYOUTS[layout])
        return jnp.sum(coef * (z_y - stats.lse))

    def plain(x, w, b):
        return jnp.sum(coef * ref.log_probs(ref.linear_logits(x, w, b), labels))

    got, dgot = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(x, w, b)
    want, dwant = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2)))(x, w, b)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, r in zip(dgot, dwant, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_lse_cotangents_add_up(reduction):
    x, w, b, labels, coef = _inputs()
    ignore = labels.at[3].set(-100)

    def fused(x, w, b):
        loss, stats = linear_softmax_cross_entropy(
            x, w, ignore, b, reduction=reduction, ignore_index=-100, label_smoothing=0.1,
            return_stats=True)
        return jnp.sum(loss) + jnp.sum(coef * stats.lse**2)

    def plain(x, w, b):
        z = ref.linear_logits(x, w, b)
        kept = ignore != -100
        per = jnp.where(kept, ref.softmax_cross_entropy_with_integer_labels(
            z, jnp.where(kept, ignore, 0), label_smoothing=0.1), 0.0)
        loss = jnp.sum(per) / jnp.sum(kept) if reduction == "mean" else jnp.sum(per)
        return loss + jnp.sum(coef * ref.logsumexp(z) ** 2)

    got, dgot = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(x, w, b)
    want, dwant = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2)))(x, w, b)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, r in zip(dgot, dwant, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


def test_stats_and_per_token_losses_of_bf16_inputs_are_float32():
    x, w, b, labels, _ = _inputs(jnp.bfloat16)

    @jax.jit
    def losses_stats_and_dx(x):
        def loss(x, reduction):
            return linear_softmax_cross_entropy(x, w, labels, b, reduction=reduction,
                                                return_stats=True)

        return loss(x, "mean"), loss(x, "none"), jax.grad(
            lambda x: jnp.sum(loss(x, "mean")[1].lse))(x)

    (loss, stats), (per, per_stats), dx = losses_stats_and_dx(x)
    assert loss.dtype == jnp.float32 and stats.lse.dtype == jnp.float32
    assert per.dtype == jnp.float32 and per_stats.lse.dtype == jnp.float32
    assert dx.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(dx, np.float32)))
