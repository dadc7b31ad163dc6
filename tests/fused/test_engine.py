"""The blockwise engine on its own, with a toy rule: the loss lse(x @ w + b), whose logit
gradient is the softmax; a second pass adds up each row's probabilities (which sum to 1)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax.fused import blocks, engine
from softmax_jax.fused.layout import BlockLayout

N, D, V = 11, 4, 19


class LseRule(engine.Rule):
    """Loss lse(z) per row: dlogits = r * softmax(z); the row sums count sum_c z_c over the
    finite logits and, in a second pass, sum_c a_c; the gradient pass adds up sum_c a_c z_c."""

    def sizes(self):
        return 1, 1, 1

    def grad_sizes(self):
        return 1

    def streams(self, blk, params):
        return (blk.logits[0],)

    def first_sums(self, blk, params):
        # finite logits only: a -inf in any block would make every row's sum -inf, and a
        # comparison of -inf with -inf would hold whichever blocks were added up
        z = blk.logits[0]
        return (jnp.sum(jnp.where(jnp.isfinite(z), z, 0.0), axis=1),)

    def second_sums(self, blk, stats, params):
        return (jnp.sum(stats.norms[0].prob(blk.logits[0]), axis=1),)

    def dlogits(self, blk, stats, r, params):
        a = stats.norms[0].prob(blk.logits[0])
        a_z = jnp.where(a == 0, 0.0, a * blk.logits[0])  # 0 on the -inf classes
        return r[:, None] * a, (jnp.sum(a_z, axis=1),)


def _inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.normal(size=(N, D)), jnp.float32),
            jnp.asarray(rng.normal(size=(D, V)), jnp.float32),
            jnp.asarray(rng.normal(size=(V,)), jnp.float32).at[-5:].set(-jnp.inf))


@functools.partial(jax.jit, static_argnames=("layout",))
def _run(x, w, b, r, *, layout):
    opt = engine.Options(None, layout, False, True)
    return engine.run(LseRule(), opt, (engine.Head(x, w, b),), (), (), None, jnp.ones(()), r=r)


@jax.jit
def _plain(x, w, b, r):
    """z = x @ w + b, lse(z), argmax(z), a = softmax(z), and the gradients of
    sum r * lse(z) for x, w and b."""
    z = x @ w + b
    a = jax.nn.softmax(z, axis=1)
    dz = r[:, None] * a
    return (z, jax.nn.logsumexp(z, axis=1), jnp.argmax(z, axis=1), a,
            (dz @ w.T, x.T @ dz, dz.sum(0)))


@pytest.mark.parametrize("layout", [BlockLayout(4, V), BlockLayout(N, V), BlockLayout(3, 5),
                                    BlockLayout(N, 4)])
def test_toy_rule_statistics_and_gradients(layout):
    x, w, b = _inputs()
    r = jnp.linspace(0.5, 1.5, N)
    stats, grads = _run(x, w, b, r, layout=layout)
    z, lse, argmax, a, (dx, dw, db) = _plain(x, w, b, r)
    np.testing.assert_allclose(stats.norms[0].lse()[:, 0], lse, rtol=1e-6)
    np.testing.assert_array_equal(stats.argmax, argmax)
    finite = np.where(np.isfinite(z), np.asarray(z, np.float64), 0.0)
    assert np.isfinite(np.asarray(stats.first[0])).all()
    # float32 sums of V terms in another order
    np.testing.assert_allclose(stats.first[0], finite.sum(1), rtol=0,
                               atol=V * 1e-7 * np.abs(finite).sum(1).max())
    np.testing.assert_allclose(stats.second[0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(grads.dx, dx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads.dw, dw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads.db, db, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads.row_sums[0], jnp.sum(a * finite, axis=1), rtol=1e-5)


def test_saved_statistics_skip_the_first_passes():
    x, w, b = _inputs()

    @jax.jit
    def run_twice(x, w, b):
        opt = engine.Options(None, BlockLayout(3, 5), False, False)
        heads = (engine.Head(x, w, b),)
        stats, none = engine.run(LseRule(), opt, heads, (), (), None, jnp.ones(()))
        again, grads = engine.run(LseRule(), opt, heads, (), (), None, jnp.ones(()),
                                  r=jnp.ones(N), saved=stats)
        return none, again, grads

    none, again, grads = run_twice(x, w, b)
    assert none is None
    assert again is None
    dx = _plain(x, w, b, jnp.ones(N))[4][0]
    np.testing.assert_allclose(grads.dx, dx, rtol=1e-5, atol=1e-6)


def test_online_merge_of_empty_parts_is_not_nan():
    s = jnp.array([0.0, 2.0])
    out = blocks.rescale(s, jnp.array([-jnp.inf, 1.0]), jnp.array([-300.0, 3.0]))
    np.testing.assert_allclose(out, [0.0, 2.0 * np.exp(-2.0)], rtol=1e-6)
    bm, m, e = blocks.block_exp(jnp.full((1, 3), -jnp.inf), jnp.array([-jnp.inf]))
    assert bm[0] == -jnp.inf and m[0] == -jnp.inf and np.all(np.asarray(e) == 0.0)


def test_block_exp_is_relative_to_the_running_maximum():
    z = jnp.array([[1.0, 3.0, -jnp.inf], [-jnp.inf, -jnp.inf, -jnp.inf]])
    bm, m, e = blocks.block_exp(z, jnp.array([5.0, 2.0]))
    np.testing.assert_array_equal(bm, [3.0, -np.inf])
    np.testing.assert_array_equal(m, [5.0, 2.0])
    np.testing.assert_allclose(e, [[np.exp(-4.0), np.exp(-2.0), 0.0], [0.0, 0.0, 0.0]],
                               rtol=1e-6)
