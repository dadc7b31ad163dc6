"""linear_softmax_distillation against plain formulas on materialised logits (float64)."""

from __future__ import annotations

import functools

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
    labels = rng.integers(0, V, N)
    labels[4] = IGNORE
    return x, w, b, tx, tw, tb, jnp.asarray(labels)


def _fused(x, w, b, tx, tw, tb, labels, reduction, blocks, *, smoothing, **hyper):
    return linear_softmax_distillation(
        x, w, tx, tw, labels=labels, b=b, teacher_b=tb, reduction=reduction,
        ignore_index=IGNORE, label_smoothing=smoothing, **hyper, **BLOCKS[blocks])


def _plain(x, w, b, tx, tw, tb, labels, reduction, **hyper):
    return plain_distillation(x @ w + b, tx @ tw + tb, labels, reduction=reduction, **hyper)


# One compiled program per configuration, shared by the tests that use it: the fused loss
# with its hyper-parameters static (a Python float picks the rule's specialised path), the
# plain formula with everything but beta (which picks its formula) traced.
@functools.partial(jax.jit, static_argnames=("reduction", "blocks", "case"))
def _fused_value_and_grads(x, w, b, tx, tw, tb, labels, weight, *, reduction, blocks, case):
    return jax.value_and_grad(lambda x, w, b: jnp.sum(_fused(
        x, w, b, tx, tw, tb, labels, reduction, blocks, **CASES[case]) * weight),
        argnums=(0, 1, 2))(x, w, b)


@functools.partial(jax.jit, static_argnames=("reduction", "beta"))
def _plain_value_and_grads(x, w, b, tx, tw, tb, labels, weight, hyper, *, reduction, beta):
    return jax.value_and_grad(lambda x, w, b: jnp.sum(_plain(
        x, w, b, tx, tw, tb, labels, reduction, beta=beta, **hyper) * weight),
        argnums=(0, 1, 2))(x, w, b)


@functools.partial(jax.jit, static_argnames=("reduction", "blocks"))
def _fused_hyper_grads(hyper, x, w, b, tx, tw, tb, labels, weight, *, reduction, blocks):
    return jax.grad(lambda hyper: jnp.sum(_fused(
        x, w, b, tx, tw, tb, labels, reduction, blocks, **hyper) * weight))(hyper)


CASES = {
    "forward_kl": {"temperature": 1.0, "beta": 0.0, "hard_weight": 0.0, "smoothing": 0.0},
    "forward_T2_hard": {"temperature": 2.0, "beta": 0.0, "hard_weight": 0.4, "smoothing": 0.1},
    "jsd": {"temperature": 1.5, "beta": 0.5, "hard_weight": 0.0, "smoothing": 0.0},
    "jsd_hard": {"temperature": 0.7, "beta": 0.3, "hard_weight": 0.5, "smoothing": 0.2},
    "reverse_kl": {"temperature": 3.0, "beta": 1.0, "hard_weight": 0.2, "smoothing": 0.0},
}


def _weight(reduction):
    return jnp.linspace(0.5, 2.0, N) if reduction == "none" else 1.0


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_values_and_gradients_match_plain_formulas(x64, case, reduction, blocks):
    inputs = _inputs()
    weight = _weight(reduction)
    hyper = {k: np.float64(v) for k, v in CASES[case].items() if k != "beta"}
    got = _fused_value_and_grads(*inputs, weight, reduction=reduction, blocks=blocks,
                                 case=case)
    want = _plain_value_and_grads(*inputs, weight, hyper, reduction=reduction,
                                  beta=CASES[case]["beta"])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
    for g, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_hyperparameter_gradients_are_exact(x64, blocks, reduction):
    inputs = _inputs()
    weight = _weight(reduction)
    names = ("temperature", "beta", "hard_weight", "smoothing")
    hyper = dict(zip(names, (1.7, 0.4, 0.3, 0.15), strict=True))
    got = _fused_hyper_grads({k: np.float64(v) for k, v in hyper.items()}, *inputs, weight,
                             reduction=reduction, blocks=blocks)
    got = [got[k] for k in names]
    # the plain formula picks its case from a concrete beta: differentiated op by op
    want = jax.grad(lambda *h: jnp.sum(_plain(
        *inputs, reduction, **dict(zip(names, h, strict=True))) * weight),
        argnums=(0, 1, 2, 3))(*hyper.values())
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


