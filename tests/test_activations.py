"""softmax, log_softmax, logsumexp and sigmoid against the plain formulas, jax.nn and NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _residuals import saved_residuals
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import softmax_jax as sj
from softmax_jax import reference as ref

SOFTMAX_FAMILY = [
    (sj.softmax, ref.softmax, jax.nn.softmax),
    (sj.log_softmax, ref.log_softmax, jax.nn.log_softmax),
    (sj.logsumexp, ref.logsumexp, jax.nn.logsumexp),
]
FAMILY_IDS = ["softmax", "log_softmax", "logsumexp"]


def _np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _vjp(fn, x, cot):
    out, pullback = jax.vjp(fn, x)
    return out, pullback(cot)[0]


# --- the notes' worked example ---------------------------------------------------------------


def test_worked_example_softmax():
    a = sj.softmax(jnp.array([2.0, 3.0, 4.0]))
    np.testing.assert_allclose(a, [0.09003057, 0.24472847, 0.66524096], rtol=1e-6)
    assert [f"{v:.4f}" for v in np.asarray(a)] == ["0.0900", "0.2447", "0.6652"]


def test_softmax_jacobian_matches_the_notes_two_cases():
    # d a_j / d z_i = a_i (1 - a_i) when i == j, and -a_i a_j otherwise.
    z = jnp.array([2.0, 3.0, 4.0])
    a = np.asarray(sj.softmax(z), dtype=np.float64)
    jac = np.asarray(jax.jacrev(sj.softmax)(z))
    expected = np.diag(a) - np.outer(a, a)
    np.testing.assert_allclose(jac, expected, atol=1e-7)
    np.testing.assert_allclose(np.diag(jac), a * (1 - a), atol=1e-7)
    assert jac[0, 1] == pytest.approx(-a[0] * a[1], abs=1e-7)


# --- values and gradients against the plain formulas -----------------------------------------


@pytest.mark.parametrize("fn,ref_fn,_", SOFTMAX_FAMILY, ids=FAMILY_IDS)
def test_family_matches_reference_float64(x64, fn, ref_fn, _):
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 9), dtype=jnp.float64) * 5
    out = fn(x)
    cot = jax.random.normal(jax.random.PRNGKey(1), out.shape, dtype=jnp.float64)
    got, got_vjp = _vjp(fn, x, cot)
    want, want_vjp = _vjp(ref_fn, x, cot)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_vjp, want_vjp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn,ref_fn,_", SOFTMAX_FAMILY, ids=FAMILY_IDS)
def test_family_matches_reference_float32(fn, ref_fn, _):
    x = jax.random.normal(jax.random.PRNGKey(2), (5, 33)) * 4
    cot = jax.random.normal(jax.random.PRNGKey(3), fn(x).shape)
    got, got_vjp = _vjp(fn, x, cot)
    want, want_vjp = _vjp(ref_fn, x, cot)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_vjp, want_vjp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn,_,nn_fn", SOFTMAX_FAMILY, ids=FAMILY_IDS)
def test_family_matches_jax_nn(fn, _, nn_fn):
    x = jax.random.normal(jax.random.PRNGKey(4), (4, 3, 7)) * 3
    for axis in (0, 1, -1):
        np.testing.assert_allclose(fn(x, axis=axis), nn_fn(x, axis=axis), rtol=1e-6, atol=1e-6)


def test_softmax_against_float64_numpy():
    x = np.random.default_rng(0).normal(size=(8, 100)).astype(np.float32) * 10
    np.testing.assert_allclose(sj.softmax(x), _np_softmax(x), rtol=2e-5, atol=1e-7)


def test_sigmoid_value_and_gradient(x64):
    x = jnp.linspace(-30.0, 30.0, 61, dtype=jnp.float64)
    np.testing.assert_allclose(sj.sigmoid(x), ref.sigmoid(x), rtol=1e-13)
    g = jax.grad(lambda x: sj.sigmoid(x).sum())(x)
    np.testing.assert_allclose(g, jax.grad(lambda x: ref.sigmoid(x).sum())(x), rtol=1e-10)
    # sigma'(x) = e^{-|x|} / (1 + e^{-|x|})^2, exact in float64 even where 1 - sigma(x) is not
    e = np.exp(-np.abs(np.asarray(x)))
    np.testing.assert_allclose(g, e / (1 + e) ** 2, rtol=1e-12)


@pytest.mark.parametrize("fn", [sj.softmax, sj.log_softmax, sj.logsumexp, sj.sigmoid])
def test_check_grads_second_order_reverse(x64, fn):
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 5), dtype=jnp.float64)
    check_grads(fn, (x,), order=2, modes=["rev"])


def test_hessian_through_reverse_over_reverse(x64):
    x = jax.random.normal(jax.random.PRNGKey(6), (7,), dtype=jnp.float64)
    h = jax.jacrev(jax.grad(sj.logsumexp))(x)
    a = _np_softmax(np.asarray(x))
    np.testing.assert_allclose(h, np.diag(a) - np.outer(a, a), atol=1e-12)


def test_jax_hessian_forward_over_reverse_works(x64):
    x = jax.random.normal(jax.random.PRNGKey(13), (6,), dtype=jnp.float64)
    h = jax.hessian(lambda z: sj.softmax_cross_entropy_with_integer_labels(z, 3))(x)
    a = _np_softmax(np.asarray(x))
    np.testing.assert_allclose(h, np.diag(a) - np.outer(a, a), atol=1e-12)


def test_forward_mode_is_refused_with_jax_error():
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(sj.softmax, (jnp.ones(3),), (jnp.ones(3),))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jacfwd(sj.logsumexp)(jnp.ones(3))


# --- axis and masks -------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [sj.softmax, sj.log_softmax])
def test_axis_equals_moveaxis(fn):
    x = jax.random.normal(jax.random.PRNGKey(7), (3, 4, 5))
    for axis in range(3):
        want = jnp.moveaxis(fn(jnp.moveaxis(x, axis, -1)), -1, axis)
        np.testing.assert_allclose(fn(x, axis=axis), want, rtol=1e-6)


def test_masked_softmax_equals_slicing_the_entries_away():
    x = jax.random.normal(jax.random.PRNGKey(8), (4, 6))
    mask = jnp.array([True, False, True, True, False, True])
    keep = np.flatnonzero(mask)
    a = sj.softmax(x, where=mask)
    np.testing.assert_allclose(a[:, keep], sj.softmax(x[:, keep]), rtol=1e-6)
    np.testing.assert_array_equal(a[:, ~np.asarray(mask)], 0.0)
    np.testing.assert_allclose(sj.log_softmax(x, where=mask)[:, keep], sj.log_softmax(x[:, keep]),
                               rtol=1e-6)
    assert np.all(np.isneginf(sj.log_softmax(x, where=mask)[:, ~np.asarray(mask)]))
    np.testing.assert_allclose(sj.logsumexp(x, where=mask), sj.logsumexp(x[:, keep]), rtol=1e-6)
    np.testing.assert_allclose(a, jax.nn.softmax(x, where=mask), rtol=1e-6)


def test_masked_gradients_vanish_and_never_see_masked_nans():
    x = jnp.array([[1.0, jnp.nan, 2.0, jnp.inf], [0.5, -1.0, jnp.nan, 3.0]])
    mask = jnp.array([[True, False, True, False], [True, True, False, True]])
    cot = jnp.arange(8.0).reshape(2, 4)
    for fn in (sj.softmax, sj.log_softmax):
        out, g = _vjp(lambda x, fn=fn: fn(x, where=mask), x, cot)
        assert np.all(np.isfinite(g)), fn
        np.testing.assert_array_equal(np.asarray(g)[~np.asarray(mask)], 0.0)
    g = jax.grad(lambda x: sj.logsumexp(x, where=mask).sum())(x)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~np.asarray(mask)] == 0.0)


def test_fully_masked_row():
    x = jax.random.normal(jax.random.PRNGKey(9), (2, 4))
    mask = jnp.array([[False] * 4, [True] * 4])
    np.testing.assert_array_equal(sj.softmax(x, where=mask)[0], 0.0)
    np.testing.assert_allclose(sj.softmax(x, where=mask)[1].sum(), 1.0, rtol=1e-6)
    assert np.isneginf(sj.logsumexp(x, where=mask)[0])
    for fn in (sj.softmax, sj.log_softmax, sj.logsumexp):
        g = jax.grad(lambda x, fn=fn: jnp.nansum(jnp.where(jnp.isinf(y := fn(x, where=mask)),
                                                           0.0, y)))(x)
        np.testing.assert_array_equal(g[0], 0.0)


def test_row_mask_shape_is_accepted():
    x = jax.random.normal(jax.random.PRNGKey(10), (3, 5))
    rows = jnp.array([True, False, True])
    np.testing.assert_array_equal(sj.softmax(x, where=rows)[1], 0.0)
    np.testing.assert_allclose(sj.softmax(x, where=rows)[0], sj.softmax(x)[0], rtol=1e-6)


# --- numerics -------------------------------------------------------------------------------


def test_extreme_logits_stay_finite():
    x = jnp.array([[3e38, 2.9e38, -3e38, -jnp.inf], [-3e38, -3e38, -3e38, -3e38]])
    a = sj.softmax(x)
    np.testing.assert_allclose(a[0], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(a[1], [0.25] * 4)
    np.testing.assert_allclose(sj.logsumexp(x), [3e38, -3e38 + np.log(4.0)], rtol=1e-6)
    np.testing.assert_allclose(sj.log_softmax(x)[0, :2], [0.0, -1e37], rtol=1e-6)
    for fn in (sj.softmax, sj.log_softmax, sj.logsumexp):
        g = jax.grad(lambda x, fn=fn: jnp.sum(jnp.where(jnp.isinf(y := fn(x)), 0.0, y)))(x)
        assert not np.any(np.isnan(g)), fn


def test_all_neg_inf_row_gives_neg_inf_not_nan():
    x = jnp.full((1, 3), -jnp.inf)
    assert np.isneginf(sj.logsumexp(x)[0])
    g = jax.grad(lambda x: sj.logsumexp(x).sum())(x)
    np.testing.assert_array_equal(g, 0.0)


def test_nan_propagates():
    x = jnp.array([[1.0, jnp.nan, 2.0], [1.0, 2.0, 3.0]])
    assert np.all(np.isnan(sj.softmax(x)[0])) and not np.any(np.isnan(sj.softmax(x)[1]))
    assert np.all(np.isnan(sj.log_softmax(x)[0]))
    assert np.isnan(sj.logsumexp(x)[0])
    assert np.isnan(sj.sigmoid(jnp.nan))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    x32 = jax.random.normal(jax.random.PRNGKey(11), (4, 300)) * 8
    x = x32.astype(dtype)
    want = sj.softmax(x.astype(jnp.float32))
    got = sj.softmax(x)
    assert got.dtype == dtype
    # one rounding of the f32 result: relative error within the format's epsilon
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=float(jnp.finfo(dtype).eps),
                               atol=1e-7)
    g = jax.grad(lambda x: sj.logsumexp(x).sum())(x)
    assert g.dtype == dtype
    lse = sj.logsumexp(x)
    np.testing.assert_allclose(lse.astype(jnp.float32), sj.logsumexp(x.astype(jnp.float32)),
                               rtol=float(jnp.finfo(dtype).eps))


# --- transformations ------------------------------------------------------------------------


def test_jit_vmap_and_grad_compose():
    x = jax.random.normal(jax.random.PRNGKey(12), (6, 10))
    f = jax.jit(jax.vmap(jax.grad(lambda r: sj.log_softmax(r)[3])))
    want = jax.vmap(jax.grad(lambda r: ref.log_softmax(r)[3]))(x)
    np.testing.assert_allclose(f(x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(sj.softmax, in_axes=1, out_axes=1)(x),
                               sj.softmax(x, axis=0), rtol=1e-6)


def test_softmax_saves_only_its_output():
    x = jnp.ones((8, 16))
    c = jnp.arange(128.0).reshape(8, 16)
    res = saved_residuals(lambda x: jnp.sum(sj.softmax(x) * c), x)
    big = [why for shape, why in res if shape == (8, 16) and "constant" not in why]
    # only the softmax output a: no exponentials or other N x V temporaries
    assert len(big) == 1 and "_softmax" in big[0], res


def test_logsumexp_saves_no_probabilities():
    x = jnp.ones((8, 16))
    res = saved_residuals(lambda x: sj.logsumexp(x).sum(), x)
    big = [(shape, why) for shape, why in res if shape == (8, 16)]
    assert len(big) == 1 and "argument" in big[0][1], res


# --- property-based -------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_property_softmax_family(shape, scale, seed, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * scale).astype(np.float32)
    mask = rng.random(size=shape) < 0.7
    a = np.asarray(sj.softmax(x, axis=axis, where=mask))
    sums = a.sum(axis=axis)
    any_on = mask.any(axis=axis)
    np.testing.assert_allclose(sums[any_on], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(sums[~any_on], 0.0)
    np.testing.assert_array_equal(a[~mask], 0.0)
    xm = np.where(mask, x, -np.inf)
    with np.errstate(invalid="ignore"):
        want = np.where(mask, _np_softmax(xm, axis), 0.0)
    want = np.nan_to_num(want)
    np.testing.assert_allclose(a, want, rtol=1e-4, atol=1e-6)
    cot = rng.normal(size=shape).astype(np.float32)
    _, g = _vjp(lambda x: sj.softmax(x, axis=axis, where=mask), jnp.asarray(x), cot)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[~mask], 0.0)
    # The vjp is the Jacobian a_j (delta_ij - a_i) applied to cot, row by row.
    ga = cot * a
    want_g = ga - a * ga.sum(axis=axis, keepdims=True)
    np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-5)


# --- per-example results do not depend on the rest of the batch (issue 9, section 4) --------


@pytest.mark.parametrize("fn", [sj.softmax, sj.log_softmax, sj.logsumexp], ids=FAMILY_IDS)
def test_rows_are_bitwise_independent_of_other_rows(fn):
    """One unrelated row with a logit of 100 (outside any unshifted fast path) leaves every
    other row's value and gradient bit for bit as they were."""
    x = jax.random.normal(jax.random.PRNGKey(30), (6, 12)) * 3
    extra = jnp.zeros((1, 12)).at[0, 5].set(100.0)
    cot = jax.random.normal(jax.random.PRNGKey(31), fn(x).shape)
    out, g = _vjp(fn, x, cot)
    extra_cot = jnp.ones((1, *cot.shape[1:]), cot.dtype)
    out2, g2 = _vjp(fn, jnp.concatenate([x, extra]), jnp.concatenate([cot, extra_cot]))
    np.testing.assert_array_equal(out2[:6], out)
    np.testing.assert_array_equal(g2[:6], g)


