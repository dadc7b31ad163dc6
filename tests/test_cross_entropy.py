"""Class weights, hyper-parameter derivatives and the wrong numbers of issue 9, section 4.

References: PyTorch's ``F.cross_entropy`` (class weights, smoothing, ``ignore_index``),
optax, float64 finite differences and ``jax.grad`` of the plain formula written below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import softmax_jax as sj

N, V = 7, 5
WEIGHTS = np.array([1.0, 2.0, 0.5, 0.0, 3.0])


def _data(seed=0, n=N, v=V, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logits = (3.0 * rng.standard_normal((n, v))).astype(dtype)
    labels = rng.integers(0, v, n)
    soft = rng.dirichlet(np.ones(v), n).astype(dtype)
    return logits, labels, soft


def _plain_int_ce(z, labels, w, eps, lam):
    """PyTorch's weighted, smoothed cross-entropy written plainly (autodiff, no rules)."""
    log_a = jax.nn.log_softmax(z)
    k = z.shape[-1]
    hard = -w[labels] * jnp.take_along_axis(log_a, labels[:, None], -1)[:, 0]
    uniform = -jnp.sum(w * log_a, -1) / k
    return (1 - eps) * hard + eps * uniform + lam * jax.nn.logsumexp(z, -1) ** 2


def _plain_dense_ce(z, y, w, eps, lam):
    k = z.shape[-1]
    y = (1 - eps) * y + eps / k
    return -jnp.sum(w * y * jax.nn.log_softmax(z), -1) + lam * jax.nn.logsumexp(z, -1) ** 2


