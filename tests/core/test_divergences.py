"""``distillation_loss`` (forward KL, reverse KL, JSD), ``kl_divergence`` and
``kl_divergence_with_log_targets`` against float64 NumPy, jax.grad of the plain formulas,
PyTorch's ``F.kl_div`` and optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from _cross_entropy_inputs import np_softmax_rows, random_logits
from _inputs import device, set_at
from _residuals import saved_residuals
from hypothesis import example, given, settings
from hypothesis import strategies as st

import softmax_jax as sj
from softmax_jax import _distillation_terms as terms
from softmax_jax import reference
from softmax_jax import reference as ref

S_MASKED = np.array([[0.5, 1.0, 2.0, -np.inf], [0.1, -0.4, 0.3, 1.1]])


T_TINY = np.array([[0.3, 1.2, 1.8, -1e9], [-0.2, 0.5, -1e9, 0.7]])


@pytest.mark.parametrize("kind,beta", [("forward", 0.0), ("reverse", 1.0), ("jsd", 0.3)])
@pytest.mark.parametrize("swap", [False, True])
def test_distillation_minus_inf_against_an_underflowing_probability(x64, kind, beta, swap):
    s, t = (T_TINY, S_MASKED) if swap else (S_MASKED, T_TINY)
    temperature = 1.7

    def ours(s, t, temp, b):
        return sj.distillation_loss(s, t, temperature=temp, beta=b if kind == "jsd" else beta)

    def plain(s, t, temp, b):
        return reference.distillation_of_logits(s, t, temp, b, kind)

    args32 = (jnp.float32(temperature), jnp.float32(beta))
    s32, t32 = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    got = sj.distillation_loss(s32, t32, temperature=temperature, beta=beta)
    want = plain(jnp.asarray(s), jnp.asarray(t), temperature, beta)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    argnums = (0, 1, 2, 3) if kind == "jsd" else (0, 1, 2)
    g_got = jax.grad(lambda *a: ours(*a).sum(), argnums)(s32, t32, *args32)
    g_want = jax.grad(lambda *a: plain(*a).sum(), argnums)(
        jnp.asarray(s), jnp.asarray(t), jnp.float64(temperature), jnp.float64(beta))
    for a, b in zip(g_got, g_want, strict=True):
        assert np.isfinite(b).all()
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_distillation_with_an_underflowing_teacher_matches_the_kl_divergence():
    s = jnp.array([[0.5, 1.0, 2.0, -jnp.inf]])
    t = jnp.array([[0.3, 1.2, 1.8, -150.0]])  # exp underflows in float32
    want = sj.kl_divergence(sj.log_softmax(s), sj.softmax(t))
    np.testing.assert_allclose(sj.distillation_loss(s, t), want, rtol=1e-6)
    np.testing.assert_allclose(sj.distillation_loss(s, t), 0.01618, rtol=1e-3)
    assert np.isfinite(sj.distillation_loss(t, s, beta=1.0)).all()


def test_kl_with_log_targets_underflowing_target_against_minus_inf():
    log_a = jnp.array([[-0.1, -2.5, -jnp.inf]])
    log_y = jnp.array([[-0.05, -3.0, -1e9]])  # exp(-1e9) == 0: adds 0, like a -inf target
    want = optax.losses.kl_divergence_with_log_targets(log_a[:, :2], log_y[:, :2])
    np.testing.assert_allclose(sj.kl_divergence_with_log_targets(log_a, log_y), want,
                               rtol=1e-6)
    g_a, g_y = jax.grad(lambda a, y: sj.kl_divergence_with_log_targets(a, y).sum(),
                        (0, 1))(log_a, log_y)
    assert np.isfinite(g_a).all() and np.isfinite(g_y).all()
    assert g_a[0, 2] == 0.0 and g_y[0, 2] == 0.0


def test_infinite_temperature_raises_and_traced_gives_nan():
    s, t = random_logits(2, 3), random_logits(2, 3, seed=1)
    with pytest.raises(ValueError, match="temperature"):
        sj.distillation_loss(s, t, temperature=float("inf"))
    with pytest.raises(ValueError, match="temperature"):
        sj.distillation_loss(s, t, temperature=jnp.inf)
    traced = jax.jit(lambda temp: sj.distillation_loss(s, t, temperature=temp))
    assert np.isnan(traced(jnp.inf)).all()
    assert np.isnan(jax.grad(lambda temp: traced(temp).sum())(jnp.inf))


N, V = 5, 7


CASES = [(0.0, 1.0), (0.0, 2.5), (1.0, 1.0), (1.0, 0.7), (0.3, 1.0), (0.5, 2.0), (0.9, 0.5)]


def _logits(dtype=jnp.float32, seed=0, shape=(N, V), scale=2.0):
    """Student and teacher logits, ``scale * N(0, 1)`` (NumPy draws: nothing to compile)."""
    rng = np.random.default_rng(seed)
    return device(scale * rng.standard_normal(shape), dtype), device(
        scale * rng.standard_normal(shape), dtype)


def _weighted(fn):
    """``sum_i w_i fn(...)_i`` with unequal weights, so that a wrong cotangent shows."""
    def total(*args):
        out = fn(*args)
        return jnp.sum(out * jnp.arange(1.0, 1.0 + out.size).reshape(out.shape))
    return total


@pytest.mark.parametrize("beta,temperature", CASES)
def test_distillation_values_against_float64_numpy(beta, temperature):
    s, t = _logits(scale=3.0)
    got = sj.distillation_loss(s, t, temperature=temperature, beta=beta)
    np.testing.assert_allclose(got, ref.np_distillation(s, t, temperature, beta), rtol=2e-5,
                               atol=1e-6)


@pytest.mark.parametrize("beta,temperature", CASES)
def test_distillation_gradients_match_reference_float64(x64, beta, temperature):
    s, t = _logits(jnp.float64, seed=1)
    ours = _weighted(lambda s, t, T, b: sj.distillation_loss(s, t, temperature=T, beta=b))
    if beta in (0.0, 1.0):
        fn = ref.forward_kl_distillation if beta == 0 else ref.reverse_kl_distillation
        plain = _weighted(lambda s, t, T, b: fn(s, t, -1, T))
    else:
        plain = _weighted(lambda s, t, T, b: ref.jsd_distillation(s, t, -1, T, b))
    argnums = (0, 1, 2) if beta in (0.0, 1.0) else (0, 1, 2, 3)
    args = (s, t, jnp.float64(temperature), jnp.float64(beta))
    np.testing.assert_allclose(ours(*args), plain(*args), rtol=1e-12)
    got = jax.grad(ours, argnums=argnums)(*args)
    want = jax.grad(plain, argnums=argnums)(*args)
    for name, g, w in zip(["student", "teacher", "temperature", "beta"][:len(got)], got, want,
                          strict=True):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_second_derivatives_match_reference_float64(x64, beta):
    """The rules are differentiable jnp, so reverse-over-reverse and jax.hessian work."""
    s, t = _logits(jnp.float64, seed=16, shape=(3, 5))
    ours = lambda s, t: sj.distillation_loss(s, t, temperature=1.7, beta=beta).sum()  # noqa: E731
    plain = lambda s, t: ref.distillation_loss(s, t, -1, 1.7, beta).sum()  # noqa: E731
    for arg in (0, 1):
        want = jax.hessian(plain, argnums=arg)(s, t)
        np.testing.assert_allclose(jax.hessian(ours, argnums=arg)(s, t), want, atol=1e-12)
        np.testing.assert_allclose(jax.jacrev(jax.grad(ours, argnums=arg), argnums=arg)(s, t),
                                   want, atol=1e-12)


def test_zero_rows_give_a_zero_length_result():
    empty = jnp.zeros((0, V))
    assert sj.distillation_loss(empty, empty, beta=0.5).shape == (0,)
    assert sj.kl_divergence(empty, empty).shape == (0,)


def test_student_gradient_is_temperature_times_q_minus_p():
    s, t = _logits(seed=2)
    temperature = 3.0
    g = jax.grad(lambda s: sj.distillation_loss(s, t, temperature=temperature).sum())(s)
    p, q = jax.nn.softmax(t / temperature), jax.nn.softmax(s / temperature)
    np.testing.assert_allclose(g, temperature * (q - p), atol=1e-6)
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-6)


def test_forward_kl_matches_pytorch_kl_div():
    s, t = _logits(seed=3, scale=4.0)
    temperature = 2.0
    s_t = torch.tensor(np.asarray(s), requires_grad=True)
    log_q = torch.log_softmax(s_t / temperature, -1)
    p = torch.softmax(torch.tensor(np.asarray(t)) / temperature, -1)
    want = temperature**2 * torch.nn.functional.kl_div(log_q, p, reduction="none").sum(-1)
    want.sum().backward()
    loss, grad = jax.value_and_grad(
        lambda s: sj.distillation_loss(s, t, temperature=temperature).sum())(s)
    np.testing.assert_allclose(sj.distillation_loss(s, t, temperature=temperature),
                               want.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, s_t.grad.numpy(), atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_traced_beta_gives_the_static_results(beta):
    s, t = _logits(seed=4)
    static = lambda s, t: sj.distillation_loss(s, t, temperature=1.5, beta=beta)  # noqa: E731
    traced = jax.jit(lambda s, t, b: sj.distillation_loss(s, t, temperature=1.5, beta=b))
    np.testing.assert_allclose(traced(s, t, beta), static(s, t), rtol=1e-6)
    g_static = jax.grad(_weighted(static), argnums=(0, 1))(s, t)
    g_traced = jax.grad(_weighted(traced), argnums=(0, 1))(s, t, jnp.float32(beta))
    for a, b in zip(g_traced, g_static, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_beta_derivative_is_nan_at_the_jumps_and_exact_inside():
    s, t = _logits(seed=5)
    d_beta = jax.grad(lambda b: sj.distillation_loss(s, t, beta=b).sum())
    for b in (0.0, 1.0):
        assert np.isnan(d_beta(b)), b
        # the logit gradients stay finite: only the beta derivative is undefined
        g = jax.grad(lambda s, b: sj.distillation_loss(s, t, beta=b).sum())(s, b)
        assert np.all(np.isfinite(g))
    eps = 1e-3
    f = lambda b: float(sj.distillation_loss(s, t, beta=b).sum())  # noqa: E731
    np.testing.assert_allclose(d_beta(0.5), (f(0.5 + eps) - f(0.5 - eps)) / (2 * eps), rtol=1e-3)
    # the jump itself: the JSD tends to 0 at both ends, the definition switches to a KL
    assert f(1e-6) < 1e-4 * f(0.0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_temperature_derivative_is_exact_not_zero(beta):
    s, t = _logits(seed=6)
    f = lambda T: sj.distillation_loss(s, t, temperature=T, beta=beta).sum()  # noqa: E731
    eps = 1e-3
    fd = (f(2.0 + eps) - f(2.0 - eps)) / (2 * eps)
    got = jax.grad(f)(2.0)
    assert abs(got) > 1e-2
    np.testing.assert_allclose(got, fd, rtol=2e-3)


@pytest.mark.parametrize("kwargs,name", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"beta": -0.1}, "beta"), ({"beta": 1.5}, "beta"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_concrete_out_of_range_hyperparameters_raise(kwargs, name):
    s, t = _logits()
    with pytest.raises(ValueError, match=name):
        sj.distillation_loss(s, t, **kwargs)


@pytest.mark.parametrize("temperature,beta", [(0.0, 0.0), (-2.0, 0.5), (1.0, -0.1), (1.0, 1.5),
                                              (float("nan"), 0.5)])
def test_traced_out_of_range_hyperparameters_give_nan(temperature, beta):
    s, t = _logits()
    f = jax.jit(lambda s, t, T, b: sj.distillation_loss(s, t, temperature=T, beta=b))
    assert np.all(np.isnan(f(s, t, temperature, beta)))
    grads = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2, 3))(s, t, temperature, beta)
    for g in grads:
        assert np.all(np.isnan(g))


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_neg_inf_teacher_logit_gives_finite_loss_and_gradients(beta):
    s, t = _logits(seed=7)
    t = set_at(set_at(t, (slice(None), 2), -np.inf), (0, 4), -np.inf)
    loss = sj.distillation_loss(s, t, temperature=2.0, beta=beta)
    np.testing.assert_allclose(loss, ref.np_distillation(s, t, 2.0, beta), rtol=2e-5)
    grads = jax.grad(_weighted(lambda s, t, T, b: sj.distillation_loss(
        s, t, temperature=T, beta=b)), argnums=(0, 1, 2, 3))(s, t, 2.0, beta)
    for g in grads[:3]:
        assert np.all(np.isfinite(g))
    assert np.all(grads[1][:, 2] == 0)  # a class with teacher probability 0 stays at 0
    if beta == 0.0:
        p, q = jax.nn.softmax(t / 2.0), jax.nn.softmax(s / 2.0)
        np.testing.assert_allclose(grads[0], 2.0 * (q - p) * jnp.arange(1.0, N + 1)[:, None],
                                   atol=1e-5)


def test_neg_inf_student_logit_under_teacher_mass_is_infinite_not_nan():
    s, t = _logits(seed=8)
    s = set_at(s, (1, 3), -np.inf)
    loss = sj.distillation_loss(s, t)
    assert loss[1] == np.inf
    np.testing.assert_allclose(np.delete(np.asarray(loss), 1), np.delete(
        ref.np_distillation(s, t, 1.0, 0.0), 1), rtol=2e-5)
    g = jax.grad(lambda s: sj.distillation_loss(s, t).sum())(s)
    np.testing.assert_allclose(g, jax.nn.softmax(s) - jax.nn.softmax(t), atol=1e-6)
    # the reverse KL is finite there (q = 0 adds nothing), and the JSD always is
    assert np.isfinite(sj.distillation_loss(s, t, beta=1.0)[1])
    assert np.isfinite(sj.distillation_loss(s, t, beta=0.5)[1])


@pytest.mark.parametrize("beta", [0.0, 0.6, 1.0])
def test_where_equals_slicing_classes_away(beta):
    s, t = _logits(seed=9)
    keep = np.array([True, False, True, True, False, True, True])
    s = set_at(s, (slice(None), 1), np.nan)  # a masked NaN must never reach a value or a gradient
    f = lambda s, t: sj.distillation_loss(  # noqa: E731
        s, t, where=jnp.asarray(keep), temperature=1.7, beta=beta)
    g = lambda s, t: sj.distillation_loss(s, t, temperature=1.7, beta=beta)  # noqa: E731
    np.testing.assert_allclose(f(s, t), g(s[:, keep], t[:, keep]), rtol=1e-5)
    gm = jax.grad(_weighted(f), argnums=(0, 1))(s, t)
    gs = jax.grad(_weighted(g), argnums=(0, 1))(s[:, keep], t[:, keep])
    for a, b in zip(gm, gs, strict=True):
        np.testing.assert_allclose(a[:, keep], b, rtol=1e-5, atol=1e-7)
        assert np.all(a[:, ~keep] == 0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fully_masked_row_gives_zero_loss_and_zero_gradients(beta):
    s, t = _logits(seed=10)
    s = set_at(s, (1, 0), np.nan)  # the masked row's NaN must not leak either
    rows = jnp.array([True, False, True, True, True])[:, None]  # a per-row mask is (N, 1)
    f = lambda s, t, T: sj.distillation_loss(s, t, where=rows, temperature=T,  # noqa: E731
                                             beta=beta)
    loss = f(s, t, 2.0)
    assert loss[1] == 0
    np.testing.assert_allclose(np.delete(np.asarray(loss), 1), np.delete(
        np.asarray(sj.distillation_loss(s, t, temperature=2.0, beta=beta)), 1), rtol=1e-6)
    gs, gt, g_temp = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(s, t, 2.0)
    assert np.all(gs[1] == 0) and np.all(gt[1] == 0) and np.isfinite(g_temp)
    g_rest = jax.grad(lambda T: sj.distillation_loss(s[2:], t[2:], temperature=T,
                                                     beta=beta).sum())(2.0)
    g_first = jax.grad(lambda T: sj.distillation_loss(s[:1], t[:1], temperature=T,
                                                      beta=beta).sum())(2.0)
    np.testing.assert_allclose(g_temp, g_rest + g_first, rtol=1e-5)


@pytest.mark.parametrize("axis", [(1, 2), (2, 0), None])
def test_tuple_and_none_axes_equal_flattening(axis):
    s, t = _logits(seed=11, shape=(3, 4, 5))
    got = sj.distillation_loss(s, t, axis=axis, temperature=1.3, beta=0.25)
    axes = (0, 1, 2) if axis is None else axis
    rest = [d for d in range(3) if d not in axes]
    flat = lambda x: jnp.transpose(x, rest + list(axes)).reshape(  # noqa: E731
        tuple(x.shape[d] for d in rest) + (-1,))
    want = sj.distillation_loss(flat(s), flat(t), temperature=1.3, beta=0.25)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    g = jax.grad(lambda s: sj.distillation_loss(s, t, axis=axis, beta=0.25).sum())(s)
    g_flat = jax.grad(lambda s: sj.distillation_loss(flat(s), flat(t), beta=0.25).sum())(s)
    np.testing.assert_allclose(g, g_flat, atol=1e-7)


def test_mask_with_tuple_axes_equals_flattened_mask():
    s, t = _logits(seed=17, shape=(3, 4, 5))
    keep = np.random.default_rng(3).random((3, 4, 5)) < 0.7
    keep[:, 0, 0] = True
    got = sj.distillation_loss(s, t, axis=(2, 1), where=keep, beta=0.5)
    flat = lambda x: jnp.transpose(x, (0, 2, 1)).reshape(3, 20)  # noqa: E731
    want = sj.distillation_loss(flat(s), flat(t), where=flat(keep), beta=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_mixed_dtypes_and_mismatched_shapes():
    s, t = _logits(seed=18)
    loss = sj.distillation_loss(s.astype(jnp.bfloat16), t)
    assert loss.dtype == jnp.float32
    gs, gt = jax.grad(lambda s, t: sj.distillation_loss(s, t).sum(), argnums=(0, 1))(
        s.astype(jnp.bfloat16), t)
    assert gs.dtype == jnp.bfloat16 and gt.dtype == jnp.float32
    with pytest.raises(ValueError, match="same shape"):
        sj.distillation_loss(s, t[:, :3])
    with pytest.raises(TypeError, match="teacher_logits"):
        sj.distillation_loss(s, jnp.ones((N, V), jnp.int32))


def test_middle_axis_equals_moveaxis():
    s, t = _logits(seed=12, shape=(3, V, 2))
    got = sj.distillation_loss(s, t, axis=1, beta=0.5)
    want = sj.distillation_loss(jnp.moveaxis(s, 1, -1), jnp.moveaxis(t, 1, -1), beta=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    s, t = _logits(seed=13)
    s_lo, t_lo = s.astype(dtype), t.astype(dtype)
    f = lambda s, t, T: sj.distillation_loss(s, t, temperature=T, beta=0.3)  # noqa: E731
    loss = f(s_lo, t_lo, 2.0)
    assert loss.dtype == dtype
    want = f(s_lo.astype(jnp.float32), t_lo.astype(jnp.float32), 2.0)
    np.testing.assert_allclose(loss.astype(jnp.float32), want, rtol=1e-2)
    gs, gt, g_temp = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(s_lo, t_lo, 2.0)
    assert gs.dtype == dtype and gt.dtype == dtype
    ws, wt, w_temp = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(
        s_lo.astype(jnp.float32), t_lo.astype(jnp.float32), 2.0)
    np.testing.assert_allclose(gs.astype(jnp.float32), ws, atol=1e-2)
    np.testing.assert_allclose(gt.astype(jnp.float32), wt, atol=1e-2)
    np.testing.assert_allclose(g_temp, w_temp, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_saves_no_n_by_v_tensor_beyond_its_inputs(beta):
    n, v = 16, 64
    s, t = _logits(shape=(n, v))
    res = saved_residuals(
        lambda s, t: sj.distillation_loss(s, t, temperature=2.0, beta=beta).sum(), s, t)
    big = [why for shape, why in res if int(np.prod(shape)) >= n * v]
    assert len(big) == 2 and all("argument" in why for why in big), res
    extra = sum(int(np.prod(shape)) for shape, why in res if "argument" not in why)
    assert extra <= 8 * n + 8, res  # two normalisers (m, log s, s) and the two KL row sums


def test_jit_and_vmap():
    s, t = _logits(seed=14)
    per_row = jax.jit(jax.vmap(lambda s, t: sj.distillation_loss(s, t, beta=0.5)))
    np.testing.assert_allclose(per_row(s, t), sj.distillation_loss(s, t, beta=0.5), rtol=1e-6)
    schedule = jnp.array([0.0, 0.2, 1.0])  # vmap over beta: each value takes its own case
    over_beta = jax.vmap(lambda b: sj.distillation_loss(s, t, beta=b))(schedule)
    for b, row in zip([0.0, 0.2, 1.0], over_beta, strict=True):
        np.testing.assert_allclose(row, sj.distillation_loss(s, t, beta=b), rtol=1e-5)
    g = jax.vmap(jax.grad(lambda s, t: sj.distillation_loss(s, t, temperature=2.0)))(s, t)
    np.testing.assert_allclose(g, 2.0 * (jax.nn.softmax(s / 2) - jax.nn.softmax(t / 2)),
                               atol=1e-6)


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("beta_value", [0.0, 0.35, 1.0])
def test_blockwise_use_of_the_terms_module_equals_the_loss(beta_value, traced):
    """The fused engine's recipe (docstring of _distillation_terms), over two class blocks."""
    s, t = _logits(seed=15, shape=(4, 10))
    temperature, g = jnp.float32(1.5), jnp.arange(1.0, 5.0)[:, None]
    beta = jnp.float32(beta_value)
    kind = "traced" if traced else terms.kind_of(beta_value)
    log_q = jax.nn.log_softmax(s / temperature)
    log_p = jax.nn.log_softmax(t / temperature)
    blocks = [slice(0, 6), slice(6, 10)]
    kl_p = jnp.zeros((4, 1))
    kl_q = jnp.zeros((4, 1))
    for b in blocks:
        log_m = terms.log_mixture(log_p[:, b], log_q[:, b], beta, kind)
        part = terms.RowSums.of(terms.element_terms(log_p[:, b], log_q[:, b], log_m, kind), -1)
        kl_p, kl_q = kl_p + part.kl_p, kl_q + part.kl_q
    rows = terms.RowSums(kl_p, kl_q)
    div = terms.divergence(rows, beta, kind)
    want = sj.distillation_loss(s, t, temperature=temperature, beta=beta_value)
    np.testing.assert_allclose(temperature**2 * div[:, 0], want, rtol=1e-6)
    ds, dt, t_sum = [], [], 0.0
    for b in blocks:
        log_m = terms.log_mixture(log_p[:, b], log_q[:, b], beta, kind)
        ds.append(terms.student_grad(log_p[:, b], log_q[:, b], log_m, rows, beta, kind))
        dt.append(terms.teacher_grad(log_p[:, b], log_q[:, b], log_m, rows, beta, kind))
        t_sum = t_sum + jnp.sum(terms.temperature_term(
            ds[-1], log_q[:, b], dt[-1], log_p[:, b]), -1, keepdims=True)
    d_temp = jnp.sum(g * terms.temperature_cotangent(temperature, div, t_sum))
    want_s, want_t, want_temp = jax.grad(
        lambda s, t, T: jnp.sum(g[:, 0] * sj.distillation_loss(
            s, t, temperature=T, beta=beta_value)), argnums=(0, 1, 2))(s, t, temperature)
    np.testing.assert_allclose(g * temperature * jnp.concatenate(ds, -1), want_s, atol=1e-6)
    np.testing.assert_allclose(g * temperature * jnp.concatenate(dt, -1), want_t, atol=1e-6)
    np.testing.assert_allclose(d_temp, want_temp, rtol=1e-5)
    d_beta = jnp.sum(g * terms.beta_cotangent(temperature, rows, beta, kind))
    if beta_value in (0.0, 1.0):
        assert np.isnan(d_beta)
    else:
        want_beta = jax.grad(lambda b: jnp.sum(g[:, 0] * sj.distillation_loss(
            s, t, temperature=temperature, beta=b)))(beta)
        np.testing.assert_allclose(d_beta, want_beta, rtol=1e-5)


