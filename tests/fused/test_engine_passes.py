"""The compiled structure of the fused engine's passes: the temporaries that
``memory_analysis()`` reports (compiled only, nothing is run), and the online KL's
infinite cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import normal

import softmax_jax as sj
from softmax_jax.reference import distillation_of_logits

# Held rows: the whole [64, 16384] float32 block of logits (4 MiB) is one temporary.
N, D, V = 64, 8, 16384
BLOCK = N * V * 4
F32 = jnp.float32
X, W, Y = (jax.ShapeDtypeStruct((N, D), F32), jax.ShapeDtypeStruct((D, V), F32),
           jax.ShapeDtypeStruct((N,), jnp.int32))


def _temp(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _log_probs(entropy: bool):
    def f(x, w, y):
        out = sj.linear_log_probs(x, w, y, return_entropy=entropy)
        return jnp.sum(jnp.stack(out)) if entropy else jnp.sum(out)
    return f


@pytest.mark.parametrize("grad", [False, True], ids=["value", "value_and_grad"])
def test_entropy_adds_no_block_sized_temporary(grad):
    # The normaliser's sum and the entropy's expectation each fuse with their own
    # exponentials: no block of exponentials is written for the two to share.
    temps = []
    for entropy in (False, True):
        fn = _log_probs(entropy)
        temps.append(_temp(jax.value_and_grad(fn, argnums=(0, 1)) if grad else fn, X, W, Y))
    assert temps[1] < temps[0] + BLOCK // 8, temps
    # One block of logits in all: the gradient pass, with the statistics saved, takes the
    # logits chunk by chunk rather than holding a second block.
    assert temps[1] < BLOCK + BLOCK // 8, temps


@pytest.mark.parametrize("beta", [0.0, 1.0], ids=["forward_kl", "reverse_kl"])
def test_kl_distillation_holds_the_heads_blocks_and_their_exponentials(beta):
    # Two heads of held rows (the student's and the teacher's logits) and each head's block
    # of exponentials, which the online KL shares with the normalisers (recomputing them in
    # the KL's own reduction saves two blocks but costs more time), and nothing else of
    # their size.
    def f(x, w, t):
        return sj.linear_softmax_distillation(x, w, x, t, beta=beta, reduction="none")

    assert _temp(f, X, W, W) < 4 * BLOCK + BLOCK // 8


@pytest.mark.parametrize("beta", [0.0, 1.0], ids=["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("blocks", [{}, {"token_block": 5, "vocab_block": 8}],
                         ids=["held", "tiles"])
def test_kl_is_infinite_where_one_side_has_no_mass(beta, blocks):
    # KL(P || Q) is +inf when Q gives 0 to a class that P weighs; classes that neither
    # weighs (both biases -inf) add nothing.
    n, d, v = 9, 4, 20
    x, w, b = normal(0, (n, d)), normal(1, (d, v)), normal(2, (v,))
    tx, tw, tb = normal(3, (n, d)), normal(4, (d, v)), normal(5, (v,))
    b, tb = b.at[-2:].set(-jnp.inf), tb.at[-2:].set(-jnp.inf)
    # The distribution that must cover the other's mass (the student's for the forward
    # KL, the teacher's for the reverse) loses two more classes.
    if beta == 0.0:
        b = b.at[3:5].set(-jnp.inf)
    else:
        tb = tb.at[3:5].set(-jnp.inf)
    got = sj.linear_softmax_distillation(x, w, tx, tw, b=b, teacher_b=tb, beta=beta,
                                         reduction="none", **blocks)
    want = distillation_of_logits(x @ w + b, tx @ tw + tb, 1.0, beta,
                                  "forward" if beta == 0.0 else "reverse")
    np.testing.assert_array_equal(np.isposinf(want), True)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("beta", [0.0, 1.0], ids=["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("shift", [-1e32, 1e32])
def test_kl_with_masked_classes_is_finite_at_logits_shifted_by_a_huge_constant(beta, shift):
    # A softmax does not see a constant added to every logit: with both heads' logits
    # shifted by ``shift`` (the finite ones all round to it, so both distributions are
    # uniform over the classes left) and two classes masked out on both sides, the KL
    # is 0, not the NaN of an overflowing clamp.
    n, d, v = 3, 4, 20
    x, w, tx, tw = normal(0, (n, d)), normal(1, (d, v)), normal(2, (n, d)), normal(3, (d, v))
    b = jnp.full((v,), shift, F32).at[-2:].set(-jnp.inf)
    got = sj.linear_softmax_distillation(x, w, tx, tw, b=b, teacher_b=b, beta=beta,
                                         reduction="none")
    np.testing.assert_array_equal(got, np.zeros(n, np.float32))


@pytest.mark.parametrize("shift", [-1e32, 1e32])
def test_entropy_with_masked_classes_is_exact_at_logits_shifted_by_a_huge_constant(shift):
    # As for the KL: with every finite logit rounding to ``shift`` the distribution is
    # uniform over the v - 2 classes left, so each token's log-probability is -log(v - 2)
    # and its entropy log(v - 2), not the NaN of an overflowing clamp.
    n, d, v = 3, 4, 20
    x, w = normal(0, (n, d)), normal(1, (d, v))
    b = jnp.full((v,), shift, F32).at[-2:].set(-jnp.inf)
    logp, entropy = sj.linear_log_probs(x, w, jnp.zeros(n, jnp.int32), b,
                                        return_entropy=True)
    np.testing.assert_allclose(logp, np.full(n, -np.log(v - 2)), rtol=1e-6)
    np.testing.assert_allclose(entropy, np.full(n, np.log(v - 2)), rtol=1e-6)