@functools.partial(jax.jit, static_argnames=("beta", "constant"))
def _temperature_grads(x, w, b, tx, tw, tb, t, *, beta, constant):
    def loss(x, w, b, t):
        return linear_softmax_distillation(x, w, tx, tw, b=b, teacher_b=tb, temperature=t,
                                           beta=beta, **BLOCKS["tiles"])

    if constant:
        return jax.grad(lambda x, w, b: loss(x, w, b, constant), argnums=(0, 1, 2))(x, w, b)
    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w, b, t)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_constant_temperature_skips_only_its_own_cotangent(beta):
    # A Python-float temperature drops the per-element temperature term of the gradient
    # pass; the gradients of x, w and b must equal those with a traced temperature.
    x, w, b, tx, tw, tb, _ = _inputs(jnp.float32)
    t = jnp.float32(1.7)
    constant = _temperature_grads(x, w, b, tx, tw, tb, t, beta=beta, constant=1.7)
    traced = _temperature_grads(x, w, b, tx, tw, tb, t, beta=beta, constant=None)
    for got, want in zip(constant, traced[:3], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.isfinite(traced[3]) and traced[3] != 0.0


def test_teacher_arguments_get_zero_cotangents():
    x, w, b, tx, tw, tb, _ = _inputs(jnp.float32)
    grads = jax.jit(jax.grad(lambda tx, tw, tb: linear_softmax_distillation(
        x, w, tx, tw, b=b, teacher_b=tb, beta=0.5), argnums=(0, 1, 2)))(tx, tw, tb)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


def test_ignored_tokens_and_the_mean():
    x, w, b, tx, tw, tb, labels = _inputs(jnp.float32)
    labels = labels.at[:5].set(IGNORE)

    @jax.jit
    def per_mean_and_dx(x):
        def loss(x, reduction):
            return linear_softmax_distillation(x, w, tx, tw, labels=labels,
                                               ignore_index=IGNORE, reduction=reduction)

        return loss(x, "none"), *jax.value_and_grad(loss)(x, "mean")

    per, mean, gx = per_mean_and_dx(x)
    np.testing.assert_array_equal(per[:5], 0.0)
    np.testing.assert_allclose(mean, per.sum() / (N - 5), rtol=1e-6)
    np.testing.assert_array_equal(gx[:5], 0.0)


@functools.partial(jax.jit, static_argnames=("blocks", "beta"))
def _padded_value_and_grads(x, w, b, tx, tw, tb, labels, *, blocks, beta):
    return jax.value_and_grad(lambda x, w: linear_softmax_distillation(
        x, w, tx, tw, labels=labels, b=b, teacher_b=tb, beta=beta, hard_weight=0.3,
        ignore_index=IGNORE, **BLOCKS[blocks]), argnums=(0, 1))(x, w)


@functools.partial(jax.jit, static_argnames=("beta",))
def _plain_of_kept_columns(x, w, b, tx, tw, tb, labels, *, beta):
    return plain_distillation(x @ w[:, :-8] + b[:-8], tx @ tw[:, :-8] + tb[:-8], labels,
                              temperature=1.0, beta=beta, hard_weight=0.3, smoothing=0.0,
                              reduction="mean")


def test_padded_vocabulary_with_negative_infinite_biases():
    x, w, b, tx, tw, tb, labels = _inputs(jnp.float32)
    b, tb = (jnp.asarray(np.where(np.arange(V) >= V - 8, -np.inf, a)) for a in (b, tb))
    labels = jnp.asarray(np.where(np.asarray(labels) >= V - 8, 0, labels))
    for blocks in BLOCKS:
        for beta in (0.0, 0.5, 1.0):
            loss, grads = _padded_value_and_grads(x, w, b, tx, tw, tb, labels, blocks=blocks,
                                                  beta=beta)
            want = _plain_of_kept_columns(x, w, b, tx, tw, tb, labels, beta=beta)
            np.testing.assert_allclose(loss, want, rtol=1e-5)
            assert all(np.isfinite(g).all() for g in grads)
            np.testing.assert_array_equal(grads[1][:, -8:], 0.0)


HALF_HYPER = {"beta": 0.5, "hard_weight": 0.2, "temperature": 2.0}


@functools.partial(jax.jit, static_argnames=("blocks",))
def _half_value_and_grads(x, w, b, tx, tw, tb, labels, *, blocks):
    return jax.value_and_grad(lambda x, w, b: linear_softmax_distillation(
        x, w, tx, tw, b=b, teacher_b=tb, labels=labels, ignore_index=IGNORE, **HALF_HYPER,
        **BLOCKS[blocks]), argnums=(0, 1, 2))(x, w, b)


@jax.jit
def _plain_value_grads_and_dz(x, w, b, tx, tw, tb, labels):
    """The plain formula's value and gradients of x, w, b, and its logit gradient."""
    def plain_of_logits(zs, zt):
        return plain_distillation(zs, zt, labels, smoothing=0.0, reduction="mean",
                                  **HALF_HYPER)

    zs, zt = x @ w + b, tx @ tw + tb
    want = jax.value_and_grad(lambda x, w, b: plain_of_logits(x @ w + b, zt),
                              argnums=(0, 1, 2))(x, w, b)
    return want, jax.grad(plain_of_logits)(zs, zt)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_half_precision(x64, dtype, blocks):
    # Like with like: the plain formula in float64 on the same rounded inputs. The loss is
    # computed in float32 (products of narrow numbers are exact there, so the error is
    # float32 summation); each gradient is within its rounding bound (tests/_rounding.py).
    x, w, b, tx, tw, tb, labels = _inputs(jnp.float32)
    half = [a.astype(dtype) for a in (x, w, b, tx, tw, tb)]
    up = [a.astype(jnp.float64) for a in half]
    got = _half_value_and_grads(*half, labels, blocks=blocks)
    assert got[0].dtype == jnp.float32
    assert all(g.dtype == dtype for g in got[1])
    want, dz = _plain_value_grads_and_dz(*up, labels)
    np.testing.assert_allclose(got[0], want[0], rtol=16 * float(jnp.finfo(jnp.float32).eps))
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
