"""linear_log_probs against jax.grad of the plain float64 formulas: the log-probabilities,
entropies and the GRPO and DPO objectives built on them, with every option; masking, bad
tokens, hyper-parameters and reduced precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_jax as sj
from softmax_jax import reference as ref

N, D, V = 13, 6, 29  # V is a multiple of no block size used here
IGNORE = -100
LAYOUTS = {
    "held": {},
    "held_tokens": {"token_block": 5},
    "tiles": {"token_block": 4, "vocab_block": 8},
}


def _inputs(lead=(N,), d=D, v=V, seed=0, dtype=None):
    """``x, w, b, tokens``; float64 under x64, float32 otherwise."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(*lead, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.8, dtype)
    b = jnp.asarray(rng.normal(size=(v,)) * 0.5, dtype)
    tokens = rng.integers(0, v, lead)
    # the first and last column of each vocabulary block of 8, and V - 1
    flat = tokens.reshape(-1)
    edges = [0, 7, 8, 15, 16, 23, 24, v - 1]
    flat[: len(edges)] = edges[: flat.size]
    return x, w, b, jnp.asarray(tokens)


def _plain(x, w, b, tokens, temperature=1.0, soft_cap=None):
    z = ref.linear_logits(x, w, b, temperature, soft_cap)
    return ref.log_probs(z, tokens), ref.softmax_entropy(z)


_jit_plain = jax.jit(_plain)


def _cotangents(shape, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.normal(size=shape))


def _vjp(fn, primals, cots):
    """``fn``'s outputs and their pullback of ``cots``, as one compiled program."""
    def run(primals, cots):
        out, pull = jax.vjp(fn, *primals)
        return out, pull(cots)

    return jax.jit(run)(primals, cots)


def _check_vjp(fused, plain, primals, cots, rtol=1e-11):
    out, grads = _vjp(fused, primals, cots)
    want, grads_want = _vjp(plain, primals, cots)
    for o, e in zip(out, want, strict=True):
        np.testing.assert_allclose(o, e, rtol=1e-12, atol=1e-13)
    for g, e in zip(grads, grads_want, strict=True):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=1e-12)
    return out


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_values_and_gradients_match_the_float64_formulas(layout):
    x, w, b, tokens = _inputs()
    fused = lambda x, w, b: sj.linear_log_probs(  # noqa: E731
        x, w, tokens, b, return_entropy=True, **LAYOUTS[layout])
    _check_vjp(fused, lambda x, w, b: _plain(x, w, b, tokens), (x, w, b), _cotangents((N,)))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("layout", ["held", "tiles"])
def test_temperature_and_soft_cap_with_their_own_derivatives(layout):
    x, w, b, tokens = _inputs()
    x = 4.0 * x  # logits past the cap's knee

    def fused(x, w, b, temp, cap):
        return sj.linear_log_probs(x, w, tokens, b, temperature=temp, soft_cap=cap,
                                   return_entropy=True, **LAYOUTS[layout])

    def plain(x, w, b, temp, cap):
        return _plain(x, w, b, tokens, temp, cap)

    primals = (x, w, b, jnp.asarray(0.7), jnp.asarray(5.0))
    _check_vjp(fused, plain, primals, _cotangents((N,)), rtol=1e-10)


@pytest.mark.usefixtures("x64")
def test_constant_temperature_and_no_bias():
    x, w, _, tokens = _inputs()
    fused = lambda x, w: sj.linear_log_probs(  # noqa: E731
        x, w, tokens, temperature=1.7, return_entropy=True)
    plain = lambda x, w: _plain(x, w, None, tokens, 1.7)  # noqa: E731
    _check_vjp(fused, plain, (x, w), _cotangents((N,)))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("layout", ["held", "tiles"])