def _label_gradient_median_error(fn, x: np.ndarray) -> float:
    """Median relative error, against float64, of the gradient entry at each row's largest
    logit, with the one-hot cotangent on that entry: ``1 - a_y`` (log_softmax) or
    ``a_y (1 - a_y)`` (softmax), where cancellation shows any rounding of ``x_y - lse``."""
    label = np.argmax(x, axis=-1)
    cot = np.eye(x.shape[-1], dtype=np.float32)[label]
    rows = np.arange(x.shape[0])
    _, g = _vjp(fn, jnp.asarray(x), jnp.asarray(cot))
    with jax.enable_x64(True):
        _, want = _vjp(fn, jnp.asarray(x, jnp.float64), jnp.asarray(cot, jnp.float64))
    got, want = np.asarray(g, np.float64)[rows, label], np.asarray(want)[rows, label]
    return float(np.median(np.abs(got - want) / np.abs(want)))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_label_gradient_is_as_accurate_as_jax_nn(name):
    """Large-ish logits (about 10, so that ``lse`` is too): ``x_y - lse`` must not be
    computed as the difference of two large numbers."""
    ours, theirs = getattr(sj, name), getattr(jax.nn, name)
    rng = np.random.default_rng(32)
    x = (rng.normal(size=(256, 16)) * 3 + 10).astype(np.float32)
    # the reference is the float64 computation of jax.nn (the plain shifted formula)
    mine, nn = _label_gradient_median_error(ours, x), _label_gradient_median_error(theirs, x)
    assert mine <= nn * 1.05, (mine, nn)
