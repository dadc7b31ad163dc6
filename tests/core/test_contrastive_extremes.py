"""CLIP and SigLIP at the edges of float32: huge finite logits, near-duplicate pairs, invalid
labels, cancellation in the batch mean, and the argument checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _inputs import device

import softmax_jax as sj
from softmax_jax import reference_contrastive as ref


def _f64_clip(x, y, s, reduction="none", **kw):
    with jax.enable_x64(True):
        f = lambda a, b, t: ref.clip_loss(a, b, t, reduction=reduction, **kw)  # noqa: E731
        args = tuple(np.asarray(a, np.float64) for a in (x, y)) + (np.float64(s),)
        value = np.asarray(f(*args))
        grads = None
        if reduction != "none":
            grads = tuple(np.asarray(g) for g in jax.grad(f, (0, 1, 2))(*args))
        return value, grads


_X = jnp.array([[0.6, 0.8], [1.0, 0.0]])
_Y = jnp.array([[0.8, 0.6], [0.0, 1.0]])


@pytest.mark.parametrize("scale", [3e9, 1e30])
def test_clip_per_pair_exact_at_huge_finite_logit_scale(scale):
    got = np.asarray(sj.contrastive_loss(_X, _Y, logit_scale=scale, reduction="none"))
    want, _ = _f64_clip(_X, _Y, scale)
    assert np.all(np.isfinite(got)) and np.all(got >= 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * scale)


def test_clip_gradient_exact_at_huge_finite_logit_scale():
    scale = 3e9
    got = jax.grad(lambda a, b, s: sj.contrastive_loss(a, b, logit_scale=s, reduction="sum"),
                   (0, 1, 2))(_X, _Y, jnp.float32(scale))
    _, want = _f64_clip(_X, _Y, scale, reduction="sum")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6 * np.max(np.abs(w)))


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_clip_large_norm_embeddings_match_float64():
    x = _normal(0, (16, 8))
    y = x + 0.1 * _normal(1, (16, 8))
    x, y = device(1e4 * _unit_rows(x)), device(1e4 * _unit_rows(y))
    got = np.asarray(sj.contrastive_loss(x, y, logit_scale=100.0, reduction="none"))
    want, _ = _f64_clip(x, y, 100.0)
    assert np.all(np.isfinite(got)) and np.all(got >= 0.0)
    # the logits are ~1e10, whose float32 spacing is 1024
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=4 * 1024.0)


def test_clip_near_duplicate_pairs_never_give_a_negative_loss():
    x = _unit_rows(_normal(2, (64, 32)))
    y = _unit_rows(x + 1e-4 * _normal(3, x.shape))
    x, y = device(x), device(y)
    for bidirectional in (True, False):
        per = sj.contrastive_loss(x, y, logit_scale=100.0, bidirectional=bidirectional,
                                  reduction="none")
        assert np.all(np.asarray(per) >= 0.0)


def test_clip_single_pair_has_zero_loss_and_zero_gradient():
    x = jnp.array([[0.3, -1.2, 0.5]])
    y = jnp.array([[0.7, 0.1, -0.4]])
    for reduction in ("mean", "sum", "none"):
        f = lambda a, b, s, r=reduction: jnp.sum(sj.contrastive_loss(  # noqa: E731
            a, b, logit_scale=s, reduction=r))
        assert float(f(x, y, 100.0)) == 0.0
        for g in jax.grad(f, (0, 1, 2))(x, y, 100.0):
            assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_clip_invalid_label_gives_nan_value_and_nan_gradients(reduction):
    x, y = device(_normal(4, (4, 3))), device(_normal(5, (6, 3)))
    labels = jnp.array([2, 6, 0, 5])

    def f(a, b, s):
        return jnp.sum(sj.contrastive_loss(a, b, logit_scale=s, labels=labels,
                                           bidirectional=False, reduction=reduction))

    assert np.isnan(float(f(x, y, 2.0)))
    for g in jax.grad(f, (0, 1, 2))(x, y, 2.0):
        assert np.any(np.isnan(np.asarray(g)))


def test_clip_label_on_a_left_out_column_gives_nan_gradients():
    x, y = device(_normal(4, (4, 3))), device(_normal(5, (4, 3)))
    where = jnp.array([True, True, False, True])
    labels = jnp.array([2, 1, 0, 3])  # row 0 names column 2, left out

    def f(a):
        return sj.contrastive_loss(a, y, labels=labels, bidirectional=False, where=where)

    assert np.isnan(float(f(x)))
    assert np.all(np.isnan(np.asarray(jax.grad(f)(x))[0]))


@jax.jit
def _optax_clip_mean(x, y, s):
    z = s * x @ y.T
    lab = jnp.arange(x.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(z, lab).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(z.T, lab).mean())


@pytest.mark.parametrize("noise", [0.8, 0.05])
def test_clip_float32_mean_error_is_that_of_the_materialised_composition(noise):
    x = _normal(6, (512, 64))
    y = x + noise * _normal(7, x.shape)
    x, y = device(x), device(y)
    want, _ = _f64_clip(x, y, 1.0, reduction="mean")
    ours = abs(float(sj.contrastive_loss(x, y)) - float(want))
    theirs = abs(float(_optax_clip_mean(x, y, 1.0)) - float(want))
    tiny = 4 * np.finfo(np.float32).eps * float(want)
    assert ours <= 4 * max(theirs, tiny), (ours, theirs, float(want))


def test_contrastive_losses_refuse_an_integer_where():
    x = jnp.ones((2, 3))
    for fn in (sj.contrastive_loss, sj.sigmoid_contrastive_loss):
        with pytest.raises(TypeError, match="where"):
            fn(x, x, where=jnp.array([1, 0]))


@pytest.mark.parametrize("name", ["logit_scale", "logit_bias"])
def test_contrastive_nan_hyperparameter_message_says_not_a_number(name):
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=f"{name} must be a finite number, got nan"):
        sj.sigmoid_contrastive_loss(x, x, **{name: float("nan")})