def test_batch_time_inputs_with_where_and_ignore_index(layout):
    x, w, b, tokens = _inputs(lead=(3, 5))
    tokens = tokens.at[1, 2].set(IGNORE)
    keep = jnp.arange(5)[None, :] >= jnp.array([[1], [0], [2]])  # prompts masked
    cots = _cotangents((3, 5))

    def fused(x, w, b):
        return sj.linear_log_probs(x, w, tokens, b, return_entropy=True, where=keep,
                                   ignore_index=IGNORE, **LAYOUTS[layout])

    def plain(x, w, b):
        counted = keep & (tokens != IGNORE)
        logp, ent = _plain(x, w, b, jnp.where(counted, tokens, 0))
        return jnp.where(counted, logp, 0.0), jnp.where(counted, ent, 0.0)

    logp, ent = _check_vjp(fused, plain, (x, w, b), cots)
    assert logp.shape == ent.shape == (3, 5)
    assert logp[1, 2] == 0.0 and ent[1, 2] == 0.0 and logp[0, 0] == 0.0 and ent[2, 1] == 0.0


@pytest.mark.parametrize("layout", ["held", "tiles"])
def test_masked_tokens_get_exactly_zero_gradient_whatever_they_hold(layout):
    x, w, b, tokens = _inputs(dtype=jnp.float32)
    x = x.at[2].set(1e38).at[4].set(-1e38)  # their logits overflow to +-inf
    tokens = tokens.at[4].set(IGNORE)
    keep = jnp.ones(N, bool).at[2].set(False)

    def total(x, w, b):
        logp, ent = sj.linear_log_probs(x, w, tokens, b, where=keep, ignore_index=IGNORE,
                                        return_entropy=True, **LAYOUTS[layout])
        return jnp.sum(logp) + jnp.sum(ent), (logp, ent)

    (value, (logp, ent)), (dx, dw, db) = jax.jit(jax.value_and_grad(
        total, argnums=(0, 1, 2), has_aux=True))(x, w, b)
    assert np.isfinite(value) and np.isfinite(np.asarray(dw)).all()
    assert np.isfinite(np.asarray(db)).all()
    for i in (2, 4):
        assert logp[i] == 0.0 and ent[i] == 0.0
        assert np.all(np.asarray(dx[i]) == 0.0)
    # a zero gradient for the masked rows also in dw: the same as without them
    rest = jnp.ones(N, bool).at[2].set(False).at[4].set(False)
    dw_rest = jax.jit(jax.grad(
        lambda w: total(jnp.where(rest[:, None], x, 0.0), w, b)[0]))(w)
    np.testing.assert_allclose(dw, dw_rest, rtol=1e-6, atol=1e-7)


def test_out_of_range_token_gives_nan_for_its_row_only():
    x, w, b, tokens = _inputs(dtype=jnp.float32)
    tokens = tokens.at[3].set(V).at[5].set(-1)
    (logp, ent), dx = jax.jit(lambda x: (
        sj.linear_log_probs(x, w, tokens, b, return_entropy=True),
        jax.grad(lambda x: jnp.sum(sj.linear_log_probs(x, w, tokens, b)))(x)))(x)
    bad = np.zeros(N, bool)
    bad[[3, 5]] = True
    assert np.isnan(np.asarray(logp)[bad]).all() and np.isnan(np.asarray(ent)[bad]).all()
    assert np.isfinite(np.asarray(logp)[~bad]).all()
    assert np.isnan(np.asarray(dx)[bad]).all() and np.isfinite(np.asarray(dx)[~bad]).all()


