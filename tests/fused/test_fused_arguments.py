"""Both fused losses' arguments: heads whose logits differ by a constant, traced
hyper-parameters out of range, a weighted mean over zero weights, mixed precision, leading
batch axes, and the result dtype under x64."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import softmax_jax as sj
from softmax_jax import reference
from softmax_jax.fused import linear_softmax_cross_entropy, linear_softmax_distillation

BLOCKS = {"held": {}, "tiles": {"token_block": 24, "vocab_block": 512}}


def _offset_heads(offset: float, n=64, d=16, v=3000, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(v,)) * 1e-2, jnp.float32)  # a KL that is not 0
    return x, w, jnp.full((v,), offset, jnp.float32) + noise


def _kd_reference64(x, w, b, tx, tw, temperature: float, beta: float) -> np.ndarray:
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    zs = f64(x) @ f64(w) + (0.0 if b is None else f64(b))
    return reference.np_distillation(zs, f64(tx) @ f64(tw), temperature, beta)


@pytest.mark.parametrize("blocks", BLOCKS.values(), ids=BLOCKS.keys())
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("offset", [100.0, 1000.0, -1000.0])
def test_kl_of_heads_offset_by_a_constant_keeps_float32_accuracy(offset, beta, blocks):
    # A one-pass E_P[t - s] - (lse t - lse s) would cancel at logit size (errors of 4e-5 at
    # offset 100 and 2.4e-4 at offset 1000, some of them negative).
    x, w, b = _offset_heads(offset)
    got = linear_softmax_distillation(x, w, x, w, b=b, beta=beta, reduction="none", **blocks)
    ref = _kd_reference64(x, w, b, x, w, 1.0, beta)
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-4, atol=2e-6)
    unfused = sj.distillation_loss(x @ w + b, x @ w, beta=beta)
    assert np.max(np.abs(np.asarray(got) - ref)) <= 4 * np.max(np.abs(np.asarray(unfused) - ref))


def test_kl_offset_gradient_keeps_float32_accuracy():
    x, w, b = _offset_heads(1000.0, n=16, v=700)
    grad = jax.jit(jax.grad(lambda x: linear_softmax_distillation(x, w, x, w, b=b)))(x)
    ref = jax.jit(jax.grad(lambda x: sj.distillation_loss(
        x @ w + b, jax.lax.stop_gradient(x @ w)).mean()))(x)
    np.testing.assert_allclose(grad, ref, atol=1e-5)


def _small(seed=0, n=6, d=4, v=9):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    tw = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, n))
    return x, w, tw, labels


def _ce_hyper(name, **kw):
    x, w, _, labels = _small()
    return lambda h: jnp.sum(linear_softmax_cross_entropy(x, w, labels, **{name: h}, **kw))


def _kd_hyper(name, **kw):
    x, w, tw, labels = _small()
    return lambda h: jnp.sum(linear_softmax_distillation(
        x, w, x, tw, labels=labels, **{name: h}, **kw))


BAD = {"soft_cap": -1.0, "label_smoothing": 2.0, "z_loss": -1.0, "temperature": -1.0,
       "beta": 2.0, "hard_weight": 1.5}


CASES = {
    **{f"ce {k}={BAD[k]:g}": (_ce_hyper, k, BAD[k], {})
       for k in ("soft_cap", "label_smoothing", "z_loss")},
    "ce soft_cap=0": (_ce_hyper, "soft_cap", 0.0, {}),
    "ce z_loss=inf": (_ce_hyper, "z_loss", np.inf, {}),
    **{f"kd {k}={BAD[k]:g}": (_kd_hyper, k, BAD[k], {})
       for k in ("temperature", "beta", "hard_weight", "label_smoothing")},
    "kd label_smoothing=2, hard_weight=0.5": (_kd_hyper, "label_smoothing", 2.0,
                                              {"hard_weight": 0.5}),
}


@functools.partial(jax.jit, static_argnames=("maker", "name", "kw", "reduction"))
def _value_and_derivative(h, *, maker, name, kw, reduction):
    """One compiled program per loss and traced hyper-parameter, whatever its value."""
    return jax.value_and_grad(maker(name, reduction=reduction, **dict(kw)))(h)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_traced_out_of_range_hyperparameter_gives_nan_value_and_derivative(case, reduction):
    # Neither d/dcap = 0.0 for soft_cap=-1, nor a finite dT for temperature=-1, nor a finite
    # derivative for hard_weight=1.5, nor a finite value for label_smoothing=2, hard_weight=0.
    maker, name, bad, kw = case
    val, grad = _value_and_derivative(jnp.float32(bad), maker=maker, name=name,
                                      kw=tuple(sorted(kw.items())), reduction=reduction)
    assert np.isnan(val) and np.isnan(grad)


def test_traced_out_of_range_hyperparameter_gives_nan_input_gradients():
    x, w, tw, labels = _small()
    def loss(x, h):
        return linear_softmax_distillation(x, w, x, tw, labels=labels, hard_weight=h)
    assert np.all(np.isnan(jax.jit(jax.grad(loss))(x, jnp.float32(1.5))))


def test_traced_in_range_hyperparameters_match_the_plain_derivatives():
    # The NaN guard must leave valid values alone: against jax.grad of the plain formula.
    x, w, tw, labels = _small()

    def fused(t, h, e):
        return linear_softmax_distillation(x, w, x, tw, labels=labels, temperature=t,
                                           hard_weight=h, label_smoothing=e)

    def plain(t, h, e):
        zs, zt = x @ w, x @ tw
        ce = reference.softmax_cross_entropy_with_integer_labels(zs, labels, label_smoothing=e)
        kd = reference.forward_kl_distillation(zs, zt, temperature=t)
        return jnp.mean(h * ce + (1 - h) * kd)

    args = (jnp.float32(1.7), jnp.float32(0.3), jnp.float32(0.2))
    got = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(*args)
    ref = jax.jit(jax.grad(plain, argnums=(0, 1, 2)))(*args)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_weighted_mean_over_zero_label_weights_is_nan_as_pytorch(smoothing):
    # NaN as PyTorch, not 0 with a zero gradient ("sum" gives 1.81 here).
    x, w, _, _ = _small(v=5)
    labels = jnp.array([0, 0, -100, 0, 0, -100])
    cw = jnp.array([0.0, 1.0, 2.0, 3.0, 4.0])
    kw = dict(class_weights=cw, label_smoothing=smoothing, ignore_index=-100)
    (loss, (dx, dw)), total = jax.jit(lambda x, w: (jax.value_and_grad(
        lambda x, w: linear_softmax_cross_entropy(x, w, labels, **kw), argnums=(0, 1))(x, w),
        linear_softmax_cross_entropy(x, w, labels, reduction="sum", **kw)))(x, w)
    xt = torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
    z = xt @ torch.tensor(np.asarray(w), dtype=torch.float64)
    y_t = torch.tensor(np.asarray(labels), dtype=torch.long)
    w_t = torch.tensor(np.asarray(cw), dtype=torch.float64)
    ref = torch.nn.functional.cross_entropy(z, y_t, weight=w_t, label_smoothing=smoothing)
    ref.backward()
    assert np.isnan(ref.item()) and np.isnan(loss)
    ref_dx = xt.grad.numpy()
    np.testing.assert_array_equal(np.isnan(dx), np.isnan(ref_dx))  # NaN on kept rows only
    np.testing.assert_array_equal(np.asarray(dx)[~np.isnan(ref_dx)], 0.0)
    assert np.all(np.isnan(dw))
    ref_sum = torch.nn.functional.cross_entropy(
        z.detach(), y_t, weight=w_t, label_smoothing=smoothing, reduction="sum")
    np.testing.assert_allclose(total, ref_sum.item(), rtol=1e-5, atol=1e-6)


def test_mean_with_no_kept_token_stays_zero():
    # The documented choice (PyTorch: NaN): nothing counted gives 0 and zero gradients.
    x, w, _, _ = _small(v=5)
    labels = jnp.full((6,), -100)
    for cw in (None, jnp.arange(5.0)):
        loss, dx = jax.jit(jax.value_and_grad(lambda x, cw=cw: linear_softmax_cross_entropy(
            x, w, labels, ignore_index=-100, class_weights=cw, label_smoothing=0.2)))(x)
        assert float(loss) == 0.0 and not np.any(dx)


def _rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return np.max(np.abs(a - ref)) / np.max(np.abs(ref))


def _mixed_inputs(x_dtype, w_dtype, n=64, d=32, v=300, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)), x_dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), w_dtype)
    return x, w, jnp.asarray(rng.integers(0, v, n))


@jax.jit
def _plain_grads64(x, w, labels):
    return jax.grad(lambda x, w: sj.softmax_cross_entropy_with_integer_labels(
        x @ w, labels).mean(), argnums=(0, 1))(x, w)


@pytest.mark.parametrize("blocks", BLOCKS.values(), ids=BLOCKS.keys())
@pytest.mark.parametrize("dtypes", [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)],
                         ids=["f32 x, bf16 w", "bf16 x, f32 w"])
def test_mixed_precision_gradient_of_the_wider_input_keeps_its_accuracy(x64, dtypes, blocks):
    # Rounding dlogits to bf16 before the matmul would give f32 x with bf16 w a dx with
    # relative error 1.6e-3; the unfused loss gives 6.5e-7.
    x, w, labels = _mixed_inputs(*dtypes)
    wide = 0 if dtypes[0] == jnp.float32 else 1
    grads = jax.jit(jax.grad(lambda x, w: linear_softmax_cross_entropy(
        x, w, labels, vocab_block=blocks.get("vocab_block"),
        token_block=blocks.get("token_block")), argnums=(0, 1)))(x, w)
    ref = _plain_grads64(x.astype(jnp.float64), w.astype(jnp.float64), labels)
    assert grads[wide].dtype == jnp.float32
    assert _rel(grads[wide], ref[wide]) < 1e-5
    assert _rel(grads[1 - wide], ref[1 - wide]) < 1e-2  # bf16 accuracy for the narrow one


def test_distillation_mixed_precision_dx_keeps_float32_accuracy(x64):
    x, w, _ = _mixed_inputs(jnp.float32, jnp.bfloat16)
    tw = (w.astype(jnp.float32) * 1.3).astype(jnp.bfloat16)
    dx = jax.jit(jax.grad(lambda x: linear_softmax_distillation(
        x, w, x, tw, temperature=2.0)))(x)
    x64_, w64, tw64 = (a.astype(jnp.float64) for a in (x, w, tw))
    ref = jax.jit(jax.grad(lambda x: sj.distillation_loss(
        x @ w64, x64_ @ tw64, temperature=2.0).mean()))(x64_)
    assert _rel(dx, ref) < 1e-5


def test_cross_entropy_accepts_leading_batch_axes():
    x, w, _, labels = _small(n=12)
    x3, y3 = x.reshape(2, 2, 3, 4), labels.reshape(2, 2, 3)
    y3 = y3.at[0, 1, 2].set(-100)
    kw = dict(ignore_index=-100, label_smoothing=0.1)
    per, dx, (_, stats) = jax.jit(lambda x: (
        linear_softmax_cross_entropy(x, w, y3, reduction="none", **kw),
        jax.grad(lambda x: linear_softmax_cross_entropy(x, w, y3, **kw))(x),
        linear_softmax_cross_entropy(x, w, y3, return_stats=True, **kw)))(x3)
    ref, ref_dx, argmax = jax.jit(lambda x: (
        sj.softmax_cross_entropy_with_integer_labels(x @ w, y3, **kw),
        jax.grad(lambda x: sj.softmax_cross_entropy_with_integer_labels(
            x @ w, y3, **kw).sum() / jnp.sum(y3 != -100))(x),
        jnp.argmax(x @ w, axis=-1)))(x3)
    assert per.shape == (2, 2, 3)
    np.testing.assert_allclose(per, ref, rtol=1e-5, atol=1e-6)
    assert dx.shape == x3.shape
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-6)
    assert stats.lse.shape == stats.argmax.shape == (2, 2, 3)
    np.testing.assert_array_equal(stats.argmax, argmax)


def test_distillation_accepts_leading_batch_axes():
    x, w, tw, labels = _small(n=12)
    tx = jnp.flip(x, axis=0) * 0.5
    x3, tx3, y3 = x.reshape(3, 4, 4), tx.reshape(3, 4, 4), labels.reshape(3, 4)
    kw = dict(temperature=2.0, hard_weight=0.25)
    per, ref, dx = jax.jit(lambda x3: (
        linear_softmax_distillation(x3, w, tx3, tw, labels=y3, reduction="none", **kw),
        linear_softmax_distillation(x, w, tx, tw, labels=labels, reduction="none", **kw),
        jax.grad(lambda x: linear_softmax_distillation(x, w, tx3, tw, labels=y3, **kw))(x3)
    ))(x3)
    assert per.shape == (3, 4)
    np.testing.assert_allclose(per, ref.reshape(3, 4), rtol=1e-6)
    assert dx.shape == x3.shape


@pytest.mark.parametrize("bad", ["labels", "teacher_x", "flat_x"])
def test_mismatched_leading_shapes_raise_naming_the_argument(bad):
    x, w, tw, labels = _small(n=12)
    x3, y3 = x.reshape(3, 4, 4), labels.reshape(3, 4)
    if bad == "labels":
        with pytest.raises(ValueError, match=r"labels.*\(3, 4\)"):
            linear_softmax_cross_entropy(x3, w, labels.reshape(4, 3))
        with pytest.raises(ValueError, match="labels"):
            linear_softmax_cross_entropy(x3, w, labels)
    elif bad == "teacher_x":
        with pytest.raises(ValueError, match=r"teacher_x.*\(3, 4\)"):
            linear_softmax_distillation(x3, w, x.reshape(4, 3, 4), tw, labels=y3)
    else:
        with pytest.raises(ValueError, match="x must"):
            linear_softmax_cross_entropy(x[0], w, labels[0])


def test_concrete_infinite_temperature_raises():
    # Refused at call time, not a NaN loss.
    x, w, tw, _ = _small()
    with pytest.raises(ValueError, match="temperature"):
        linear_softmax_distillation(x, w, x, tw, temperature=float("inf"))


@functools.partial(jax.jit, static_argnames=("reduction",))
def _both_losses_and_dx(x, w, tw, labels, *, reduction):
    ce = linear_softmax_cross_entropy(x, w, labels, reduction=reduction)
    kd = linear_softmax_distillation(x, w, x, tw, reduction=reduction)
    dx = jax.grad(lambda x: jnp.sum(linear_softmax_cross_entropy(
        x, w, labels, reduction=reduction)).astype(jnp.float32))(x)
    return ce, kd, dx


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float64])
def test_result_dtype_under_x64(x64, dtype, reduction):
    x, w, tw, labels = _small()
    x, w, tw = (a.astype(dtype) for a in (x, w, tw))
    ce, kd, dx = _both_losses_and_dx(x, w, tw, labels, reduction=reduction)
    expected = jnp.promote_types(dtype, jnp.float32)
    assert ce.dtype == expected and kd.dtype == expected
    assert dx.dtype == dtype
