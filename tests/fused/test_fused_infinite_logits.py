"""The fused losses with a +inf logit: its row is NaN (value and gradient), as in the core
functions (tests/core/test_infinite_logits.py); other rows are untouched and an ignored
row stays 0."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_jax as sj

# x @ W: row 0 overflows to +inf in the product (10 * 1e38), row 1 is ordinary, row 2 holds
# a -inf logit (a class with probability 0, finite loss).
W_BIG = jnp.ones((3, 4)).at[0, 1].set(1e38)


X_ROWS = jnp.array([[10.0, 1.0, 1.0], [0.0, 1.0, 1.0], [-10.0, 1.0, 1.0]])


Y_ROWS = jnp.array([0, 2, 0])


FUSED_BLOCKS = {"held": {}, "blocks": {"token_block": 8, "vocab_block": 2},
                "narrow": {"token_block": 8, "vocab_block": 1}}


def _fused_ce(x, w=W_BIG, labels=Y_ROWS, **kw):
    return sj.fused.linear_softmax_cross_entropy(x, w, labels[-x.shape[0]:], reduction="none",
                                                 **kw)


@functools.partial(jax.jit, static_argnames=("kw",))
def _fused_ce_and_dx(x, *, kw):
    """The per-row losses and the gradient of their sum for x."""
    return _fused_ce(x, **dict(kw)), jax.grad(lambda x: _fused_ce(x, **dict(kw)).sum())(x)


@pytest.mark.parametrize("blocks", FUSED_BLOCKS.values(), ids=FUSED_BLOCKS.keys())
@pytest.mark.parametrize("terms", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}],
                         ids=["plain", "smoothing, z-loss"])
def test_fused_cross_entropy_plus_inf_row_is_nan(blocks, terms):
    # The row's value is NaN, as in the core loss, never +inf.
    kw = tuple(sorted({**blocks, **terms}.items()))
    loss, dx = _fused_ce_and_dx(X_ROWS, kw=kw)
    core = sj.softmax_cross_entropy_with_integer_labels(X_ROWS @ W_BIG, Y_ROWS, **terms)
    assert np.isnan(loss[0]) and np.isnan(core[0])
    # the other rows: bitwise what they give alone, and the core loss of their logits
    alone, dx_alone = _fused_ce_and_dx(X_ROWS[1:], kw=kw)
    np.testing.assert_array_equal(loss[1:], alone)
    np.testing.assert_allclose(loss[1:], core[1:], rtol=1e-6)
    assert np.all(np.isnan(dx[0]))
    np.testing.assert_array_equal(dx[1:], dx_alone)


def test_fused_plus_inf_weight_makes_every_row_nan():
    x = jnp.ones((2, 3))
    w = jnp.ones((3, 4)).at[0, 1].set(jnp.inf)
    labels = jnp.array([0, 2])
    assert np.all(np.isnan(sj.softmax_cross_entropy_with_integer_labels(x @ w, labels)))
    assert np.all(np.isnan(_fused_ce(x, w, labels)))
    lse = sj.fused.linear_softmax_cross_entropy(x, w, labels, return_stats=True)[1].lse
    assert np.all(np.isnan(lse)) and np.all(np.isnan(sj.logsumexp(x @ w, axis=-1)))


def test_fused_ignored_plus_inf_row_stays_zero():
    labels = jnp.array([-100, 2, 0])

    def loss(x, w):
        return _fused_ce(x, w, labels, ignore_index=-100)

    got, (dx, dw) = jax.jit(lambda x, w: (
        loss(x, w), jax.grad(lambda x, w: loss(x, w).sum(), (0, 1))(x, w)))(X_ROWS, W_BIG)
    assert got[0] == 0.0
    np.testing.assert_array_equal(got[1:], _fused_ce(X_ROWS[1:], W_BIG, labels))
    np.testing.assert_array_equal(dx[0], 0.0)
    assert np.isfinite(dx).all() and np.isfinite(dw).all()


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_fused_distillation_plus_inf_row_is_nan(side):
    plain = jnp.ones((3, 4))
    w, tw = (W_BIG, plain) if side == "student" else (plain, W_BIG)

    def loss(x):
        return sj.fused.linear_softmax_distillation(x, w, x, tw, labels=Y_ROWS[-x.shape[0]:],
                                                    hard_weight=0.5, reduction="none")

    got = loss(X_ROWS)
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], loss(X_ROWS[1:]))


@pytest.mark.parametrize("blocks", [None, (2, 2), (1, 1)], ids=["held", "tiles", "single"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fused_clip_plus_inf_logit_is_nan(blocks, bidirectional):
    # z[0, 2] = 1e40 overflows: row 0 (and column 2, bidirectional) is NaN, never +inf nor
    # a finite number (a NaN running sum read as an empty row) with small tiles.
    from softmax_jax.fused import contrastive as fc
    x = jnp.array([[1.0, 1e20], [0.0, 1.0], [1.0, 1.0], [1.0, 2.0]])
    y = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1e20], [2.0, 1.0]])
    z = x @ y.T
    labels = jnp.arange(4)
    want = sj.softmax_cross_entropy_with_integer_labels(z, labels)
    if bidirectional:
        want = 0.5 * (want + sj.softmax_cross_entropy_with_integer_labels(z.T, labels))
    got = fc.clip(x, y, jnp.float32(1.0), None, None, bidirectional, "none", None, blocks)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-6)
