"""linear_softmax_distillation against plain formulas on materialised logits (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _rounding import gradient_rounding_ratios

import softmax_jax as sj
from softmax_jax import reference
from softmax_jax.fused import linear_softmax_distillation
from softmax_jax.reference import distillation_with_hard_labels as plain_distillation

N, D, DT, V = 17, 5, 7, 23  # the teacher is wider than the student


IGNORE = -100


BLOCKS = {"held": {}, "tiles": {"token_block": 6, "vocab_block": 8}}


def _inputs(dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)

    def arr(*shape, s=1.0):
        return jnp.asarray(rng.normal(size=shape) * s, dtype)

    x, w, b = arr(N, D), arr(D, V, s=0.7), arr(V, s=0.3)
    tx, tw, tb = arr(N, DT), arr(DT, V, s=0.6), arr(V, s=0.3)
    labels = jnp.asarray(rng.integers(0, V, N)).at[4].set(IGNORE)
    return x, w, b, tx, tw, tb, labels


def _both(x, w, b, tx, tw, tb, labels, reduction, blocks=None, **hyper):
    fused = linear_softmax_distillation(
        x, w, tx, tw, labels=labels, b=b, teacher_b=tb, reduction=reduction,
        ignore_index=IGNORE, **{k if k != "smoothing" else "label_smoothing": v
                                for k, v in hyper.items()}, **(blocks or {}))
    plain = plain_distillation(x @ w + b, tx @ tw + tb, labels, reduction=reduction, **hyper)
    return fused, plain


CASES = {
    "forward_kl": {"temperature": 1.0, "beta": 0.0, "hard_weight": 0.0, "smoothing": 0.0},
    "forward_T2_hard": {"temperature": 2.0, "beta": 0.0, "hard_weight": 0.4, "smoothing": 0.1},
    "jsd": {"temperature": 1.5, "beta": 0.5, "hard_weight": 0.0, "smoothing": 0.0},
    "jsd_hard": {"temperature": 0.7, "beta": 0.3, "hard_weight": 0.5, "smoothing": 0.2},
    "reverse_kl": {"temperature": 3.0, "beta": 1.0, "hard_weight": 0.2, "smoothing": 0.0},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_values_and_gradients_match_plain_formulas(x64, case, reduction, blocks):
    x, w, b, tx, tw, tb, labels = _inputs()
    weight = jnp.linspace(0.5, 2.0, N) if reduction == "none" else 1.0

    def loss(x, w, b, which):
        out = _both(x, w, b, tx, tw, tb, labels, reduction, BLOCKS[blocks], **CASES[case])
        return jnp.sum(out[which] * weight)

    got = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, b, 0)
    want = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, b, 1)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
    for g, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_hyperparameter_gradients_are_exact(x64, blocks, reduction):
    x, w, b, tx, tw, tb, labels = _inputs()
    weight = jnp.linspace(0.5, 2.0, N) if reduction == "none" else 1.0

    def loss(temperature, beta, hard_weight, smoothing, which):
        out = _both(x, w, b, tx, tw, tb, labels, reduction, BLOCKS[blocks],
                    temperature=temperature, beta=beta, hard_weight=hard_weight,
                    smoothing=smoothing)
        return jnp.sum(out[which] * weight)

    hyper = (1.7, 0.4, 0.3, 0.15)
    got = jax.grad(loss, argnums=(0, 1, 2, 3))(*hyper, 0)
    want = jax.grad(loss, argnums=(0, 1, 2, 3))(*hyper, 1)
    assert all(abs(float(g)) > 1e-4 for g in got)
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_float32_matches_a_float64_numpy_formula():
    # the core sj.distillation_loss shares _distillation_terms with the fused rule, so it
    # cannot be the oracle here; float32 logits of size ~3 and V = 23 terms: ~1e-6 relative
    x, w, b, tx, tw, tb, _ = _inputs(jnp.float32)
    zs = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    zt = np.asarray(tx, np.float64) @ np.asarray(tw, np.float64) + np.asarray(tb, np.float64)
    for beta in (0.0, 0.3, 0.5, 1.0):
        got = linear_softmax_distillation(x, w, tx, tw, b=b, teacher_b=tb, temperature=2.0,
                                          beta=beta, reduction="none")
        want = reference.np_distillation(zs, zt, 2.0, beta)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * want.max())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_constant_temperature_skips_only_its_own_cotangent(beta):
    # A Python-float temperature drops the per-element temperature term of the gradient
    # pass; the gradients of x, w and b must equal those with a traced temperature.
    x, w, b, tx, tw, tb, _ = _inputs(jnp.float32)

    def loss(x, w, b, t):
        return linear_softmax_distillation(x, w, tx, tw, b=b, teacher_b=tb, temperature=t,
                                           beta=beta, **BLOCKS["tiles"])

    constant = jax.grad(lambda x, w, b: loss(x, w, b, 1.7), argnums=(0, 1, 2))(x, w, b)
    traced = jax.grad(loss, argnums=(0, 1, 2, 3))(x, w, b, jnp.float32(1.7))
    for got, want in zip(constant, traced[:3], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.isfinite(traced[3]) and traced[3] != 0.0


def test_teacher_arguments_get_zero_cotangents():
    x, w, b, tx, tw, tb, _ = _inputs(jnp.float32)
    grads = jax.grad(lambda tx, tw, tb: linear_softmax_distillation(
        x, w, tx, tw, b=b, teacher_b=tb, beta=0.5), argnums=(0, 1, 2))(tx, tw, tb)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


def test_ignored_tokens_and_the_mean():
    x, w, b, tx, tw, tb, labels = _inputs(jnp.float32)
    labels = labels.at[:5].set(IGNORE)
    per = linear_softmax_distillation(x, w, tx, tw, labels=labels, ignore_index=IGNORE,
                                      reduction="none")
    np.testing.assert_array_equal(per[:5], 0.0)
    mean = linear_softmax_distillation(x, w, tx, tw, labels=labels, ignore_index=IGNORE)
    np.testing.assert_allclose(mean, per.sum() / (N - 5), rtol=1e-6)
    gx = jax.grad(lambda x: linear_softmax_distillation(
        x, w, tx, tw, labels=labels, ignore_index=IGNORE))(x)
    np.testing.assert_array_equal(gx[:5], 0.0)


def test_padded_vocabulary_with_negative_infinite_biases():
    x, w, b, tx, tw, tb, labels = _inputs(jnp.float32)
    b = b.at[-8:].set(-jnp.inf)
    tb = tb.at[-8:].set(-jnp.inf)
    labels = jnp.where(labels >= V - 8, 0, labels)
    for blocks in BLOCKS.values():
        for beta in (0.0, 0.5, 1.0):
            loss, grads = jax.value_and_grad(
                lambda x, w, beta=beta, blocks=blocks: linear_softmax_distillation(
                    x, w, tx, tw, labels=labels, b=b, teacher_b=tb, beta=beta,
                    hard_weight=0.3, ignore_index=IGNORE, **blocks), argnums=(0, 1))(x, w)
            want = plain_distillation(x @ w[:, :-8] + b[:-8], tx @ tw[:, :-8] + tb[:-8],
                             labels, temperature=1.0, beta=beta, hard_weight=0.3,
                             smoothing=0.0, reduction="mean")
            np.testing.assert_allclose(loss, want, rtol=1e-5)
            assert all(np.isfinite(g).all() for g in grads)
            np.testing.assert_array_equal(grads[1][:, -8:], 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_half_precision(x64, dtype, blocks):
    # Like with like: the plain formula in float64 on the same rounded inputs. The loss is
    # computed in float32 (products of narrow numbers are exact there, so the error is
    # float32 summation); each gradient is within its rounding bound (tests/_rounding.py).
    x, w, b, tx, tw, tb, labels = _inputs(jnp.float32)
    half = [a.astype(dtype) for a in (x, w, b, tx, tw, tb)]
    up = [a.astype(jnp.float64) for a in half]
    hyper = {"beta": 0.5, "hard_weight": 0.2, "temperature": 2.0}

    def loss(x, w, b, tx, tw, tb):
        return linear_softmax_distillation(x, w, tx, tw, b=b, teacher_b=tb, labels=labels,
                                           ignore_index=IGNORE, **hyper, **BLOCKS[blocks])

    def plain_of_logits(zs, zt):
        return plain_distillation(zs, zt, labels, smoothing=0.0, reduction="mean", **hyper)

    got = jax.value_and_grad(loss, argnums=(0, 1, 2))(*half)
    assert got[0].dtype == jnp.float32
    assert all(g.dtype == dtype for g in got[1])
    zs, zt = up[0] @ up[1] + up[2], up[3] @ up[4] + up[5]
    want = jax.value_and_grad(lambda x, w, b: plain_of_logits(x @ w + b, zt),
                              argnums=(0, 1, 2))(*up[:3])
    np.testing.assert_allclose(got[0], want[0], rtol=16 * float(jnp.finfo(jnp.float32).eps))
    dz = jax.grad(plain_of_logits)(zs, zt)
    ratios = gradient_rounding_ratios(got[1], want[1], dz, up[0], up[1],
                                      float(jnp.finfo(dtype).eps))
    assert max(ratios) <= 1.0, ratios


def test_labels_are_required_for_the_hard_term_and_ignore_index():
    x, w, b, tx, tw, tb, labels = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="labels are required"):
        linear_softmax_distillation(x, w, tx, tw, hard_weight=0.5)
    with pytest.raises(ValueError, match="labels are required"):
        linear_softmax_distillation(x, w, tx, tw, ignore_index=IGNORE)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"temperature": 0.0}, "temperature"),
    ({"beta": 1.5}, "beta"),
    ({"hard_weight": -0.1}, "hard_weight"),
    ({"teacher_w": jnp.ones((DT, V + 1))}, "teacher_w"),
    ({"reduction": "max"}, "reduction"),
])
def test_bad_arguments_raise(overrides, match):
    x, w, b, tx, tw, tb, labels = _inputs(jnp.float32)
    kw = {"labels": labels, "teacher_w": tw, **overrides}
    teacher_w = kw.pop("teacher_w")
    with pytest.raises(ValueError, match=match):
        linear_softmax_distillation(x, w, tx, teacher_w, **kw)


def test_traced_hyperparameters_do_not_recompile():
    x, w, b, tx, tw, tb, labels = _inputs(jnp.float32)
    f = jax.jit(lambda t, beta: linear_softmax_distillation(
        x, w, tx, tw, temperature=t, beta=beta))
    for t, beta in ((1.0, 0.0), (2.0, 0.5), (0.5, 1.0)):
        want = sj.distillation_loss(x @ w, tx @ tw, temperature=t, beta=beta).mean()
        np.testing.assert_allclose(f(t, beta), want, rtol=2e-5)
    assert np.isnan(f(-1.0, 0.5))