def test_temperature_must_be_positive_and_finite():
    x, w, b, tokens = _inputs(dtype=jnp.float32)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            sj.linear_log_probs(x, w, tokens, temperature=bad)
    f = jax.jit(lambda t: sj.linear_log_probs(x, w, tokens, temperature=t,
                                              return_entropy=True))
    for bad in (0.0, -1.0, jnp.inf):
        logp, ent = f(jnp.asarray(bad))
        assert np.isnan(np.asarray(logp)).all() and np.isnan(np.asarray(ent)).all()
    grad = jax.jit(jax.grad(lambda t: jnp.sum(sj.linear_log_probs(x, w, tokens,
                                                                  temperature=t))))
    assert np.isnan(grad(jnp.asarray(-1.0)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_inputs_give_float32_outputs_accurate_to_the_rounded_inputs(dtype):
    x, w, b, tokens = _inputs(lead=(64,), d=32, v=300, dtype=jnp.float32)
    x, w, b = 2.0 * x.astype(dtype), w.astype(dtype), b.astype(dtype)
    (logp, ent), (dx, dw) = jax.jit(lambda x, w: (
        sj.linear_log_probs(x, w, tokens, b, return_entropy=True),
        jax.grad(lambda x, w: jnp.sum(sj.linear_log_probs(x, w, tokens, b)),
                 argnums=(0, 1))(x, w)))(x, w)
    assert logp.dtype == ent.dtype == jnp.float32
    with jax.enable_x64(True):
        want_lp, want_h = _jit_plain(*(np.asarray(a, np.float64) for a in (x, w, b)), tokens)
    # float32 accumulation of D = 32 products of exact narrow numbers: a few float32 ulps
    np.testing.assert_allclose(logp, want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, want_h, rtol=1e-5, atol=1e-5)
    assert dx.dtype == dtype and dw.dtype == dtype


def test_float32_values_within_rounding_of_float64():
    x, w, b, tokens = _inputs(lead=(64,), d=16, v=1000, dtype=jnp.float32)
    logp, ent = sj.linear_log_probs(3.0 * x, w, tokens, b, return_entropy=True,
                                    vocab_block=128)
    with jax.enable_x64(True):
        want_lp, want_h = _jit_plain(
            *(np.asarray(a, np.float64) for a in (3.0 * x, w, b)), tokens)
    np.testing.assert_allclose(logp, want_lp, rtol=1e-5)
    # H = log S - E[z - m] (S the row's sum relative to its maximum, >= 1): each part is
    # rounded to float32 at the size of log S, so a near-certain token's entropy is
    # accurate to an ulp of 1 rather than to its own size. With 8 vocabulary blocks the
    # engine also hands it over as log 8 - KL: one more rounding at the size of log 8.
    eps = float(np.finfo(np.float32).eps)
    held = sj.linear_log_probs(3.0 * x, w, tokens, b, return_entropy=True)[1]
    np.testing.assert_allclose(held, want_h, rtol=1e-5, atol=eps)
    np.testing.assert_allclose(ent, want_h, rtol=1e-5,
                               atol=eps + float(np.spacing(np.float32(np.log(8)))))


def test_without_entropy_matches_the_log_probs_with_it():
    x, w, b, tokens = _inputs(dtype=jnp.float32)
    logp = sj.linear_log_probs(x, w, tokens, b)
    logp2, _ = sj.linear_log_probs(x, w, tokens, b, return_entropy=True)
    assert logp.shape == (N,) and logp.dtype == jnp.float32
    np.testing.assert_array_equal(logp, logp2)


def test_negative_infinite_bias_columns_add_nothing():
    x, w, b, tokens = _inputs(dtype=jnp.float32)
    b_pad = jnp.concatenate([b, jnp.full((11,), -jnp.inf)])
    w_pad = jnp.concatenate([w, jnp.ones((D, 11))], axis=1)
    want = sj.linear_log_probs(x, w, tokens, b, return_entropy=True)
    for layout in ({}, {"vocab_block": 8}):
        def padded(w, layout=layout):
            return sj.linear_log_probs(x, w, tokens, b_pad, return_entropy=True, **layout)

        got, dw = jax.jit(lambda w, padded=padded: (
            padded(w), jax.grad(lambda w: jnp.sum(padded(w)[1]))(w)))(w_pad)
        for g, e in zip(got, want, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
        assert np.isfinite(np.asarray(dw)).all() and np.all(np.asarray(dw[:, V:]) == 0.0)


def test_argument_errors_name_the_argument():
    x, w, b, tokens = _inputs(dtype=jnp.float32)
    with pytest.raises(ValueError, match="labels.shape"):
        sj.linear_log_probs(x, w, tokens[:-1])
    with pytest.raises(TypeError):
        sj.linear_log_probs(x, w, tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match="where"):
        sj.linear_log_probs(x, w, tokens, where=jnp.ones((N + 1,), bool))
    with pytest.raises(ValueError, match="soft_cap"):
        sj.linear_log_probs(x, w, tokens, soft_cap=0.0)


# --------------------------------------------------------------------------------------------
# Post-training objectives built on the log-probabilities
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("layout", ["held", "tiles"])
def test_grpo_objective_values_and_gradients(layout):
    groups, t = 4, 6
    x, w, b, tokens = _inputs(lead=(groups, t))
    ref_w = w + 0.1 * jnp.asarray(np.random.default_rng(3).normal(size=w.shape))
    old_logp = ref.log_probs(ref.linear_logits(x, w, b), tokens) + 0.05
    ref_x = 0.9 * x
    mask = (jnp.arange(t)[None, :] >= 2) & jnp.ones((groups, 1), bool)
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0])
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)

    def fused(x, w, b):
        logp, ent = sj.linear_log_probs(x, w, tokens, b, where=mask, return_entropy=True,
                                        **LAYOUTS[layout])
        ref_logp = sj.linear_log_probs(ref_x, ref_w, tokens, b, where=mask)
        return ref.grpo_objective(logp, old_logp, ref_logp, ent, adv, mask)

    def plain(x, w, b):
        logp, ent = _plain(x, w, b, tokens)
        ref_logp = ref.log_probs(ref.linear_logits(ref_x, ref_w, b), tokens)
        return ref.grpo_objective(logp, old_logp, ref_logp, ent, adv, mask)

    got, dgot = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(x, w, b)
    want, dwant = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2)))(x, w, b)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, e in zip(dgot, dwant, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-13)
    assert np.abs(np.asarray(dgot[1])).max() > 1e-3


