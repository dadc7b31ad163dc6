"""The two-level chunked benchmark anchor against the materialised formulas.

Values and gradients of ``x`` and ``w`` are compared in float64 with optax / ``jax.nn`` applied
to the full ``x @ w``, on shapes where ``N`` and ``V`` are not multiples of the blocks, so
that padded tokens and padded classes are exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _inputs import integers, normal

from experiments.chunked import chunked_cross_entropy, chunked_distillation

N, D, DT, V = 37, 6, 9, 50  # N and V deliberately not multiples of the blocks below
BLOCKS = [
    {"token_block": 8, "vocab_block": 16},  # 5 token blocks (3 padded rows), V padded to 64
    {"token_block": 64, "vocab_block": 7},  # one token block, 8 vocabulary blocks
    {"token_block": N, "vocab_block": V},  # no padding at all
]


def _inputs(dtype):
    return (normal(11, (N, D), dtype), normal(12, (D, V), dtype, 0.8),
            normal(13, (N, DT), dtype), normal(14, (DT, V), dtype, 0.6),
            integers(15, (N,), V))


def _ce_reference(x, w, labels, reduction):
    per_token = optax.softmax_cross_entropy_with_integer_labels(x @ w, labels)
    return per_token.mean() if reduction == "mean" else per_token.sum()


def _kd_reference(x, w, tx, tw, temperature, beta, reduction):
    log_q = jax.nn.log_softmax(x @ w / temperature)
    log_p = jax.nn.log_softmax(tx @ tw / temperature)
    if beta == 0.0:
        per_token = optax.losses.kl_divergence(log_q, jnp.exp(log_p))
    elif beta == 1.0:
        per_token = optax.losses.kl_divergence(log_p, jnp.exp(log_q))
    else:
        log_m = jnp.log(beta * jnp.exp(log_p) + (1 - beta) * jnp.exp(log_q))
        per_token = beta * optax.losses.kl_divergence(log_m, jnp.exp(log_p)) + (
            1 - beta
        ) * optax.losses.kl_divergence(log_m, jnp.exp(log_q))
    per_token = temperature**2 * per_token
    return per_token.mean() if reduction == "mean" else per_token.sum()


def _assert_close(got, want, rtol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("blocks", BLOCKS, ids=["tb8-vb16", "tb64-vb7", "unpadded"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_value_and_grads_match_optax_float64(x64, blocks, reduction):
    x, w, _, _, labels = _inputs(jnp.float64)
    got = jax.value_and_grad(
        lambda x, w: chunked_cross_entropy(x, w, labels, reduction=reduction, **blocks),
        argnums=(0, 1),
    )(x, w)
    want = jax.value_and_grad(
        lambda x, w: _ce_reference(x, w, labels, reduction), argnums=(0, 1)
    )(x, w)
    assert got[0].dtype == jnp.float64
    _assert_close(got, want, 1e-10)


def test_cross_entropy_float32_and_jit():
    x, w, _, _, labels = _inputs(jnp.float32)
    f = jax.jit(jax.value_and_grad(
        lambda x, w: chunked_cross_entropy(x, w, labels, token_block=16, vocab_block=32),
        argnums=(0, 1)))
    got = f(x, w)
    want = jax.value_and_grad(lambda x, w: _ce_reference(x, w, labels, "mean"),
                              argnums=(0, 1))(x, w)
    assert got[0].dtype == jnp.float32
    assert got[1][0].dtype == got[1][1].dtype == jnp.float32
    _assert_close(got, want, 2e-5)


def test_padded_classes_do_not_enter_the_log_sum_exp(x64):
    # With zero-padded classes left in (Tokamax's chunked version), each padded class adds
    # e^0 to every row's normaliser. x = 0 makes every logit 0: the true loss is log V,
    # while 14 zero-padded classes would give log(V + 14).
    x = jnp.zeros((4, 3), jnp.float64)
    w = jnp.ones((3, V), jnp.float64)
    labels = jnp.array([0, 1, 2, 49])
    loss = chunked_cross_entropy(x, w, labels, token_block=4, vocab_block=16)  # V -> 64
    np.testing.assert_allclose(loss, np.log(V), rtol=1e-12)
    assert abs(float(loss) - np.log(V + 14)) > 0.2
    # The gradient too: d loss / d z_ic = p_ic - [c = y_i] sums to 0 over the real classes
    # only if no probability went to padded ones, and then every row of dw sums to 0.
    x, w, _, _, labels = _inputs(jnp.float64)
    dw = jax.grad(lambda w: chunked_cross_entropy(x, w, labels, vocab_block=16))(w)
    np.testing.assert_allclose(np.asarray(dw).sum(axis=1), 0.0, atol=1e-12)


def test_label_in_the_last_partial_block(x64):
    x, w, _, _, _ = _inputs(jnp.float64)
    labels = jnp.full((N,), V - 1)
    got = chunked_cross_entropy(x, w, labels, reduction="sum", vocab_block=16)
    np.testing.assert_allclose(got, _ce_reference(x, w, labels, "sum"), rtol=1e-12)


@pytest.mark.parametrize("blocks", BLOCKS[:2], ids=["tb8-vb16", "tb64-vb7"])
@pytest.mark.parametrize(
    "beta,temperature", [(0.0, 1.0), (0.0, 2.0), (0.5, 2.0), (1.0, 2.0), (1.0, 0.5), (0.2, 3.0)]
)
def test_distillation_value_and_grads_match_the_formula_float64(x64, blocks, beta, temperature):
    x, w, tx, tw, _ = _inputs(jnp.float64)
    reduction = "mean" if beta != 0.2 else "sum"
    got = jax.value_and_grad(
        lambda x, w: chunked_distillation(x, w, tx, tw, temperature=temperature, beta=beta,
                                          reduction=reduction, **blocks),
        argnums=(0, 1),
    )(x, w)
    want = jax.value_and_grad(
        lambda x, w: _kd_reference(x, w, tx, tw, temperature, beta, reduction),
        argnums=(0, 1),
    )(x, w)
    assert float(got[0]) > 0.01  # a real divergence, not a trivially matching zero
    _assert_close(got, want, 1e-10)


def test_distillation_teacher_gets_zero_cotangents(x64):
    x, w, tx, tw, _ = _inputs(jnp.float64)
    g_tx, g_tw = jax.grad(
        lambda tx, tw: chunked_distillation(x, w, tx, tw, temperature=2.0, vocab_block=16),
        argnums=(0, 1),
    )(tx, tw)
    assert not np.any(np.asarray(g_tx)) and not np.any(np.asarray(g_tw))


def test_distillation_of_identical_models_is_zero(x64):
    x, w, _, _, _ = _inputs(jnp.float64)
    for beta in (0.0, 0.5, 1.0):
        value, (dx, dw) = jax.value_and_grad(
            lambda x, w, beta=beta: chunked_distillation(
                x, w, x, w, temperature=3.0, beta=beta, vocab_block=16),
            argnums=(0, 1),
        )(x, w)
        assert abs(float(value)) < 1e-12, (beta, value)
        assert float(jnp.max(jnp.abs(dx))) < 1e-12 and float(jnp.max(jnp.abs(dw))) < 1e-12


def test_distillation_float32_benchmark_composition():
    # The unfused composition the benchmark times, T = 2.
    x, w, tx, tw, _ = _inputs(jnp.float32)
    t = 2.0

    def composed(x, w):
        return t**2 * optax.losses.kl_divergence(
            jax.nn.log_softmax(x @ w / t), jax.nn.softmax(tx @ tw / t)).mean()

    got = jax.jit(jax.value_and_grad(
        lambda x, w: chunked_distillation(x, w, tx, tw, temperature=t, token_block=16,
                                          vocab_block=32), argnums=(0, 1)))(x, w)
    want = jax.value_and_grad(composed, argnums=(0, 1))(x, w)
    _assert_close(got, want, 2e-5)


def test_bad_arguments_are_refused():
    x, w, tx, tw, labels = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(x, w, labels, reduction="none")
    with pytest.raises(ValueError, match="labels must have shape"):
        chunked_cross_entropy(x, w, labels[:3])
    with pytest.raises(ValueError, match="beta"):
        chunked_distillation(x, w, tx, tw, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        chunked_distillation(x, w, tx, tw, temperature=0.0)
    with pytest.raises(ValueError, match="teacher_w"):
        chunked_distillation(x, w, tx, tw[:, :3])