# --- class weights -----------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_integer_class_weights_match_pytorch(eps):
    logits, labels, _ = _data()
    labels[2] = -100
    cot = np.linspace(0.5, 2.0, N).astype(np.float32)
    zt = torch.tensor(logits, requires_grad=True)
    want = torch.nn.functional.cross_entropy(
        zt, torch.tensor(labels), weight=torch.tensor(WEIGHTS, dtype=torch.float32),
        ignore_index=-100, label_smoothing=eps, reduction="none")
    (want * torch.tensor(cot)).sum().backward()

    def loss(z):
        return sj.softmax_cross_entropy_with_integer_labels(
            z, labels, ignore_index=-100, label_smoothing=eps, class_weights=WEIGHTS)

    got = loss(logits)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert got[2] == 0.0
    grad = jax.grad(lambda z: jnp.vdot(loss(z), cot))(logits)
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-5, atol=1e-6)
    # PyTorch's weighted "mean", as the docstring spells it
    mean = torch.nn.functional.cross_entropy(
        torch.tensor(logits), torch.tensor(labels),
        weight=torch.tensor(WEIGHTS, dtype=torch.float32), ignore_index=-100,
        label_smoothing=eps)
    kept = np.where(labels != -100, WEIGHTS[np.where(labels != -100, labels, 0)], 0.0)
    np.testing.assert_allclose(got.sum() / kept.sum(), mean.item(), rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dense_class_weights_match_pytorch(eps):
    logits, _, soft = _data(seed=1)
    zt = torch.tensor(logits, requires_grad=True)
    yt = torch.tensor(soft, requires_grad=True)
    want = torch.nn.functional.cross_entropy(
        zt, yt, weight=torch.tensor(WEIGHTS, dtype=torch.float32), label_smoothing=eps,
        reduction="none")
    want.sum().backward()
    f = lambda z, y: sj.softmax_cross_entropy(  # noqa: E731
        z, y, label_smoothing=eps, class_weights=WEIGHTS)
    np.testing.assert_allclose(f(logits, soft), want.detach().numpy(), rtol=1e-5, atol=1e-6)
    gz, gy = jax.grad(lambda z, y: f(z, y).sum(), argnums=(0, 1))(logits, soft)
    np.testing.assert_allclose(gz, zt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gy, yt.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps,lam", [(0.0, 0.0), (0.15, 0.0), (0.15, 0.05)])
def test_gradients_of_every_argument_match_the_plain_formula_float64(x64, eps, lam):
    logits, labels, soft = _data(seed=2, dtype=np.float64)
    w = jnp.asarray(WEIGHTS)
    cot = jnp.linspace(0.5, 2.0, N)
    for ours, plain, target in [
        (sj.softmax_cross_entropy_with_integer_labels, _plain_int_ce, jnp.asarray(labels)),
        (sj.softmax_cross_entropy, _plain_dense_ce, jnp.asarray(soft)),
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
    logits, labels, soft = _data(seed=3, dtype=np.float64)
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
    logits, labels, soft = _data()
    with pytest.raises(ValueError, match="class_weights"):
        sj.softmax_cross_entropy_with_integer_labels(logits, labels, class_weights=np.ones(V + 1))
    with pytest.raises(ValueError, match="class_weights"):
        sj.softmax_cross_entropy(logits, soft, class_weights=np.ones((1, V)))
    with pytest.raises(TypeError, match="class_weights"):
        sj.softmax_cross_entropy_with_integer_labels(logits, labels, class_weights=np.ones(V, int))


# --- section 4: wrong numbers ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["integer", "dense"])
def test_a_row_does_not_depend_on_the_rest_of_the_batch(kind):
    """Adding an unrelated row with a large logit changes no other row's bits."""
    logits, labels, soft = _data(seed=4, n=64, v=33)
    extra = np.zeros((1, 33), np.float32)
    extra[0, 3] = 100.0
    big = np.concatenate([logits, extra])

    def loss(z, n):
        if kind == "integer":
            return sj.softmax_cross_entropy_with_integer_labels(
                z, np.concatenate([labels, [0]])[:n], label_smoothing=0.1, z_loss=1e-3)
        return sj.softmax_cross_entropy(
            z, np.concatenate([soft, np.eye(33, dtype=np.float32)[:1]])[:n],
            label_smoothing=0.1, z_loss=1e-3)

    alone, grad_alone = loss(logits, 64), jax.grad(lambda z: loss(z, 64).sum())(logits)
    both, grad_both = loss(big, 65), jax.grad(lambda z: loss(z, 65).sum())(big)
    np.testing.assert_array_equal(both[:64], alone)
    np.testing.assert_array_equal(grad_both[:64], grad_alone)


def test_label_gradient_is_as_accurate_as_optax(x64):
    """Median relative error of the gradient at the label, against float64."""
    rng = np.random.default_rng(5)
    logits = (4.0 * rng.standard_normal((512, 256)) + 12.0).astype(np.float32)
    labels = rng.integers(0, 256, 512)
    rows = np.arange(512)
    exact = np.asarray(jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(
        z, labels).sum())(logits.astype(np.float64)))[rows, labels]

    def error(loss):
        with jax.enable_x64(False):
            g = np.asarray(jax.grad(lambda z: loss(z, labels).sum())(logits))[rows, labels]
        return np.median(np.abs(g - exact) / np.abs(exact))

    ours = error(sj.softmax_cross_entropy_with_integer_labels)
    theirs = error(optax.softmax_cross_entropy_with_integer_labels)
    assert ours <= theirs * 1.05, (ours, theirs)


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
    logits, labels, soft = _data()
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


def test_square_masks_follow_optax():
    """On square logits a ``[classes]``-shaped mask is one flag per example, as in optax; a
    class mask has the logits' rank (``where[None, :]``)."""
    logits, _, soft = _data(seed=6, n=4, v=4)
    labels = np.array([0, 1, 2, 3])
    mask = np.array([True, True, True, False])
    for ours, theirs, y in [
        (sj.softmax_cross_entropy_with_integer_labels,
         optax.softmax_cross_entropy_with_integer_labels, labels),
        (sj.softmax_cross_entropy, optax.softmax_cross_entropy, soft),
    ]:
        per_example = ours(logits, y, where=mask)
        np.testing.assert_allclose(per_example, theirs(logits, y, where=mask), rtol=1e-5)
        assert per_example[3] == 0.0 and (per_example[:3] > 0).all()
    got = sj.softmax_cross_entropy_with_integer_labels(logits, labels, where=mask[None, :])
    sliced = optax.softmax_cross_entropy_with_integer_labels(logits[:3, :3], labels[:3])
    np.testing.assert_allclose(got[:3], sliced, rtol=1e-6)
    assert np.isposinf(got[3])  # its label is the masked class
    full = np.broadcast_to(mask, (4, 4))
    kept = np.where(full, soft, 0.0)
    np.testing.assert_allclose(sj.softmax_cross_entropy(logits, kept, where=mask[None, :]),
                               optax.softmax_cross_entropy(logits, kept, where=full), rtol=1e-5)
    np.testing.assert_allclose(sj.softmax_cross_entropy(logits, soft, where=mask[None, :]),
                               optax.softmax_cross_entropy(logits, soft, where=full), rtol=1e-5)


def test_numpy_integer_labels_and_ignore_index():
    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="int32"):
        sj.softmax_cross_entropy_with_integer_labels(logits, np.array([2**32 + 1, 0]))
    with pytest.raises(ValueError, match="int32"):
        sj.softmax_cross_entropy_with_integer_labels(logits, np.array([0, 2**63], np.uint64))
    got = sj.softmax_cross_entropy_with_integer_labels(
        logits, np.array([1, -100], np.int64), ignore_index=np.int64(-100))
    np.testing.assert_allclose(got, [np.log(3.0), 0.0], rtol=1e-6)
    with pytest.raises(TypeError, match="ignore_index"):
        sj.softmax_cross_entropy_with_integer_labels(logits, np.array([1, 0]), ignore_index=1.0)


def test_log_likelihood_reverse_over_reverse_has_no_nan(x64):
    probs, labels = jnp.array([0.0, 1.0]), jnp.array([0.0, 1.0])
    hess = jax.jacrev(jax.grad(sj.log_likelihood))(probs, labels)
    np.testing.assert_array_equal(hess, jax.hessian(sj.log_likelihood)(probs, labels))
    np.testing.assert_array_equal(hess, [[0.0, 0.0], [0.0, 1.0]])  # y / a^2 on the diagonal


def test_log_likelihood_points_integer_labels_to_the_integer_loss():
    with pytest.raises(TypeError, match="softmax_cross_entropy_with_integer_labels"):
        sj.log_likelihood(jnp.full((2, 3), 1 / 3), jnp.array([0, 2]))


@pytest.mark.parametrize("kind", ["integer", "dense"])
def test_zero_rows_give_an_empty_loss(kind):
    logits = jnp.zeros((0, 4))
    if kind == "integer":
        loss = lambda z: sj.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            z, jnp.zeros((0,), int), label_smoothing=0.1)
    else:
        loss = lambda z: sj.softmax_cross_entropy(z, jnp.zeros((0, 4)))  # noqa: E731
    assert loss(logits).shape == (0,)
    assert jax.grad(lambda z: loss(z).sum())(logits).shape == (0, 4)


def test_zero_rows_with_a_tuple_of_class_axes():
    logits = jnp.zeros((0, 2, 3))
    labels = jnp.zeros((0,), int)
    out = sj.softmax_cross_entropy_with_integer_labels(logits, labels, (1, 2))
    assert out.shape == (0,)
    assert sj.softmax_cross_entropy(logits, logits, (1, 2)).shape == (0,)