def test_kind_of_and_hyperparameters():
    assert [terms.kind_of(b) for b in (0, 0.0, 1, 0.5, np.float32(1.0))] == [
        "forward", "forward", "reverse", "jsd", "reverse"]
    kinds = []
    jax.jit(lambda b: kinds.append(terms.kind_of(b)) or b)(0.0)
    assert kinds == ["traced"]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        terms.hyperparameters(0, 0.5)


# Each new shape compiles new programs: 10 random examples over a few shapes (the values
# are drawn afresh for each), and the edges always run.
@settings(max_examples=10, deadline=None)
@given(shape=st.sampled_from([(1, 2), (2, 5), (3, 7), (4, 9)]),
       scale=st.sampled_from([0.1, 3.0, 30.0]),
       beta=st.sampled_from([0.0, 0.1, 0.5, 1.0]), temperature=st.sampled_from([0.5, 1.0, 4.0]),
       seed=st.integers(0, 2**16))
@example(shape=(1, 2), scale=30.0, beta=0.1, temperature=0.5, seed=0)
@example(shape=(4, 9), scale=30.0, beta=1.0, temperature=4.0, seed=1)
@example(shape=(3, 7), scale=3.0, beta=0.0, temperature=1.0, seed=2)
@example(shape=(2, 5), scale=0.1, beta=0.5, temperature=0.5, seed=3)
def test_property_matches_numpy_float64(shape, scale, beta, temperature, seed):
    s, t = _logits(seed=seed, shape=shape, scale=scale)
    want = ref.np_distillation(s, t, temperature, beta)
    got = sj.distillation_loss(s, t, temperature=temperature, beta=beta)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(want.max())))
    g = jax.grad(lambda s: sj.distillation_loss(s, t, temperature=temperature, beta=beta).sum())(s)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-5 * max(1.0, scale))


