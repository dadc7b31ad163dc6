"""The losses against the plain formulas (jax.grad), optax and float64 NumPy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _residuals import saved_residuals
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import softmax_jax as sj
from softmax_jax import reference as ref

N, V = 6, 11


def _data(dtype=jnp.float32, seed=0, n=N, v=V, scale=3.0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    logits = (scale * jax.random.normal(k1, (n, v))).astype(dtype)
    labels = jax.random.randint(k2, (n,), 0, v)
    soft = jax.nn.softmax(jax.random.normal(k3, (n, v))).astype(dtype)
    return logits, labels, soft


def _value_and_grads(fn, *args, argnums=(0,)):
    value = fn(*args)
    grads = jax.grad(lambda *a: (fn(*a) * jnp.arange(1.0, 1.0 + value.size).reshape(
        value.shape)).sum(), argnums=argnums)(*args)
    return value, grads


# --- the notes' worked example ---------------------------------------------------------------


def test_worked_example_cross_entropy_gradient():
    z = jnp.array([2.0, 3.0, 4.0])
    g_int = jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(z, jnp.array(1)))(z)
    g_dense = jax.grad(lambda z: sj.softmax_cross_entropy(z, jnp.array([0.0, 1.0, 0.0])))(z)
    for g in (g_int, g_dense):
        assert [f"{v:.4f}" for v in np.asarray(g)] == ["0.0900", "-0.7553", "0.6652"]
    # through softmax + log_likelihood, the notes' two-step derivation gives the same a - y
    g_ll = jax.grad(lambda z: sj.log_likelihood(sj.softmax(z), jnp.array([0.0, 1.0, 0.0])))(z)
    np.testing.assert_allclose(g_ll, g_int, atol=1e-6)


# --- values and gradients against the plain formulas -----------------------------------------

OPTIONS = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.25, 0.3)]


@pytest.mark.parametrize("eps,lam", OPTIONS)
def test_integer_ce_matches_reference_float64(x64, eps, lam):
    logits, labels, _ = _data(jnp.float64)
    f = lambda z: sj.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, labels, label_smoothing=eps, z_loss=lam)
    r = lambda z: ref.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, labels, label_smoothing=eps, z_loss=lam)
    (v1, (g1,)), (v2, (g2,)) = _value_and_grads(f, logits), _value_and_grads(r, logits)
    assert v1.dtype == jnp.float64
    np.testing.assert_allclose(v1, v2, rtol=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eps,lam", OPTIONS)
def test_dense_ce_matches_reference_float64(x64, eps, lam):
    logits, _, soft = _data(jnp.float64)
    f = lambda z, y: sj.softmax_cross_entropy(z, y, label_smoothing=eps, z_loss=lam)  # noqa: E731
    r = lambda z, y: ref.softmax_cross_entropy(z, y, label_smoothing=eps, z_loss=lam)  # noqa: E731
    v1, g1 = _value_and_grads(f, logits, soft, argnums=(0, 1))
    v2, g2 = _value_and_grads(r, logits, soft, argnums=(0, 1))
    np.testing.assert_allclose(v1, v2, rtol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eps,lam", OPTIONS)
def test_losses_match_reference_float32(eps, lam):
    logits, labels, soft = _data()
    f = lambda z: sj.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, labels, label_smoothing=eps, z_loss=lam)
    r = lambda z: ref.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, labels, label_smoothing=eps, z_loss=lam)
    (v1, (g1,)), (v2, (g2,)) = _value_and_grads(f, logits), _value_and_grads(r, logits)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)
    f = lambda z, y: sj.softmax_cross_entropy(z, y, label_smoothing=eps, z_loss=lam)  # noqa: E731
    r = lambda z, y: ref.softmax_cross_entropy(z, y, label_smoothing=eps, z_loss=lam)  # noqa: E731
    v1, g1 = _value_and_grads(f, logits, soft, argnums=(0, 1))
    v2, g2 = _value_and_grads(r, logits, soft, argnums=(0, 1))
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fn,ref_fn,make",
    [
        (sj.log_likelihood, ref.log_likelihood,
         lambda k: (jax.nn.softmax(jax.random.normal(k, (N, V), jnp.float64)),
                    jax.nn.softmax(2 * jax.random.normal(k, (N, V), jnp.float64)))),
        (sj.sigmoid_binary_cross_entropy, ref.sigmoid_binary_cross_entropy,
         lambda k: (5 * jax.random.normal(k, (N, V), jnp.float64),
                    jax.random.uniform(k, (N, V), jnp.float64))),
        (sj.quadratic_cost, ref.quadratic_cost,
         lambda k: (jax.random.uniform(k, (N, V), jnp.float64),
                    jax.random.uniform(jax.random.split(k)[0], (N, V), jnp.float64))),
    ],
    ids=["log_likelihood", "sigmoid_bce", "quadratic"],
)
def test_other_losses_match_reference_float64(x64, fn, ref_fn, make):
    args = make(jax.random.PRNGKey(3))
    v1, g1 = _value_and_grads(fn, *args, argnums=(0, 1))
    v2, g2 = _value_and_grads(ref_fn, *args, argnums=(0, 1))
    np.testing.assert_allclose(v1, v2, rtol=1e-12, atol=1e-14)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_analytic_gradient_formulas():
    z = jnp.array([[0.3, -1.2, 2.0], [4.0, 0.0, -3.0]])
    y = jnp.array([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    a = np.asarray(jax.nn.softmax(z))
    g = jax.grad(lambda z: sj.softmax_cross_entropy(z, y).sum())(z)
    np.testing.assert_allclose(g, a * y.sum(-1, keepdims=True) - y, atol=1e-6)
    s = jax.nn.sigmoid(z)
    g = jax.grad(lambda z: sj.sigmoid_binary_cross_entropy(z, y).sum())(z)
    np.testing.assert_allclose(g, s - y, atol=1e-6)
    g = jax.grad(lambda a: sj.quadratic_cost(a, y).sum())(s)
    np.testing.assert_allclose(g, s - y, atol=1e-6)
    p = jnp.asarray(a)
    g = jax.grad(lambda p: sj.log_likelihood(p, y).sum())(p)
    np.testing.assert_allclose(g, -y / p, rtol=1e-6)


@pytest.mark.parametrize(
    "fn",
    [
        lambda z, y, yi: sj.softmax_cross_entropy(z, y, label_smoothing=0.1, z_loss=0.01),
        lambda z, y, yi: sj.softmax_cross_entropy_with_integer_labels(
            z, yi, label_smoothing=0.1, z_loss=0.01),
        lambda z, y, yi: sj.sigmoid_binary_cross_entropy(z, y),
        lambda z, y, yi: sj.quadratic_cost(sj.sigmoid(z), y),
        lambda z, y, yi: sj.log_likelihood(sj.softmax(z), y),
    ],
    ids=["dense", "integer", "sigmoid_bce", "quadratic", "log_likelihood"],
)
def test_check_grads_second_order_reverse(x64, fn):
    logits, labels, soft = _data(jnp.float64, n=3, v=4)
    check_grads(lambda z: fn(z, soft, labels), (logits,), order=2, modes=["rev"])


def test_hessian_of_cross_entropy_is_the_softmax_jacobian(x64):
    z = jax.random.normal(jax.random.PRNGKey(4), (5,), jnp.float64)
    h = jax.jacrev(jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(z, 2)))(z)
    a = np.asarray(jax.nn.softmax(z))
    np.testing.assert_allclose(h, np.diag(a) - np.outer(a, a), atol=1e-12)


# --- agreement with optax --------------------------------------------------------------------


def test_sigmoid_bce_takes_integer_labels_and_broadcast_labels_like_optax():
    logits, _, soft = _data(seed=22)
    binary = (soft > soft.mean()).astype(jnp.int32)
    for labels in (binary, binary.astype(bool), binary.astype(jnp.uint8)):
        np.testing.assert_allclose(sj.sigmoid_binary_cross_entropy(logits, labels),
                                   optax.sigmoid_binary_cross_entropy(logits, labels),
                                   rtol=1e-6, atol=1e-7)
    row = soft[0]  # one target vector for every example
    got = sj.sigmoid_binary_cross_entropy(logits, row)
    np.testing.assert_allclose(got, optax.sigmoid_binary_cross_entropy(logits, row),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, sj.sigmoid_binary_cross_entropy(
        logits, jnp.broadcast_to(row, logits.shape)), rtol=0, atol=0)
    # the broadcast labels' gradient is summed back to their shape: -sum_n g z
    gz, gy = jax.grad(lambda z, y: sj.sigmoid_binary_cross_entropy(z, y).sum(),
                      argnums=(0, 1))(logits, row)
    np.testing.assert_allclose(gy, -logits.sum(0), rtol=1e-5)
    np.testing.assert_allclose(gz, jax.nn.sigmoid(logits) - row, rtol=1e-5, atol=1e-7)


def test_agrees_with_optax():
    logits, labels, soft = _data(seed=5)
    pairs = [
        (sj.softmax_cross_entropy_with_integer_labels(logits, labels),
         optax.softmax_cross_entropy_with_integer_labels(logits, labels)),
        (sj.softmax_cross_entropy(logits, soft), optax.softmax_cross_entropy(logits, soft)),
        (sj.sigmoid_binary_cross_entropy(logits, soft),
         optax.sigmoid_binary_cross_entropy(logits, soft)),
        (sj.softmax_cross_entropy(logits, soft, label_smoothing=0.2),
         optax.softmax_cross_entropy(logits, optax.smooth_labels(soft, 0.2))),
    ]
    for got, want in pairs:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(z, labels).mean())(logits)
    want = jax.grad(
        lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean())(logits)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    g = jax.grad(lambda y: sj.softmax_cross_entropy(logits, y).sum())(soft)
    np.testing.assert_allclose(g, jax.grad(lambda y: optax.softmax_cross_entropy(
        logits, y).sum())(soft), rtol=1e-5, atol=1e-6)


def test_where_agrees_with_optax_and_with_slicing():
    logits, labels, soft = _data(seed=6)
    mask = np.ones((N, V), bool)
    mask[:, [2, 7]] = False
    labels = jnp.where(jnp.isin(labels, jnp.array([2, 7])), 0, labels)
    mask[3] = False  # a fully masked row
    got = sj.softmax_cross_entropy_with_integer_labels(logits, labels, where=mask)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, labels, where=mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[3] == 0.0
    np.testing.assert_allclose(sj.softmax_cross_entropy(logits, soft, where=mask),
                               optax.softmax_cross_entropy(logits, soft, where=mask),
                               rtol=1e-5, atol=1e-6)
    soft = jnp.where(mask, soft, 0.0)  # the same loss: where drops the masked label mass
    got_d = sj.softmax_cross_entropy(logits, soft, where=mask)
    np.testing.assert_allclose(got_d, optax.softmax_cross_entropy(logits, soft, where=mask),
                               rtol=1e-5, atol=1e-6)
    keep = [c for c in range(V) if c not in (2, 7)]
    sliced = sj.softmax_cross_entropy(logits[:, keep], soft[:, keep])
    np.testing.assert_allclose(np.delete(np.asarray(got_d), 3), np.delete(np.asarray(sliced), 3),
                               rtol=1e-5)
    g = jax.grad(lambda z: sj.softmax_cross_entropy(z, soft, where=mask).sum())(logits)
    np.testing.assert_array_equal(g[:, [2, 7]], 0.0)
    np.testing.assert_array_equal(g[3], 0.0)
    np.testing.assert_allclose(np.delete(np.asarray(g)[:, keep], 3, axis=0),
                               np.delete(np.asarray(jax.grad(lambda z: sj.softmax_cross_entropy(
                                   z, soft[:, keep]).sum())(logits[:, keep])), 3, axis=0),
                               rtol=1e-5, atol=1e-7)
    gi = jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(
        z, labels, where=mask).sum())(logits)
    np.testing.assert_array_equal(gi[3], 0.0)
    np.testing.assert_array_equal(gi[:, [2, 7]], 0.0)


def test_label_on_masked_class_is_infinite():
    logits = jnp.zeros((1, 3))
    loss = sj.softmax_cross_entropy_with_integer_labels(
        logits, jnp.array([1]), where=jnp.array([[True, False, True]]))
    assert np.isposinf(loss[0])


def test_axis_equals_moveaxis():
    logits = jax.random.normal(jax.random.PRNGKey(7), (4, 5, 3))
    labels = jax.random.randint(jax.random.PRNGKey(8), (4, 3), 0, 5)
    got = sj.softmax_cross_entropy_with_integer_labels(logits, labels, axis=1)
    want = sj.softmax_cross_entropy_with_integer_labels(jnp.moveaxis(logits, 1, -1), labels)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    onehot = jax.nn.one_hot(labels, 5, axis=1)
    np.testing.assert_allclose(sj.softmax_cross_entropy(logits, onehot, axis=1), want, rtol=1e-6)
    g1 = jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(
        z, labels, axis=1, label_smoothing=0.1).sum())(logits)
    g2 = jax.grad(lambda z: sj.softmax_cross_entropy(
        z, onehot, axis=1, label_smoothing=0.1).sum())(logits)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("axes", [(1, 2), (2, 1), (-1, 0)])
def test_tuple_of_class_axes_matches_optax_and_jax_nn(axes):
    """Several class axes are flattened in the order given, as optax and jax.nn do: values,
    gradients, masks, and integer labels read as flat indices into the class slice."""
    x = jax.random.normal(jax.random.PRNGKey(31), (3, 4, 5))
    soft = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(32), x.shape), axes)
    keep = tuple(d for d in range(3) if d not in {a % 3 for a in axes})
    k = int(np.prod([x.shape[a] for a in axes]))
    labels = jax.random.randint(jax.random.PRNGKey(33), tuple(x.shape[d] for d in keep), 0, k)
    mask = jax.random.uniform(jax.random.PRNGKey(34), x.shape) < 0.7
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    close(sj.softmax(x, axes), jax.nn.softmax(x, axes))
    close(sj.log_softmax(x, axes, where=mask), jax.nn.log_softmax(x, axes, where=mask))
    close(sj.logsumexp(x, axes), jax.nn.logsumexp(x, axes))
    close(sj.softmax_cross_entropy(x, soft, axes), optax.softmax_cross_entropy(x, soft, axes))
    close(sj.softmax_cross_entropy_with_integer_labels(x, labels, axes),
          optax.softmax_cross_entropy_with_integer_labels(x, labels, axes))
    c = jax.random.normal(jax.random.PRNGKey(35), x.shape)
    close(jax.grad(lambda z: jnp.vdot(sj.softmax(z, axes), c))(x),
          jax.grad(lambda z: jnp.vdot(jax.nn.softmax(z, axes), c))(x))
    order = keep + tuple(a % 3 for a in axes)  # the one-hot target, built by hand
    onehot = jax.nn.one_hot(labels, k).reshape(tuple(x.shape[d] for d in order))
    onehot = onehot.transpose(tuple(int(i) for i in np.argsort(order)))
    close(jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(
              z, labels, axes, label_smoothing=0.1).sum())(x),
          jax.grad(lambda z: optax.softmax_cross_entropy(
              z, 0.9 * onehot + 0.1 / k,
              axes).sum())(x))
    # one flag per row (the class axes kept as size 1): a fully masked row gives loss 0
    flags = jnp.ones(labels.shape, bool).at[(0,) * labels.ndim].set(False)
    rows = jnp.expand_dims(flags, tuple(sorted(a % 3 for a in axes)))
    got = sj.softmax_cross_entropy_with_integer_labels(x, labels, axes, where=rows)
    assert got[(0,) * labels.ndim] == 0.0
    close(got[1:], sj.softmax_cross_entropy_with_integer_labels(x, labels, axes)[1:])


# --- PyTorch's conventions ------------------------------------------------------------------


def test_label_smoothing_follows_pytorch_formula():
    # PyTorch: (1 - eps) * nll + eps / K * sum_c (-log p_c), computed here in float64 NumPy.
    logits, labels, _ = _data(seed=9)
    eps = 0.15
    z = np.asarray(logits, np.float64)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    nll = -logp[np.arange(N), np.asarray(labels)]
    want = (1 - eps) * nll + eps / V * (-logp).sum(1)
    got = sj.softmax_cross_entropy_with_integer_labels(logits, labels, label_smoothing=eps)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_z_loss_adds_lse_squared():
    logits, labels, _ = _data(seed=10)
    lam = 1e-3
    base = sj.softmax_cross_entropy_with_integer_labels(logits, labels)
    got = sj.softmax_cross_entropy_with_integer_labels(logits, labels, z_loss=lam)
    np.testing.assert_allclose(got - base, lam * jax.nn.logsumexp(logits, -1) ** 2, rtol=1e-4)


def test_ignore_index_and_out_of_range_labels():
    logits, _, _ = _data(seed=11)
    labels = jnp.array([0, -100, V, -1, 3, -100])
    loss = sj.softmax_cross_entropy_with_integer_labels(logits, labels, ignore_index=-100)
    assert loss[1] == 0.0 and loss[5] == 0.0
    assert np.isnan(loss[2]) and np.isnan(loss[3])
    np.testing.assert_allclose(
        loss[np.array([0, 4])],
        sj.softmax_cross_entropy_with_integer_labels(logits[np.array([0, 4])], labels[
            np.array([0, 4])]), rtol=1e-6)
    g = jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(
        z, labels, ignore_index=-100).sum())(logits)
    np.testing.assert_array_equal(g[1], 0.0)
    assert np.all(np.isnan(g[2])) and np.all(np.isfinite(g[0]))
    # without ignore_index, -100 is just another out-of-range label
    assert np.isnan(sj.softmax_cross_entropy_with_integer_labels(logits, labels)[1])


def test_integer_gradient_scatter_under_vmap_and_any_axis(x64):
    """The one-hot part of the gradient is a scatter-add; check it under vmap (which batches
    the scatter), on a middle class axis, and with ignored and out-of-range labels, against
    jax.grad of the plain formula in float64."""
    logits = jax.random.normal(jax.random.PRNGKey(21), (3, 4, 6), dtype=jnp.float64)
    labels = jnp.array([[0, 5, -100, 2], [6, 1, 1, -1], [3, 3, 0, 4]])
    keep = (labels >= 0) & (labels < 6)

    def plain(z, y):  # the reference with the bad rows dropped the same way
        return jnp.where(keep, ref.softmax_cross_entropy_with_integer_labels(
            z, jnp.where(keep, y, 0)), 0.0)

    w = jnp.arange(1.0, 13.0).reshape(3, 4)
    want = jax.grad(lambda z: (w * plain(z, labels)).sum())(logits)
    f = lambda z, y: sj.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, y, ignore_index=-100)
    got = jax.vmap(jax.grad(lambda z, y, w: (w * f(z, y)).sum()))(logits, labels, w)
    ok = np.asarray(keep)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(got[0, 2], 0.0)  # ignore_index
    assert np.all(np.isnan(got[1, 0])) and np.all(np.isnan(got[1, 3]))  # out of range
    # the same loss with the classes on the middle axis
    moved = jnp.moveaxis(logits, 2, 1)
    g_mid = jax.grad(lambda z: (w * sj.softmax_cross_entropy_with_integer_labels(
        z, labels, axis=1, ignore_index=-100)).sum())(moved)
    np.testing.assert_allclose(jnp.moveaxis(g_mid, 1, 2)[ok], want[ok], rtol=1e-12,
                               atol=1e-14)


def test_ignore_index_rows_may_hold_nan_logits():
    logits = jnp.array([[jnp.nan, 1.0], [0.0, 1.0]])
    f = lambda z: sj.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, jnp.array([-100, 1]), ignore_index=-100).sum()
    assert np.isfinite(f(logits))
    g = jax.grad(f)(logits)
    np.testing.assert_array_equal(g[0], 0.0)


def test_narrow_and_unsigned_labels():
    logits, labels, _ = _data(seed=12, v=300)
    want = sj.softmax_cross_entropy_with_integer_labels(logits, labels)
    got = sj.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.uint16))
    np.testing.assert_allclose(got, want)
    small = jnp.array([1, 2, 255, 0, 7, 9], dtype=jnp.uint8)
    got = sj.softmax_cross_entropy_with_integer_labels(logits, small)
    np.testing.assert_allclose(got, optax.softmax_cross_entropy_with_integer_labels(
        logits, small.astype(jnp.int32)), rtol=1e-6)


# --- numerics -------------------------------------------------------------------------------


def test_extreme_and_infinite_logits_give_finite_loss_and_no_nan_gradient():
    logits = jnp.array([
        [3e38, 2.9e38, -3e38, -jnp.inf],
        [-3e38, -3e38, -3e38, -3e38],
        [1.0, -jnp.inf, 2.0, -jnp.inf],
    ])
    labels = jnp.array([1, 2, 0])
    onehot = jax.nn.one_hot(labels, 4)
    for loss_fn in (
        lambda z: sj.softmax_cross_entropy_with_integer_labels(z, labels),
        lambda z: sj.softmax_cross_entropy(z, onehot),
    ):
        loss = loss_fn(logits)
        np.testing.assert_allclose(loss, [1e37, np.log(4.0), 1 + np.log1p(np.exp(-1.0))],
                                   rtol=1e-6)
        g = jax.grad(lambda z, f=loss_fn: f(z).sum())(logits)
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g[1], [0.25, 0.25, -0.75, 0.25], rtol=1e-6)
        np.testing.assert_allclose(g[0], [1.0, -1.0, 0.0, 0.0])
    bce = sj.sigmoid_binary_cross_entropy(jnp.array([3e38, -3e38, -jnp.inf, 50.0]),
                                          jnp.array([1.0, 0.0, 0.0, 0.0]))
    np.testing.assert_allclose(bce, [0.0, 0.0, 0.0, 50.0], atol=1e-6)
    g = jax.grad(lambda z: sj.sigmoid_binary_cross_entropy(
        z, jnp.array([1.0, 0.0, 0.0])).sum())(jnp.array([3e38, -3e38, -jnp.inf]))
    np.testing.assert_array_equal(g, [0.0, 0.0, 0.0])


def test_nan_logits_propagate():
    logits = jnp.array([[jnp.nan, 1.0, 2.0], [0.0, 1.0, 2.0]])
    assert np.isnan(sj.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 1]))[0])
    # even where every target on the row is zero
    zero_row = jnp.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out = sj.softmax_cross_entropy(logits, zero_row)
    assert np.isnan(out[0]) and np.isfinite(out[1])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_logits(dtype):
    logits32, labels, soft = _data(seed=13, scale=6.0)
    logits = logits32.astype(dtype)
    up = logits.astype(jnp.float32)
    loss = sj.softmax_cross_entropy_with_integer_labels(logits, labels)
    assert loss.dtype == dtype
    want = sj.softmax_cross_entropy_with_integer_labels(up, labels)
    np.testing.assert_allclose(loss.astype(jnp.float32), want, rtol=float(jnp.finfo(dtype).eps))
    g = jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(z, labels).sum())(logits)
    assert g.dtype == dtype
    g32 = jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(z, labels).sum())(up)
    np.testing.assert_allclose(g.astype(jnp.float32), g32, rtol=float(jnp.finfo(dtype).eps),
                               atol=1e-6)
    g = jax.grad(lambda z, y: sj.softmax_cross_entropy(z, y).sum(), argnums=(0, 1))(
        logits, soft.astype(jnp.float32))
    assert g[0].dtype == dtype and g[1].dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("eps,weighted", [(0.1, False), (0.0, True), (0.1, True)])
def test_low_precision_integer_gradient_with_smoothing_and_weights(dtype, eps, weighted):
    # The narrow-dtype rule keeps the one-hot term inside its rounding pass, a code path of
    # its own: float32 on the same rounded logits is the reference, and the only difference
    # allowed is the final rounding, half an ulp of the dtype (eps / 2 relative).
    logits32, labels, _ = _data(seed=5, scale=4.0)
    logits = logits32.astype(dtype)
    up = logits.astype(jnp.float32)
    w = jnp.linspace(0.5, 2.0, V) if weighted else None
    kw = dict(label_smoothing=eps, class_weights=w)

    def total(z):
        return sj.softmax_cross_entropy_with_integer_labels(z, labels, **kw).sum()

    loss = sj.softmax_cross_entropy_with_integer_labels(logits, labels, **kw)
    want = sj.softmax_cross_entropy_with_integer_labels(up, labels, **kw)
    tol = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(loss.astype(jnp.float32), want, rtol=tol / 2, atol=0)
    g = jax.grad(total)(logits)
    assert g.dtype == dtype
    g32 = jax.grad(total)(up)
    # float32 itself against jax.grad of the plain formula, so the reference is pinned too
    w_ref = jnp.ones(V) if w is None else w
    target = (1 - eps) * jax.nn.one_hot(labels, V) + eps / V
    plain = jax.grad(lambda z: (target * w_ref * -jax.nn.log_softmax(z)).sum())(up)
    np.testing.assert_allclose(g32, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.astype(jnp.float32), g32, rtol=tol / 2, atol=1e-7)


# --- memory: O(N) residuals ------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda z, y, yi: sj.softmax_cross_entropy_with_integer_labels(
            z, yi, label_smoothing=0.1, z_loss=1e-3),
        lambda z, y, yi: sj.softmax_cross_entropy(z, y, label_smoothing=0.1, z_loss=1e-3),
    ],
    ids=["integer", "dense"],
)
def test_cross_entropy_saves_no_n_by_v_tensor_beyond_its_inputs(loss_fn):
    n, v = 16, 64
    logits, labels, soft = _data(n=n, v=v)
    res = saved_residuals(lambda z, y: loss_fn(z, y, labels).sum(), logits, soft)
    big = [why for shape, why in res if int(np.prod(shape)) >= n * v]
    assert all("argument" in why for why in big), res
    assert len(big) <= 2  # the logits and (dense) the labels themselves
    extra = sum(int(np.prod(shape)) for shape, why in res if "argument" not in why)
    assert extra <= 4 * n + 8, res  # a few per-example vectors (max, log-sum, sum of labels)


# --- transformations ------------------------------------------------------------------------


def test_jit_and_vmap():
    logits, labels, soft = _data(seed=14)
    f = jax.jit(jax.vmap(lambda z, y: sj.softmax_cross_entropy_with_integer_labels(z, y)))
    np.testing.assert_allclose(f(logits, labels),
                               sj.softmax_cross_entropy_with_integer_labels(logits, labels),
                               rtol=1e-6)
    g = jax.vmap(jax.grad(lambda z, y: sj.softmax_cross_entropy(z, y)))(logits, soft)
    np.testing.assert_allclose(g, jax.grad(lambda z: sj.softmax_cross_entropy(
        z, soft).sum())(logits), rtol=1e-6)
    # traced hyper-parameters are accepted (no recompilation per value)
    h = jax.jit(lambda eps: sj.softmax_cross_entropy_with_integer_labels(
        logits, labels, label_smoothing=eps).sum())
    np.testing.assert_allclose(h(0.1), sj.softmax_cross_entropy_with_integer_labels(
        logits, labels, label_smoothing=0.1).sum(), rtol=1e-6)


def test_inside_an_optax_training_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    w_true = rng.normal(size=(5, 3)).astype(np.float32)
    y = jnp.argmax(x @ w_true, axis=-1)
    params = jnp.zeros((5, 3))
    opt = optax.sgd(0.5)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(
            lambda p: sj.softmax_cross_entropy_with_integer_labels(x @ p, y).mean())(params)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(100):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(np.log(3.0), rel=1e-5)
    assert losses[-1] < 0.3 * losses[0]
    assert float(jnp.mean(jnp.argmax(x @ params, -1) == y)) > 0.9


@pytest.mark.parametrize("name", ["integer", "dense", "softmax", "log_softmax", "logsumexp"])
def test_vmap_matches_the_batched_call(name):
    """vmap of a per-example call equals the batched call (values, gradients, nested vmap,
    shared labels), and the dense loss's NaN fallback (a lax.cond) survives vmap as a cond
    instead of turning into a select that runs the guarded sum for every example."""
    logits, labels, soft = _data(seed=23)
    logits = logits.at[2, 1].set(3e38)
    c = jax.random.normal(jax.random.PRNGKey(24), logits.shape)
    fns = {
        "integer": lambda z, i: sj.softmax_cross_entropy_with_integer_labels(z, labels[i]),
        "dense": lambda z, i: sj.softmax_cross_entropy(z, soft[0], label_smoothing=0.1),
        "softmax": lambda z, i: jnp.vdot(sj.softmax(z), c[i]),
        "log_softmax": lambda z, i: jnp.vdot(sj.log_softmax(z), c[i]),
        "logsumexp": lambda z, i: sj.logsumexp(z, -1),
    }
    f = fns[name]
    rows = jnp.arange(logits.shape[0])
    value, grad = jax.vmap(jax.value_and_grad(f))(logits, rows)
    for r in range(logits.shape[0]):
        v_r, g_r = jax.value_and_grad(f)(logits[r], rows[r])
        np.testing.assert_allclose(value[r], v_r, rtol=1e-6)
        np.testing.assert_allclose(grad[r], g_r, rtol=1e-6, atol=1e-7)
    # nested: a (2, 3) grid of examples
    nested = jax.vmap(jax.vmap(f))(logits.reshape(2, 3, -1), rows.reshape(2, 3))
    np.testing.assert_allclose(nested.reshape(-1), value, rtol=1e-6)
    if name == "dense":
        jaxpr = str(jax.make_jaxpr(jax.vmap(jax.value_and_grad(f)))(logits, rows))
        assert " cond[" in jaxpr, jaxpr


def test_second_derivatives_under_vmap(x64):
    """jax.hessian (forward-over-reverse) under vmap goes through the normaliser's custom
    batching and tangent rules: per example, diag(a) - a a^T."""
    z = jax.random.normal(jax.random.PRNGKey(25), (3, 4), dtype=jnp.float64)
    labels = jnp.array([0, 3, 1])
    h = jax.vmap(jax.hessian(sj.softmax_cross_entropy_with_integer_labels))(z, labels)
    y = jax.nn.one_hot(labels, 4, dtype=jnp.float64)
    hd = jax.vmap(jax.hessian(sj.softmax_cross_entropy))(z, y)
    for r in range(3):
        a = np.asarray(jax.nn.softmax(z[r]))
        np.testing.assert_allclose(h[r], np.diag(a) - np.outer(a, a), atol=1e-12)
        np.testing.assert_allclose(hd[r], np.diag(a) - np.outer(a, a), atol=1e-12)


# --- property-based -------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 5),
    v=st.integers(1, 9),
    scale=st.sampled_from([1e-3, 1.0, 50.0, 1e4]),
    eps=st.sampled_from([0.0, 0.1, 1.0]),
    lam=st.sampled_from([0.0, 1e-4]),
    seed=st.integers(0, 2**16),
    masked=st.booleans(),
)
# the small-scale z-loss case, where lam * lse**2 is about 5e-4: always run it
@example(n=4, v=9, scale=1e-3, eps=0.1, lam=1e-4, seed=0, masked=False)
def test_property_integer_matches_dense_and_numpy(n, v, scale, eps, lam, seed, masked):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(n, v)) * scale).astype(np.float32)
    labels = rng.integers(0, v, size=n)
    mask = rng.random(size=(n, v)) < 0.8 if masked else np.ones((n, v), bool)
    mask[np.arange(n), labels] = True
    where = mask if masked else None
    got = sj.softmax_cross_entropy_with_integer_labels(
        z, labels, where=where, label_smoothing=eps, z_loss=lam)
    onehot = np.eye(v, dtype=np.float32)[labels]
    # float64 NumPy over the unmasked classes only
    z64 = np.where(mask, z.astype(np.float64), -np.inf)
    m = z64.max(1, keepdims=True)
    lse = m + np.log(np.exp(z64 - m).sum(1, keepdims=True))
    k = mask.sum(1, keepdims=True)
    y = np.where(mask, (1 - eps) * onehot + eps / k, 0.0)
    nlp = np.where(mask, lse - z64, 0.0)
    want = (y * nlp).sum(1) + lam * lse[:, 0] ** 2
    # float32 rounding of terms of size max|z| + log v (a few ulps each, v of them summed),
    # and of the z-loss term, relative 2 ulps of lse**2.
    eps32 = float(np.finfo(np.float32).eps)
    size = np.abs(z).max() + np.log(v) + 1.0
    atol = 4 * (v + 2) * eps32 * size * (1 + 2 * lam * size)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    dense = sj.softmax_cross_entropy(z, onehot, where=where, label_smoothing=eps, z_loss=lam)
    np.testing.assert_allclose(got, dense, rtol=0, atol=2 * atol)
    g = jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(
        z, labels, where=where, label_smoothing=eps, z_loss=lam).sum())(jnp.asarray(z))
    assert np.all(np.isfinite(g))
    a = np.where(mask, np.exp(z64 - lse), 0.0)
    want_g = np.where(mask, a * (1 + 2 * lam * lse) - y, 0.0)
    # a = exp(z - lse) with z - lse off by ulps of size: a relative error of size * eps32,
    # and a * |z - lse| <= 1/e bounds its absolute part; the z-loss factor scales it.
    np.testing.assert_allclose(g, want_g, rtol=0, atol=8 * eps32 * (1 + 2 * lam * size))
