"""Both cross-entropies (integer and dense labels) against the plain formulas (jax.grad),
optax, PyTorch and float64 NumPy: values, gradients, axes, precision and transformations."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cross_entropy_inputs import OPTIONS, data, device, normal, numpy_data, value_and_grads
from _residuals import saved_residuals
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import softmax_jax as sj
from softmax_jax import reference as ref


def test_worked_example_cross_entropy_gradient():
    z = jnp.array([2.0, 3.0, 4.0])
    g_int = jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(z, jnp.array(1)))(z)
    g_dense = jax.grad(lambda z: sj.softmax_cross_entropy(z, jnp.array([0.0, 1.0, 0.0])))(z)
    for g in (g_int, g_dense):
        assert [f"{v:.4f}" for v in np.asarray(g)] == ["0.0900", "-0.7553", "0.6652"]
    # through softmax + log_likelihood, the notes' two-step derivation gives the same a - y
    g_ll = jax.grad(lambda z: sj.log_likelihood(sj.softmax(z), jnp.array([0.0, 1.0, 0.0])))(z)
    np.testing.assert_allclose(g_ll, g_int, atol=1e-6)


@pytest.mark.parametrize("eps,lam", OPTIONS)
def test_losses_match_reference_float32(eps, lam):
    logits, labels, soft = data()
    f = lambda z: sj.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, labels, label_smoothing=eps, z_loss=lam)
    r = lambda z: ref.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, labels, label_smoothing=eps, z_loss=lam)
    (v1, (g1,)), (v2, (g2,)) = value_and_grads(f, logits), value_and_grads(r, logits)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)
    f = lambda z, y: sj.softmax_cross_entropy(z, y, label_smoothing=eps, z_loss=lam)  # noqa: E731
    r = lambda z, y: ref.softmax_cross_entropy(z, y, label_smoothing=eps, z_loss=lam)  # noqa: E731
    v1, g1 = value_and_grads(f, logits, soft, argnums=(0, 1))
    v2, g2 = value_and_grads(r, logits, soft, argnums=(0, 1))
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


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
    logits, labels, soft = data(jnp.float64, n=3, v=4)
    check_grads(lambda z: fn(z, soft, labels), (logits,), order=2, modes=["rev"])


def test_hessian_of_cross_entropy_is_the_softmax_jacobian(x64):
    z = normal(4, (5,), dtype=np.float64)
    h = jax.jacrev(jax.grad(lambda z: sj.softmax_cross_entropy_with_integer_labels(z, 2)))(z)
    a = np.asarray(jax.nn.softmax(z))
    np.testing.assert_allclose(h, np.diag(a) - np.outer(a, a), atol=1e-12)


def test_agrees_with_optax():
    logits, labels, soft = data(seed=5)
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


def test_axis_equals_moveaxis():
    logits = normal(7, (4, 5, 3))
    labels = device(np.random.default_rng(8).integers(0, 5, (4, 3)), np.int32)
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
    rng = np.random.default_rng(31)
    x = device(rng.standard_normal((3, 4, 5)), np.float32)
    soft = jax.nn.softmax(normal(32, x.shape), axes)
    keep = tuple(d for d in range(3) if d not in {a % 3 for a in axes})
    k = int(np.prod([x.shape[a] for a in axes]))
    labels = device(rng.integers(0, k, tuple(x.shape[d] for d in keep)), np.int32)
    mask = rng.random(x.shape) < 0.7
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    close(sj.softmax(x, axes), jax.nn.softmax(x, axes))
    close(sj.log_softmax(x, axes, where=mask), jax.nn.log_softmax(x, axes, where=mask))
    close(sj.logsumexp(x, axes), jax.nn.logsumexp(x, axes))
    close(sj.softmax_cross_entropy(x, soft, axes), optax.softmax_cross_entropy(x, soft, axes))
    close(sj.softmax_cross_entropy_with_integer_labels(x, labels, axes),
          optax.softmax_cross_entropy_with_integer_labels(x, labels, axes))
    c = normal(35, x.shape)
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
    logits32, labels, soft = data(seed=13, scale=6.0)
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
    logits, labels, soft = data(n=n, v=v)
    res = saved_residuals(lambda z, y: loss_fn(z, y, labels).sum(), logits, soft)
    big = [why for shape, why in res if int(np.prod(shape)) >= n * v]
    assert all("argument" in why for why in big), res
    assert len(big) <= 2  # the logits and (dense) the labels themselves
    extra = sum(int(np.prod(shape)) for shape, why in res if "argument" not in why)
    assert extra <= 4 * n + 8, res  # a few per-example vectors (max, log-sum, sum of labels)


def test_jit_and_vmap():
    logits, labels, soft = data(seed=14)
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
    logits, labels, soft = data(seed=23)
    logits = logits.at[2, 1].set(3e38)
    c = normal(24, logits.shape)
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
    z = normal(25, (3, 4), dtype=np.float64)
    labels = jnp.array([0, 3, 1])
    h = jax.vmap(jax.hessian(sj.softmax_cross_entropy_with_integer_labels))(z, labels)
    y = jax.nn.one_hot(labels, 4, dtype=jnp.float64)
    hd = jax.vmap(jax.hessian(sj.softmax_cross_entropy))(z, y)
    for r in range(3):
        a = np.asarray(jax.nn.softmax(z[r]))
        np.testing.assert_allclose(h[r], np.diag(a) - np.outer(a, a), atol=1e-12)
        np.testing.assert_allclose(hd[r], np.diag(a) - np.outer(a, a), atol=1e-12)


# Each new shape compiles new programs: 15 random examples over a few shapes (the values
# are drawn afresh for each), and the edges always run.
@settings(max_examples=15, deadline=None)
@given(
    shape=st.sampled_from([(1, 1), (1, 4), (3, 2), (4, 9), (5, 9)]),
    scale=st.sampled_from([1e-3, 1.0, 50.0, 1e4]),
    eps=st.sampled_from([0.0, 0.1, 1.0]),
    lam=st.sampled_from([0.0, 1e-4]),
    seed=st.integers(0, 2**16),
    masked=st.booleans(),
)
# the small-scale z-loss case, where lam * lse**2 is about 5e-4: always run it
@example(shape=(4, 9), scale=1e-3, eps=0.1, lam=1e-4, seed=0, masked=False)
# one class (the loss is 0 without smoothing); full smoothing on large masked logits
@example(shape=(1, 1), scale=1.0, eps=0.0, lam=0.0, seed=1, masked=False)
@example(shape=(5, 9), scale=1e4, eps=1.0, lam=1e-4, seed=2, masked=True)
def test_property_integer_matches_dense_and_numpy(shape, scale, eps, lam, seed, masked):
    n, v = shape
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
    lse = ref.np_logsumexp(z64, axis=1, keepdims=True)
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


@pytest.mark.parametrize("kind", ["integer", "dense"])
def test_a_row_does_not_depend_on_the_rest_of_the_batch(kind):
    """Adding an unrelated row with a large logit changes no other row's bits."""
    logits, labels, soft = numpy_data(seed=4, n=64, v=33)
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