def _kl_inputs(seed=20, shape=(N, V)):
    """Log-predictions and target probabilities (rows of softmaxes of normal draws)."""
    rng = np.random.default_rng(seed)
    log_a = np.log(np_softmax_rows(rng.standard_normal(shape)))
    y = np_softmax_rows(2.0 * rng.standard_normal(shape))
    return device(log_a, np.float32), device(y, np.float32)


@pytest.mark.parametrize("axis,where", [
    (-1, None), (0, None), ((0, 1), None), (None, None),
    (-1, np.array([True, False, True, True, True, False, True])),
    (-1, np.array([True, True, False, True, True])[:, None]),
])
def test_kl_divergence_matches_optax(axis, where):
    log_a, y = _kl_inputs()
    pairs = [
        (sj.kl_divergence, optax.losses.kl_divergence, y),
        (sj.kl_divergence_with_log_targets, optax.losses.kl_divergence_with_log_targets,
         jnp.log(y)),
    ]
    for ours, theirs, targets in pairs:
        ours_at = _weighted(lambda a, b, f=ours: f(a, b, axis, where))
        theirs_at = _weighted(lambda a, b, f=theirs: f(a, b, axis, where))
        # optax's side as one compiled program each (op by op, every operation compiles)
        np.testing.assert_allclose(ours(log_a, targets, axis, where), jax.jit(
            lambda a, b, f=theirs: f(a, b, axis, where))(log_a, targets), rtol=1e-6, atol=1e-7)
        got = jax.grad(ours_at, argnums=(0, 1))(log_a, targets)
        want = jax.jit(jax.grad(theirs_at, argnums=(0, 1)))(log_a, targets)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_kl_divergence_broadcasts_like_optax():
    log_a, y = _kl_inputs(shape=(4, V))
    row = y[0]
    np.testing.assert_allclose(sj.kl_divergence(log_a, row), optax.losses.kl_divergence(
        log_a, row), rtol=1e-6)
    g = jax.grad(lambda y: sj.kl_divergence(log_a, y).sum())(row)
    w = jax.grad(lambda y: optax.losses.kl_divergence(log_a, y).sum())(row)
    assert g.shape == row.shape
    np.testing.assert_allclose(g, w, rtol=1e-5)
    with pytest.raises(ValueError, match="broadcast"):
        sj.kl_divergence(log_a, y[:, :3])


