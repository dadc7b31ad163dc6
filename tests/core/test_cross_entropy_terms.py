"""The per-row terms that the cross-entropies share (label smoothing, z-loss, class
weights): values and derivatives in every argument, against PyTorch, float64 plain
formulas and finite differences, including logits near the float range."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from _cross_entropy_inputs import CLASSES, ROWS, WEIGHTS, N, V, data, numpy_data, random_logits

import softmax_jax as sj
from softmax_jax import reference


def test_label_smoothing_follows_pytorch_formula():
    # PyTorch: (1 - eps) * nll + eps / K * sum_c (-log p_c), computed here in float64 NumPy.
    logits, labels, _ = data(seed=9)
    eps = 0.15
    logp = reference.np_log_softmax(logits)
    nll = -logp[np.arange(N), np.asarray(labels)]
    want = (1 - eps) * nll + eps / V * (-logp).sum(1)
    got = sj.softmax_cross_entropy_with_integer_labels(logits, labels, label_smoothing=eps)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_z_loss_adds_lse_squared():
    logits, labels, _ = data(seed=10)
    lam = 1e-3
    base = sj.softmax_cross_entropy_with_integer_labels(logits, labels)
    got = sj.softmax_cross_entropy_with_integer_labels(logits, labels, z_loss=lam)
    np.testing.assert_allclose(got - base, lam * jax.nn.logsumexp(logits, -1) ** 2, rtol=1e-4)


@pytest.mark.parametrize("eps,lam", [(0.0, 0.0), (0.15, 0.0), (0.15, 0.05)])
def test_gradients_of_every_argument_match_the_plain_formula_float64(x64, eps, lam):
    logits, labels, soft = numpy_data(seed=2, dtype=np.float64)
    w = jnp.asarray(WEIGHTS)
    cot = jnp.linspace(0.5, 2.0, ROWS)
    for ours, plain, target in [
        (sj.softmax_cross_entropy_with_integer_labels,
         reference.weighted_softmax_cross_entropy_with_integer_labels, jnp.asarray(labels)),
        (sj.softmax_cross_entropy, reference.weighted_softmax_cross_entropy, jnp.asarray(soft)),
    ]:
        def f(z, w, e, la, ours=ours, target=target):
            return jnp.vdot(ours(z, target, label_smoothing=e, z_loss=la, class_weights=w), cot)

        def g(z, w, e, la, plain=plain, target=target):
            return jnp.vdot(plain(z, target, w, e, la), cot)

        args = (jnp.asarray(logits), w, jnp.float64(eps), jnp.float64(lam))
        np.testing.assert_allclose(f(*args), g(*args), rtol=1e-12)
        got = jax.grad(f, argnums=(0, 1, 2, 3))(*args)
        want = jax.grad(g, argnums=(0, 1, 2, 3))(*args)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_hyperparameter_gradients_match_finite_differences(x64):
    """The loss is linear in both: a central difference is exact up to rounding."""
    logits, labels, soft = numpy_data(seed=3, dtype=np.float64)
    for loss in (
        lambda e, la: sj.softmax_cross_entropy_with_integer_labels(
            logits, labels, label_smoothing=e, z_loss=la).sum(),
        lambda e, la: sj.softmax_cross_entropy(
            logits, soft, label_smoothing=e, z_loss=la).sum(),
    ):
        d_eps, d_lam = jax.grad(loss, argnums=(0, 1))(0.1, 0.01)
        h = 1e-4
        fd_eps = (loss(0.1 + h, 0.01) - loss(0.1 - h, 0.01)) / (2 * h)
        fd_lam = (loss(0.1, 0.01 + h) - loss(0.1, 0.01 - h)) / (2 * h)
        assert abs(d_eps) > 0.1 and abs(d_lam) > 1.0
        np.testing.assert_allclose([d_eps, d_lam], [fd_eps, fd_lam], rtol=1e-7)


def test_class_weights_on_a_tuple_axis_are_per_flattened_class():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 4))
    labels = jnp.array([0, 5, 7])
    w = jnp.linspace(0.2, 1.6, 8)
    got = sj.softmax_cross_entropy_with_integer_labels(x, labels, (1, 2), class_weights=w)
    want = sj.softmax_cross_entropy_with_integer_labels(x.reshape(3, 8), labels, class_weights=w)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, w[labels] * optax.softmax_cross_entropy_with_integer_labels(
        x, labels, (1, 2)), rtol=1e-5)


def test_class_weights_are_checked():
    logits, labels, soft = numpy_data()
    with pytest.raises(ValueError, match="class_weights"):
        sj.softmax_cross_entropy_with_integer_labels(logits, labels,
                                                     class_weights=np.ones(CLASSES + 1))
    with pytest.raises(ValueError, match="class_weights"):
        sj.softmax_cross_entropy(logits, soft, class_weights=np.ones((1, CLASSES)))
    with pytest.raises(TypeError, match="class_weights"):
        sj.softmax_cross_entropy_with_integer_labels(logits, labels,
                                                     class_weights=np.ones(CLASSES, int))


def test_traced_zero_hyperparameters_match_the_literal_zero():
    z = jnp.array([[0.0, 1.0, -jnp.inf]])
    literal = sj.softmax_cross_entropy_with_integer_labels(z, jnp.array([1]))
    np.testing.assert_allclose(literal, [0.3133], atol=1e-4)
    traced = jax.jit(lambda e: sj.softmax_cross_entropy_with_integer_labels(
        z, jnp.array([1]), label_smoothing=e))
    np.testing.assert_array_equal(traced(0.0), literal)
    mapped = jax.vmap(lambda e: sj.softmax_cross_entropy_with_integer_labels(
        z, jnp.array([1]), label_smoothing=e))(jnp.array([0.0, 0.1]))
    np.testing.assert_array_equal(mapped[0], literal)
    assert np.isposinf(mapped[1, 0])  # smoothing puts mass on a class of probability 0
    empty = jnp.full((1, 3), -jnp.inf)
    for loss in (
        lambda la: sj.softmax_cross_entropy_with_integer_labels(empty, jnp.array([0]), z_loss=la),
        lambda la: sj.softmax_cross_entropy(empty, jnp.array([[0.0, 0.0, 0.0]]), z_loss=la),
    ):
        np.testing.assert_array_equal(jax.jit(loss)(0.0), loss(0.0))
        assert not np.isnan(loss(0.0)).any()


@pytest.mark.parametrize("kind", ["integer", "dense"])
def test_z_loss_gradient_does_not_overflow_into_nan(kind):
    z = jnp.array([[3e38, 0.0, -1.0]])

    def loss(z):
        if kind == "integer":
            return sj.softmax_cross_entropy_with_integer_labels(z, jnp.array([0]), z_loss=1.0)
        return sj.softmax_cross_entropy(z, jnp.array([[1.0, 0.0, 0.0]]), z_loss=1.0)

    g = jax.grad(lambda z: loss(z).sum())(z)
    assert np.isposinf(g[0, 0])
    np.testing.assert_array_equal(g[0, 1:], 0.0)


def test_traced_out_of_range_hyperparameters_give_nan():
    logits, labels, soft = numpy_data()
    for loss in (
        lambda e, la: sj.softmax_cross_entropy_with_integer_labels(
            logits, labels, label_smoothing=e, z_loss=la),
        lambda e, la: sj.softmax_cross_entropy(logits, soft, label_smoothing=e, z_loss=la),
    ):
        f = jax.jit(loss)
        assert np.isnan(f(1.5, 0.0)).all() and np.isnan(f(-0.1, 0.0)).all()
        assert np.isnan(f(0.1, -1.0)).all()
        assert np.isfinite(f(0.1, 0.1)).all()
        # the derivative of a NaN loss is NaN too, never a silent 0
        d_eps, d_lam = jax.grad(lambda e, la, f=f: f(e, la).sum(), argnums=(0, 1))(1.5, 0.1)
        assert np.isnan(d_eps) and np.isnan(d_lam)
        with pytest.raises(ValueError, match="label_smoothing"):
            loss(1.5, 0.0)


BIG = np.array([[2e38, -2e38, 0.0, 0.0], [3e38, -1e38, 1.0, -3e38]], np.float32)


BIG_LABELS = np.array([0, 0])


def _torch_smoothed(logits, labels, eps):
    z = torch.tensor(logits.astype(np.float64), requires_grad=True)
    loss = torch.nn.functional.cross_entropy(z, torch.tensor(labels), label_smoothing=eps,
                                             reduction="none")
    loss.sum().backward()
    return loss.detach().numpy(), z.grad.numpy()


def test_smoothing_with_logits_near_the_float_range():
    want, want_grad = _torch_smoothed(BIG, BIG_LABELS, 0.1)
    np.testing.assert_allclose(want[0], 2e37, rtol=1e-6)
    onehot = np.eye(4, dtype=np.float32)[BIG_LABELS]
    for f, y in [(sj.softmax_cross_entropy_with_integer_labels, BIG_LABELS),
                 (sj.softmax_cross_entropy, onehot)]:
        loss = lambda z, e, f=f, y=y: f(z, y, label_smoothing=e)  # noqa: E731
        np.testing.assert_allclose(loss(BIG, 0.1), want, rtol=1e-6)
        dz = jax.grad(lambda z, loss=loss: loss(z, 0.1).sum())(BIG)
        np.testing.assert_allclose(dz, want_grad, rtol=1e-6, atol=1e-7)
        # d/d eps = uniform - nll per example, float64 by hand
        d_eps = jax.jacrev(lambda e, loss=loss: loss(BIG, e))(0.1)
        z64 = BIG.astype(np.float64)
        lse = z64.max(1)  # the other terms are far below the rounding of the maximum
        uniform = np.mean(lse[:, None] - z64, axis=1)
        np.testing.assert_allclose(d_eps, uniform - (lse - z64[:, 0]), rtol=1e-6)


def test_smoothing_with_large_logits_weighted_class_cotangent():
    w = np.array([1.0, 0.5, 1.0, 0.5], np.float32)
    f = lambda z, w: sj.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, BIG_LABELS, label_smoothing=0.1, class_weights=w).sum()
    z = torch.tensor(BIG.astype(np.float64))
    wt = torch.tensor(w.astype(np.float64))
    ref = torch.nn.functional.cross_entropy(z, torch.tensor(BIG_LABELS), weight=wt,
                                            label_smoothing=0.1, reduction="sum")
    np.testing.assert_allclose(f(BIG, w), ref.item(), rtol=1e-6)
    # the loss is linear in w: dw_c = sum_i 0.9 [y_i = c] nll_i + (0.1 / 4) (lse_i - z_ic)
    z64 = BIG.astype(np.float64)
    neg_log_a = z64.max(1, keepdims=True) - z64
    want = 0.1 / 4 * neg_log_a.sum(0)
    np.add.at(want, BIG_LABELS, 0.9 * neg_log_a[np.arange(2), BIG_LABELS])
    np.testing.assert_allclose(jax.grad(f, 1)(BIG, w), want, rtol=1e-6)


def test_fused_smoothing_with_logits_near_the_float_range():
    x = jnp.eye(2, dtype=jnp.float32)
    want, _ = _torch_smoothed(BIG, BIG_LABELS, 0.1)
    got = sj.fused.linear_softmax_cross_entropy(x, jnp.asarray(BIG), BIG_LABELS,
                                                reduction="none", label_smoothing=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


# Row 0: nll = 4e38 overflows, (1 - eps) nll + eps uniform = 2e38 + 1e38 does not. Row 1:
# uniform = 4.5e38 overflows, eps uniform = 2.25e38 does not (nll = 0).
HUGE = np.array([[2e38, -2e38, 0.0, 0.0], [3e38, -3e38, -3e38, -3e38]], np.float32)


HUGE_LABELS = np.array([1, 0])


HUGE_W = np.array([1.0, 0.5, 1.0, 0.5], np.float32)


def _torch_huge(eps, weight):
    z = torch.tensor(HUGE.astype(np.float64), requires_grad=True)
    wt = torch.tensor(weight.astype(np.float64))
    loss = torch.nn.functional.cross_entropy(z, torch.tensor(HUGE_LABELS), weight=wt,
                                             label_smoothing=eps, reduction="none")
    loss.sum().backward()
    return loss.detach().numpy(), z.grad.numpy()


@pytest.mark.parametrize("weighted", [False, True])
def test_smoothing_where_the_hard_term_overflows_but_the_loss_does_not(weighted):
    # Row 0's nll = 4e38 must be halved before it can overflow; row 1's uniform term likewise.
    w = HUGE_W if weighted else np.ones(4, np.float32)
    want, want_dz = _torch_huge(0.5, w)
    assert np.all(want < np.finfo(np.float32).max)
    cw = {"class_weights": w} if weighted else {}
    onehot = np.eye(4, dtype=np.float32)[HUGE_LABELS]
    cases = {
        "integer": lambda z, e: sj.softmax_cross_entropy_with_integer_labels(
            z, HUGE_LABELS, label_smoothing=e, **cw),
        "dense": lambda z, e: sj.softmax_cross_entropy(z, onehot, label_smoothing=e, **cw),
        "fused": lambda z, e: sj.fused.linear_softmax_cross_entropy(
            jnp.eye(2), z, HUGE_LABELS, reduction="none", label_smoothing=e, **cw),
    }
    with jax.enable_x64(True):
        z64, w64 = jnp.asarray(HUGE, jnp.float64), jnp.asarray(w, jnp.float64)
        plain = reference.weighted_softmax_cross_entropy_with_integer_labels
        d_eps_want = np.asarray(jax.jacrev(lambda e: plain(z64, HUGE_LABELS, w64, e))(0.5))
        want_dw = np.asarray(jax.grad(lambda w: plain(z64, HUGE_LABELS, w, 0.5).sum())(w64))
    # d/d eps = uniform - w_y nll: row 1's unweighted 4.5e38 lies beyond float32 (inf)
    d_eps_want = np.where(np.abs(d_eps_want) < np.finfo(np.float32).max, d_eps_want, np.inf)
    for name, f in cases.items():
        np.testing.assert_allclose(f(HUGE, 0.5), want, rtol=1e-6, err_msg=name)
        dz = jax.grad(lambda z, f=f: f(z, 0.5).sum())(HUGE)
        np.testing.assert_allclose(dz, want_dz, rtol=1e-6, atol=1e-7, err_msg=name)
        d_eps = jax.jacrev(lambda e, f=f: f(HUGE, e))(jnp.float32(0.5))
        np.testing.assert_allclose(d_eps, d_eps_want, rtol=1e-6, err_msg=name)
    if weighted:
        for name in ("integer", "dense"):
            f = {"integer": sj.softmax_cross_entropy_with_integer_labels,
                 "dense": sj.softmax_cross_entropy}[name]
            y = HUGE_LABELS if name == "integer" else onehot
            dw = jax.grad(lambda w, f=f, y=y: f(HUGE, y, label_smoothing=0.5,
                                                 class_weights=w).sum())(w)
            np.testing.assert_allclose(dw, want_dw, rtol=1e-6, err_msg=name)


def test_without_smoothing_an_overflowing_nll_stays_infinite():
    # The true -log a_y = 4e38 lies beyond float32: inf, not a clipped plausible number.
    for got in (sj.softmax_cross_entropy_with_integer_labels(HUGE[:1], HUGE_LABELS[:1]),
                sj.fused.linear_softmax_cross_entropy(jnp.eye(1), HUGE[:1], HUGE_LABELS[:1],
                                                      reduction="none")):
        assert np.isposinf(got).all()


def test_fused_distillation_hard_term_shares_the_halved_nll():
    # hard_weight = 1: the loss is the smoothed cross-entropy alone (2e38 + 1e38 = 3e38).
    want, _ = _torch_huge(0.5, np.ones(4, np.float32))
    x = jnp.eye(2)
    got = sj.fused.linear_softmax_distillation(
        x, jnp.asarray(HUGE), x, jnp.zeros((2, 4)), labels=HUGE_LABELS, hard_weight=1.0,
        label_smoothing=0.5, reduction="none")
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _z_loss_cases():
    z, labels = random_logits(3, 4), jnp.array([0, 2, 1])
    onehot = jax.nn.one_hot(labels, 4)
    return {
        "integer": lambda z, lam: sj.softmax_cross_entropy_with_integer_labels(
            z, labels, z_loss=lam),
        "dense": lambda z, lam: sj.softmax_cross_entropy(z, onehot, z_loss=lam),
        "fused": lambda z, lam: sj.fused.linear_softmax_cross_entropy(
            jnp.eye(3), z, labels, reduction="none", z_loss=lam),
    }, z


@pytest.mark.parametrize("bad", [float("inf"), np.float32(np.inf), jnp.array(np.inf)],
                         ids=["float", "numpy", "jax"])
def test_concrete_infinite_z_loss_raises_naming_it(bad):
    # Refused, not an inf loss for every example.
    cases, z = _z_loss_cases()
    for f in cases.values():
        with pytest.raises(ValueError, match="z_loss"):
            f(z, bad)


def test_traced_infinite_z_loss_gives_nan_value_and_derivatives():
    cases, z = _z_loss_cases()
    for name, f in cases.items():
        val = jax.jit(f)(z, jnp.float32(np.inf))
        d_z, d_lam = jax.jit(jax.grad(lambda z, lam, f=f: f(z, lam).sum(), (0, 1)))(
            z, jnp.float32(np.inf))
        assert np.isnan(val).all() and np.isnan(d_lam), name
        assert np.isnan(d_z).all(), name
        # a finite traced value is left alone: d/d lambda = sum lse^2 (float64 plain)
        d_lam = jax.jit(jax.grad(lambda lam, f=f: f(z, lam).sum()))(jnp.float32(0.1))
        lse = reference.np_logsumexp(z)
        np.testing.assert_allclose(d_lam, np.sum(lse**2), rtol=1e-5, err_msg=name)
