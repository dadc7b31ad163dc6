"""softmax, log_softmax, logsumexp (with ``b``) and sigmoid against the plain formulas, jax.nn and
NumPy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cross_entropy_inputs import device, normal, random_logits, uniform
from _residuals import saved_residuals
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import softmax_jax as sj
from softmax_jax import reference as ref

# logsumexp reduces all axes by default, as jax.nn's does; these tables compare rows.
lse_rows = functools.partial(sj.logsumexp, axis=-1)


SOFTMAX_FAMILY = [
    (sj.softmax, ref.softmax, jax.nn.softmax),
    (sj.log_softmax, ref.log_softmax, jax.nn.log_softmax),
    (lse_rows, ref.logsumexp, jax.nn.logsumexp),
]


FAMILY_IDS = ["softmax", "log_softmax", "logsumexp"]


def _vjp(fn, x, cot):
    out, pullback = jax.vjp(fn, x)
    return out, pullback(cot)[0]


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


@pytest.mark.parametrize("fn,ref_fn,_", SOFTMAX_FAMILY, ids=FAMILY_IDS)
def test_family_matches_reference_float64(x64, fn, ref_fn, _):
    x = normal(0, (6, 9), 5.0, np.float64)
    out = fn(x)
    cot = normal(1, out.shape, dtype=np.float64)
    got, got_vjp = _vjp(fn, x, cot)
    want, want_vjp = _vjp(ref_fn, x, cot)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_vjp, want_vjp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn,ref_fn,_", SOFTMAX_FAMILY, ids=FAMILY_IDS)
def test_family_matches_reference_float32(fn, ref_fn, _):
    x = normal(2, (5, 33), 4.0)
    cot = normal(3, fn(x).shape)
    got, got_vjp = _vjp(fn, x, cot)
    want, want_vjp = _vjp(ref_fn, x, cot)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_vjp, want_vjp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn,_,nn_fn", SOFTMAX_FAMILY, ids=FAMILY_IDS)
def test_family_matches_jax_nn(fn, _, nn_fn):
    x = normal(4, (4, 3, 7), 3.0)
    nn_fn = jax.jit(nn_fn, static_argnames="axis")  # one program per axis, not per operation
    for axis in (0, 1, -1):
        np.testing.assert_allclose(fn(x, axis=axis), nn_fn(x, axis=axis), rtol=1e-6, atol=1e-6)


def test_softmax_against_float64_numpy():
    x = np.random.default_rng(0).normal(size=(8, 100)).astype(np.float32) * 10
    np.testing.assert_allclose(sj.softmax(x), ref.np_softmax(x), rtol=2e-5, atol=1e-7)


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
    x = normal(5, (3, 5), dtype=np.float64)
    check_grads(fn, (x,), order=2, modes=["rev"])


def test_hessian_through_reverse_over_reverse(x64):
    x = normal(6, (7,), dtype=np.float64)
    h = jax.jacrev(jax.grad(sj.logsumexp))(x)
    a = ref.np_softmax(np.asarray(x))
    np.testing.assert_allclose(h, np.diag(a) - np.outer(a, a), atol=1e-12)


def test_jax_hessian_forward_over_reverse_works(x64):
    x = normal(13, (6,), dtype=np.float64)
    h = jax.hessian(lambda z: sj.softmax_cross_entropy_with_integer_labels(z, 3))(x)
    a = ref.np_softmax(np.asarray(x))
    np.testing.assert_allclose(h, np.diag(a) - np.outer(a, a), atol=1e-12)


def test_forward_mode_is_refused_with_jax_error():
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(sj.softmax, (jnp.ones(3),), (jnp.ones(3),))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jacfwd(sj.logsumexp)(jnp.ones(3))


@pytest.mark.parametrize("fn", [sj.softmax, sj.log_softmax])
def test_axis_equals_moveaxis(fn):
    x = normal(7, (3, 4, 5))
    for axis in range(3):
        want = jnp.moveaxis(fn(jnp.moveaxis(x, axis, -1)), -1, axis)
        np.testing.assert_allclose(fn(x, axis=axis), want, rtol=1e-6)


def test_masked_softmax_equals_slicing_the_entries_away():
    x = normal(8, (4, 6))
    mask = jnp.array([True, False, True, True, False, True])
    keep = np.flatnonzero(mask)
    a = sj.softmax(x, where=mask)
    np.testing.assert_allclose(a[:, keep], sj.softmax(x[:, keep]), rtol=1e-6)
    np.testing.assert_array_equal(a[:, ~np.asarray(mask)], 0.0)
    np.testing.assert_allclose(sj.log_softmax(x, where=mask)[:, keep], sj.log_softmax(x[:, keep]),
                               rtol=1e-6)
    assert np.all(np.isneginf(sj.log_softmax(x, where=mask)[:, ~np.asarray(mask)]))
    np.testing.assert_allclose(lse_rows(x, where=mask), lse_rows(x[:, keep]), rtol=1e-6)
    np.testing.assert_allclose(a, jax.nn.softmax(x, where=mask), rtol=1e-6)


def test_masked_gradients_vanish_and_never_see_masked_nans():
    x = jnp.array([[1.0, jnp.nan, 2.0, jnp.inf], [0.5, -1.0, jnp.nan, 3.0]])
    mask = jnp.array([[True, False, True, False], [True, True, False, True]])
    cot = jnp.arange(8.0).reshape(2, 4)
    for fn in (sj.softmax, sj.log_softmax):
        out, g = _vjp(lambda x, fn=fn: fn(x, where=mask), x, cot)
        assert np.all(np.isfinite(g)), fn
        np.testing.assert_array_equal(np.asarray(g)[~np.asarray(mask)], 0.0)
    g = jax.grad(lambda x: lse_rows(x, where=mask).sum())(x)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~np.asarray(mask)] == 0.0)


def test_fully_masked_row():
    x = normal(9, (2, 4))
    mask = jnp.array([[False] * 4, [True] * 4])
    np.testing.assert_array_equal(sj.softmax(x, where=mask)[0], 0.0)
    np.testing.assert_allclose(sj.softmax(x, where=mask)[1].sum(), 1.0, rtol=1e-6)
    assert np.isneginf(lse_rows(x, where=mask)[0])
    for fn in (sj.softmax, sj.log_softmax, lse_rows):
        g = jax.grad(lambda x, fn=fn: jnp.nansum(jnp.where(jnp.isinf(y := fn(x, where=mask)),
                                                           0.0, y)))(x)
        np.testing.assert_array_equal(g[0], 0.0)


def test_row_mask_is_n_by_1_and_masks_follow_numpy_broadcasting():
    x = normal(10, (3, 5))
    rows = jnp.array([True, False, True])[:, None]
    np.testing.assert_array_equal(sj.softmax(x, where=rows)[1], 0.0)
    np.testing.assert_allclose(sj.softmax(x, where=rows)[0], sj.softmax(x)[0], rtol=1e-6)
    # a (V,) mask on square logits masks classes, as in jax.nn, never rows
    sq = normal(14, (4, 4))
    cls = jnp.array([True, True, True, False])
    for fn, nn_fn in [(sj.softmax, jax.nn.softmax), (sj.log_softmax, jax.nn.log_softmax)]:
        np.testing.assert_allclose(fn(sq, where=cls), nn_fn(sq, where=cls), rtol=1e-6)
    z = random_logits(4, 4)
    mask = jnp.array([True, True, False, True])
    np.testing.assert_allclose(sj.softmax(z, where=mask), jax.nn.softmax(z, where=mask),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="where"):
        sj.softmax(x, where=jnp.array([True, False, True]))


def test_extreme_logits_stay_finite():
    x = jnp.array([[3e38, 2.9e38, -3e38, -jnp.inf], [-3e38, -3e38, -3e38, -3e38]])
    a = sj.softmax(x)
    np.testing.assert_allclose(a[0], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(a[1], [0.25] * 4)
    np.testing.assert_allclose(lse_rows(x), [3e38, -3e38 + np.log(4.0)], rtol=1e-6)
    np.testing.assert_allclose(sj.log_softmax(x)[0, :2], [0.0, -1e37], rtol=1e-6)
    for fn in (sj.softmax, sj.log_softmax, lse_rows):
        g = jax.grad(lambda x, fn=fn: jnp.sum(jnp.where(jnp.isinf(y := fn(x)), 0.0, y)))(x)
        assert not np.any(np.isnan(g)), fn


def test_all_neg_inf_row_gives_neg_inf_not_nan():
    x = jnp.full((1, 3), -jnp.inf)
    assert np.isneginf(lse_rows(x)[0])
    g = jax.grad(lambda x: lse_rows(x).sum())(x)
    np.testing.assert_array_equal(g, 0.0)


def test_nan_propagates():
    x = jnp.array([[1.0, jnp.nan, 2.0], [1.0, 2.0, 3.0]])
    assert np.all(np.isnan(sj.softmax(x)[0])) and not np.any(np.isnan(sj.softmax(x)[1]))
    assert np.all(np.isnan(sj.log_softmax(x)[0]))
    assert np.isnan(lse_rows(x)[0])
    assert np.isnan(sj.sigmoid(jnp.nan))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    x32 = normal(11, (4, 300), 8.0)
    x = x32.astype(dtype)
    want = sj.softmax(x.astype(jnp.float32))
    got = sj.softmax(x)
    assert got.dtype == dtype
    # one rounding of the f32 result: relative error within the format's epsilon
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=float(jnp.finfo(dtype).eps),
                               atol=1e-7)
    g = jax.grad(lambda x: lse_rows(x).sum())(x)
    assert g.dtype == dtype
    lse = lse_rows(x)
    np.testing.assert_allclose(lse.astype(jnp.float32), lse_rows(x.astype(jnp.float32)),
                               rtol=float(jnp.finfo(dtype).eps))


def test_jit_vmap_and_grad_compose():
    x = normal(12, (6, 10))
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
    res = saved_residuals(lambda x: lse_rows(x).sum(), x)
    big = [(shape, why) for shape, why in res if shape == (8, 16)]
    assert len(big) == 1 and "argument" in big[0][1], res


# Values are drawn afresh for each example; the shapes come from a small set, so that the
# examples share a few compiled programs (one per shape and axis) instead of one each.
PROPERTY_SHAPES = [(1,), (6,), (4, 1), (3, 5), (2, 3, 4)]


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from(PROPERTY_SHAPES),
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
        want = np.where(mask, ref.np_softmax(xm, axis), 0.0)
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


@pytest.mark.parametrize("fn", [sj.softmax, sj.log_softmax, lse_rows], ids=FAMILY_IDS)
def test_rows_are_bitwise_independent_of_other_rows(fn):
    """One unrelated row with a logit of 100 (outside any unshifted fast path) leaves every
    other row's value and gradient bit for bit as they were."""
    x = normal(30, (6, 12), 3.0)
    extra = jnp.zeros((1, 12)).at[0, 5].set(100.0)
    cot = normal(31, fn(x).shape)
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
    ours, theirs = getattr(sj, name), jax.jit(getattr(jax.nn, name))
    rng = np.random.default_rng(32)
    x = (rng.normal(size=(256, 16)) * 3 + 10).astype(np.float32)
    # the reference is the float64 computation of jax.nn (the plain shifted formula)
    mine, nn = _label_gradient_median_error(ours, x), _label_gradient_median_error(theirs, x)
    assert mine <= nn * 1.05, (mine, nn)