def test_kl_zero_targets_follow_optax_and_the_0_log_0_convention():
    log_a = jnp.log(jnp.array([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]]))
    y = jnp.array([[0.0, 0.4, 0.6], [0.1, 0.3, 0.6]])
    np.testing.assert_allclose(sj.kl_divergence(log_a, y), optax.losses.kl_divergence(log_a, y),
                               rtol=1e-6)
    d_log_a = jax.grad(lambda a: sj.kl_divergence(a, y).sum())(log_a)
    np.testing.assert_allclose(d_log_a, -y)
    d_y = jax.grad(lambda y: sj.kl_divergence(log_a, y).sum())(y)
    np.testing.assert_allclose(d_y[1], jnp.log(y[1]) + 1 - log_a[1], rtol=1e-6)
    assert d_y[0, 0] == -np.inf  # the one-sided derivative of y log y at 0 (optax: NaN)
    # where optax gives 0 * inf = NaN, the convention 0 log 0 = 0 gives the limit
    log_a_inf = set_at(log_a, (0, 0), -np.inf)
    assert np.isnan(optax.losses.kl_divergence(log_a_inf, y)[0])
    np.testing.assert_allclose(sj.kl_divergence(log_a_inf, y)[0], sj.kl_divergence(log_a, y)[0])
    log_y = jnp.log(y)
    assert np.isnan(optax.losses.kl_divergence_with_log_targets(log_a, log_y)[0])
    np.testing.assert_allclose(sj.kl_divergence_with_log_targets(log_a, log_y),
                               sj.kl_divergence(log_a, y), rtol=1e-6)
    d_log_y = jax.grad(lambda b: sj.kl_divergence_with_log_targets(log_a, b).sum())(log_y)
    assert d_log_y[0, 0] == 0 and np.all(np.isfinite(d_log_y))
    # a target with mass on a zero prediction: +inf, as in optax
    assert sj.kl_divergence(log_a_inf, y[::-1])[0] == np.inf