@pytest.mark.usefixtures("x64")
def test_dpo_objective_values_and_gradients():
    pairs, t = 3, 5
    x, w, b, tokens = _inputs(lead=(2 * pairs, t))
    ref_w = 0.9 * w
    mask = jnp.arange(t)[None, :] >= jnp.array([[1], [2], [1], [3], [0], [2]])

    def dpo(logp, ref_logp):
        return ref.dpo_objective(logp[:pairs], logp[pairs:], ref_logp[:pairs],
                                 ref_logp[pairs:], mask[:pairs], mask[pairs:])

    def fused(x, w):
        logp = sj.linear_log_probs(x, w, tokens, b, where=mask, vocab_block=8)
        return dpo(logp, sj.linear_log_probs(x, ref_w, tokens, b, where=mask))

    def plain(x, w):
        return dpo(ref.log_probs(ref.linear_logits(x, w, b), tokens),
                   ref.log_probs(ref.linear_logits(x, ref_w, b), tokens))

    got, dgot = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(x, w)
    want, dwant = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, e in zip(dgot, dwant, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-13)


def test_ignore_index_is_checked_against_the_tokens_own_dtype():
    x = jnp.ones((2, 3))
    w = jnp.ones((3, 4))
    with pytest.raises(ValueError, match="outside the range of the uint8 labels"):
        sj.linear_log_probs(x, w, np.array([1, 2], np.uint8), ignore_index=-100)
    tokens = np.array([2**32 - 1, 3], np.uint32)
    got = sj.linear_log_probs(x, w, tokens, ignore_index=2**32 - 1)
    assert got[0] == 0.0
    np.testing.assert_allclose(got[1], np.log(0.25), rtol=1e-6)