def _assert_like_jax_nn(ours, theirs, rtol=2e-5, atol=1e-6):
    """Equal where jax.nn is finite; where jax.nn's gradient is NaN only because a row is empty
    (all -inf or masked), ours is 0 instead (the documented double-where)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (ours, theirs)
    nan = np.isnan(theirs)
    np.testing.assert_allclose(ours[~nan], theirs[~nan], rtol=rtol, atol=atol)
    assert np.all(np.isnan(ours[nan]) | (ours[nan] == 0)), (ours, theirs)


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4)])
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_axis_none_normalises_over_all_axes_as_jax_nn(name, shape):
    ours, theirs = getattr(sj, name), getattr(jax.nn, name)
    x = normal(40, shape, 3.0)
    cot = normal(41, jax.eval_shape(lambda x: theirs(x, axis=None), x).shape)
    mask = np.arange(shape[-1]) % 3 != 1 if shape else None

    @jax.jit  # one program for all the calls below
    def run(x, cot):
        out = {"ours": _vjp(lambda x: ours(x, axis=None), x, cot),
               "theirs": _vjp(lambda x: theirs(x, axis=None), x, cot)}
        if shape:
            out["masked"] = (ours(x, axis=None, where=mask), theirs(x, axis=None, where=mask))
        if name == "logsumexp":
            out["default"] = sj.logsumexp(x)
        return out

    out = run(x, cot)
    (got, g), (want, gw) = out["ours"], out["theirs"]
    _assert_like_jax_nn(got, want)
    _assert_like_jax_nn(g, gw)
    if shape:
        _assert_like_jax_nn(*out["masked"])
    if name == "logsumexp":  # its default is all axes too
        np.testing.assert_array_equal(out["default"], got)


def _scale(kind: str, shape: tuple[int, ...]) -> jax.Array | float | None:
    """Scale factors ``b`` for logsumexp: none, positive, with negatives, broadcast, scalar."""
    draw = np.random.default_rng(42)
    if kind == "none":
        return None
    if kind == "positive":
        return device(draw.uniform(0.1, 2.0, shape), np.float32)
    if kind == "negatives":  # some rows sum to a negative number
        return device(draw.normal(size=shape), np.float32)
    if kind == "broadcast":
        return device(draw.uniform(-0.5, 2.0, shape[-1:]), np.float32)
    return 2.5


@pytest.mark.parametrize("b_kind", ["none", "positive", "negatives", "broadcast", "scalar"])
@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2)], ids=["None", "0", "-1", "(0,2)"])
def test_logsumexp_matches_jax_nn(axis, b_kind):
    """Values, signs and gradients for both ``a`` and ``b``, over keepdims, return_sign,
    where and -inf entries. (Rows of only -inf are tested apart: there jax.nn's gradient
    is NaN, which a broadcast ``b`` sums into every entry of its gradient.)"""
    shape = (3, 4, 5)
    a = 3.0 * np.random.default_rng(43).standard_normal(shape).astype(np.float32)
    a[0, 1, 2] = a[2, 0, 1] = -np.inf
    a = device(a)
    b = _scale(b_kind, shape)
    for keepdims in (False, True):
        for return_sign in (False, True):
            for where in (None, np.arange(5) != 3):
                kw = dict(axis=axis, keepdims=keepdims, return_sign=return_sign, where=where)

                def value(fn, a, b, kw=kw):
                    out = fn(a, b=b, **kw)
                    lse = out[0] if kw["return_sign"] else out
                    cot = jnp.cos(jnp.arange(lse.size, dtype=lse.dtype)).reshape(lse.shape)
                    return jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * cot), out

                argnums = (1,) if b is None or b_kind == "scalar" else (1, 2)
                (_, got), g = jax.value_and_grad(value, argnums, has_aux=True)(
                    sj.logsumexp, a, b)
                (_, want), gw = jax.value_and_grad(value, argnums, has_aux=True)(
                    jax.nn.logsumexp, a, b)
                for o, t in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                    _assert_like_jax_nn(o, t)
                for o, t in zip(g, gw, strict=True):
                    _assert_like_jax_nn(o, t, rtol=1e-4, atol=1e-5)


def test_logsumexp_b_rule_matches_float64_formula(x64):
    """The ``b`` rule against ``jax.grad`` of the plain :math:`\\log|\\sum_k b_k e^{a_k}|` in
    float64, including zero weights, whose gradient is :math:`e^{a_k} / S` (jax.nn's autodiff
    gives 0 there, since it drops those terms before differentiating)."""
    rng = np.random.default_rng(44)
    a = jnp.asarray(rng.normal(size=(4, 6)) * 2)
    b = jnp.asarray(rng.normal(size=(4, 6))).at[:, 1].set(0.0)
    cot = jnp.asarray(rng.normal(size=4))

    def plain(a, b):
        return jnp.vdot(jnp.log(jnp.abs(jnp.sum(b * jnp.exp(a), axis=-1))), cot)

    def ours(a, b):
        return jnp.vdot(sj.logsumexp(a, -1, b, return_sign=True)[0], cot)

    np.testing.assert_allclose(ours(a, b), plain(a, b), rtol=1e-13)
    for got, want in zip(jax.grad(ours, (0, 1))(a, b), jax.grad(plain, (0, 1))(a, b),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-14)
    sign = sj.logsumexp(a, -1, b, return_sign=True)[1]
    np.testing.assert_array_equal(sign, np.sign(np.sum(b * np.exp(a), axis=-1)))
    positive = jnp.abs(b) + 0.1  # |b| has a kink at the zero weights; keep the check smooth
    check_grads(lambda a, b: sj.logsumexp(a, -1, b), (a, positive), order=2, modes=["rev"])


def test_logsumexp_zero_weight_drops_an_infinite_or_nan_entry():
    a = jnp.array([1.0, jnp.inf, jnp.nan, 2.0])
    b = jnp.array([1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(sj.logsumexp(a, b=b), np.logaddexp(1.0, 2.0), rtol=1e-6)
    np.testing.assert_allclose(sj.logsumexp(a, b=b), jax.nn.logsumexp(a, b=b), rtol=1e-6)
    ga = jax.grad(lambda a: sj.logsumexp(a, b=b))(a)
    np.testing.assert_allclose(ga, jax.grad(lambda a: jax.nn.logsumexp(a, b=b))(a), rtol=1e-6)


def test_logsumexp_negative_sum_is_nan_with_zero_gradient_unless_the_sign_is_asked():
    a, b = jnp.array([0.0, 1.0]), jnp.array([1.0, -1.0])
    assert np.isnan(sj.logsumexp(a, b=b)) and np.isnan(jax.nn.logsumexp(a, b=b))
    np.testing.assert_array_equal(jax.grad(lambda a: sj.logsumexp(a, b=b))(a), 0.0)
    lse, sign = sj.logsumexp(a, b=b, return_sign=True)
    np.testing.assert_allclose([lse, sign], [np.log(np.e - 1), -1.0], rtol=1e-6)
    # d log|S| / d a = b e^a / S, with S = 1 - e < 0
    g = jax.grad(lambda a: sj.logsumexp(a, b=b, return_sign=True)[0])(a)
    np.testing.assert_allclose(g, [1 / (1 - np.e), -np.e / (1 - np.e)], rtol=1e-6)


def test_logsumexp_b_saves_only_its_inputs_and_per_row_numbers():
    a, b = jnp.ones((8, 16)), jnp.full((8, 16), 0.5)
    res = saved_residuals(lambda a, b: sj.logsumexp(a, -1, b).sum(), a, b)
    big = [why for shape, why in res if shape == (8, 16)]
    # a and b themselves; the rest is per row (the shift and the signed sum)
    assert len(big) == 2 and "argument a" in big[0], res
    assert all(shape in {(8, 16), (8,), (8, 1)} for shape, _ in res), res


def test_logsumexp_b_refuses_bad_scale_factors():
    with pytest.raises(ValueError, match="b.shape"):
        sj.logsumexp(jnp.ones(3), b=jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="b must be a real"):
        sj.logsumexp(jnp.ones(3), b=jnp.ones(3, jnp.complex64))
    with pytest.raises(ValueError, match="where"):
        sj.logsumexp(jnp.ones((3, 4)), axis=-1, where=jnp.ones(3, bool))


# every shape with every axis, except a pair of axes on the 1-D shape, which has only one
@pytest.mark.parametrize(("shape", "axis"), [
    pytest.param(shape, axis, id=f"{shape}-{axis}".replace(" ", ""))
    for shape in [(0,), (0, 3), (2, 0), (2, 0, 3)] for axis in [-1, 0, None, (0, -1)]
    if not (isinstance(axis, tuple) and len(shape) < 2)
])
def test_zero_size_inputs_behave_as_in_jax_nn(shape, axis):
    @jax.jit  # one program for every call below: each would compile its own
    def run(x):
        out = {}
        for name in ("softmax", "log_softmax"):
            out[name] = (getattr(sj, name)(x, axis=axis), getattr(jax.nn, name)(x, axis=axis),
                         jax.grad(lambda x, name=name: getattr(sj, name)(x, axis=axis).sum())(x))
        for b in (None, 2.0, -1.0):
            for keepdims in (False, True):
                out[f"{b} {keepdims}"] = (sj.logsumexp(x, axis, b, keepdims, return_sign=True),
                                    jax.nn.logsumexp(x, axis, b, keepdims, return_sign=True))
            out[f"grad {b}"] = jax.grad(lambda x, b=b: jnp.sum(jnp.where(
                jnp.isinf(y := sj.logsumexp(x, axis, b)), 0.0, y)))(x)
        return out

    out = run(jnp.zeros(shape))
    for name in ("softmax", "log_softmax"):
        got, want, g = out[name]
        assert got.shape == want.shape == shape and got.dtype == want.dtype
        assert g.shape == shape
    for b in (None, 2.0, -1.0):
        for keepdims in (False, True):
            for o, t in zip(*out[f"{b} {keepdims}"], strict=True):
                np.testing.assert_array_equal(o, t)  # -inf and sign 0 where the axis is empty
                assert o.shape == t.shape and o.dtype == t.dtype
        assert out[f"grad {b}"].shape == shape


def test_scalar_input_with_axis_none_is_its_own_row():
    x = jnp.float32(3.0)
    for name in ("softmax", "log_softmax", "logsumexp"):
        np.testing.assert_array_equal(getattr(sj, name)(x, axis=None),
                                      getattr(jax.nn, name)(x, axis=None))
    np.testing.assert_allclose(sj.logsumexp(x, b=2.0), 3.0 + np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(sj.logsumexp)(x), 1.0)


def test_logsumexp_b_under_jit_vmap_hessian_and_low_precision():
    a = normal(45, (4, 6))
    b = uniform(46, (4, 6), 0.1, 1.1)
    got = jax.vmap(jax.value_and_grad(lambda r, s: sj.logsumexp(r, b=s), (0, 1)))(a, b)
    want = jax.jit(jax.vmap(jax.value_and_grad(lambda r, s: jax.nn.logsumexp(r, b=s),
                                               (0, 1))))(a, b)
    for o, t in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(o, t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda a, b: sj.logsumexp(a, -1, b))(a, b),
                               jax.nn.logsumexp(a, -1, b), rtol=1e-6)
    h = jax.hessian(lambda r: sj.logsumexp(r, b=b[0]))(a[0])
    np.testing.assert_allclose(h, jax.jit(jax.hessian(lambda r: jax.nn.logsumexp(r, b=b[0])))(a[0]),
                               rtol=1e-4, atol=1e-6)
    x16 = a.astype(jnp.bfloat16)
    for scale, dtype in [(2.0, jnp.bfloat16), (b, jnp.float32)]:  # a and b promote together
        lse = sj.logsumexp(x16, -1, scale)
        assert lse.dtype == jax.nn.logsumexp(x16, -1, scale).dtype == dtype
        g = jax.grad(lambda x, s=scale: sj.logsumexp(x, -1, s).astype(jnp.float32).sum())(x16)
        assert g.dtype == jnp.bfloat16
        want = sj.logsumexp(x16.astype(jnp.float32), -1, scale)
        np.testing.assert_allclose(lse.astype(jnp.float32), want, rtol=float(jnp.finfo(dtype).eps))


@pytest.mark.parametrize("rows", [3, 4096], ids=["small", "vectorised"])
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp", "softmax_entropy"])
def test_empty_row_gets_zero_gradient_under_a_large_cotangent(name, rows):
    # A row with no entry above -inf (here the last: all -inf) has nothing to normalise: its
    # gradient is 0 under a cotangent as large as 1e30 (log_softmax passes its cotangent
    # through, as g - a sum(g) with a = 0); the other rows' gradient is linear in the
    # cotangent, so 1e30 times that under the cotangent divided by 1e30.
    z = np.random.default_rng(3).standard_normal((rows, 64)).astype(np.float32)
    z[-1] = -np.inf
    fn = functools.partial(getattr(sj, name), axis=-1)
    shape = jax.eval_shape(fn, jax.ShapeDtypeStruct(z.shape, jnp.float32)).shape
    unit = np.random.default_rng(4).uniform(0.5, 1.5, shape).astype(np.float32)

    @jax.jit
    def vjp(a, c):
        return jax.vjp(fn, a)[1](c)[0]

    big = np.asarray(vjp(device(z), device(1e30 * unit)))
    want = 1e30 * unit[-1] if name == "log_softmax" else np.zeros(64, np.float32)
    np.testing.assert_array_equal(big[-1], want)
    small = np.asarray(vjp(device(z), device(unit)))
    np.testing.assert_allclose(big[:-1], 1e30 * small[:-1].astype(np.float64), rtol=1e-5,
                               atol=1e30 * 1e-6)