def test_kl_where_drops_nan_entries_from_values_and_gradients():
    log_a, y = _kl_inputs()
    log_a = set_at(log_a, (slice(None), 1), np.nan)
    keep = np.arange(V) != 1
    got = sj.kl_divergence(log_a, y, where=jnp.asarray(keep))
    np.testing.assert_allclose(got, sj.kl_divergence(log_a[:, keep], y[:, keep]), rtol=1e-6)
    ga, gy = jax.grad(lambda a, b: sj.kl_divergence(a, b, where=jnp.asarray(keep)).sum(),
                      argnums=(0, 1))(log_a, y)
    assert np.all(ga[:, 1] == 0) and np.all(gy[:, 1] == 0) and np.all(np.isfinite(gy))


def test_kl_divergence_against_plain_formula_float64(x64):
    log_a, y = _kl_inputs(seed=21)
    log_a, y = log_a.astype(jnp.float64), y.astype(jnp.float64)
    for ours, plain, b in [(sj.kl_divergence, ref.kl_divergence, y),
                           (sj.kl_divergence_with_log_targets, ref.kl_divergence_with_log_targets,
                            jnp.log(y))]:
        np.testing.assert_allclose(ours(log_a, b), plain(log_a, b), rtol=1e-13)
        got = jax.grad(_weighted(ours), argnums=(0, 1))(log_a, b)
        want = jax.grad(_weighted(plain), argnums=(0, 1))(log_a, b)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-12)


def test_kl_low_precision_and_type_errors():
    log_a, y = _kl_inputs()
    out = sj.kl_divergence(log_a.astype(jnp.bfloat16), y.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), sj.kl_divergence(
        log_a.astype(jnp.bfloat16).astype(jnp.float32), y.astype(jnp.bfloat16).astype(
            jnp.float32)), rtol=1e-2)
    with pytest.raises(TypeError, match="targets"):
        sj.kl_divergence(log_a, jnp.ones((N, V), jnp.int32))
