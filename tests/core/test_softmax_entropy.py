"""softmax_entropy against the plain float64 formula, masked and -inf entries, fully masked
rows and reduced precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import softmax_jax as sj
from softmax_jax import reference as ref


def _logits(shape, seed=0, scale=3.0):
    """Normal logits, in float64 under x64 and float32 otherwise."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape))


def _value_and_grad(fn, x, cot):
    out, pullback = jax.vjp(fn, x)
    return out, pullback(cot)[0]


@pytest.mark.usefixtures("x64")
def test_values_and_gradients_match_the_float64_formula():
    x = _logits((5, 7))
    cot = _logits((5,), seed=1)
    got, dgot = _value_and_grad(sj.softmax_entropy, x, cot)
    want, dwant = _value_and_grad(ref.softmax_entropy, x, cot)
    np.testing.assert_allclose(got, want, rtol=1e-13)
    np.testing.assert_allclose(dgot, dwant, rtol=1e-12, atol=1e-14)


@pytest.mark.usefixtures("x64")
def test_axis_matches_moveaxis():
    x = _logits((4, 6, 3))
    np.testing.assert_allclose(sj.softmax_entropy(x, axis=1),
                               ref.softmax_entropy(jnp.moveaxis(x, 1, -1)), rtol=1e-13)
    flat = ref.softmax_entropy(x.reshape(4, 18))
    np.testing.assert_allclose(sj.softmax_entropy(x, axis=(1, 2)), flat, rtol=1e-13)


def test_float32_values_and_gradients_within_rounding_of_float64():
    x = _logits((6, 50)).astype(jnp.float32)
    cot = jnp.ones((6,), jnp.float32)
    got, dgot = _value_and_grad(sj.softmax_entropy, x, cot)
    with jax.enable_x64(True):
        want, dwant = _value_and_grad(ref.softmax_entropy, x.astype(jnp.float64),
                                      cot.astype(jnp.float64))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-6)
    np.testing.assert_allclose(dgot, dwant, rtol=1e-4, atol=1e-6)


def test_gradient_is_minus_a_times_log_a_plus_h():
    z = jnp.array([2.0, 3.0, 4.0])
    a = np.asarray(sj.softmax(z), np.float64)
    h = -np.sum(a * np.log(a))
    np.testing.assert_allclose(jax.grad(sj.softmax_entropy)(z), -a * (np.log(a) + h),
                               rtol=1e-5)
    check_grads(sj.softmax_entropy, (z,), order=1, modes=("rev",))


@pytest.mark.usefixtures("x64")
def test_where_matches_slicing_the_masked_entries_away():
    x = _logits((3, 6))
    keep = jnp.array([True, False, True, True, False, True])
    got, dgot = _value_and_grad(lambda z: sj.softmax_entropy(z, where=keep), x, jnp.ones(3))
    kept = np.flatnonzero(np.asarray(keep))
    want, dwant = _value_and_grad(ref.softmax_entropy, x[:, kept], jnp.ones(3))
    np.testing.assert_allclose(got, want, rtol=1e-13)
    np.testing.assert_allclose(dgot[:, kept], dwant, rtol=1e-12, atol=1e-14)
    assert np.all(np.asarray(dgot)[:, ~np.asarray(keep)] == 0.0)


@pytest.mark.usefixtures("x64")
def test_minus_inf_entries_add_nothing_and_get_zero_gradient():
    x = _logits((2, 5)).at[:, 1].set(-jnp.inf).at[1, 3].set(-jnp.inf)
    got, dgot = _value_and_grad(sj.softmax_entropy, x, jnp.ones(2))
    for row, kept in ((0, [0, 2, 3, 4]), (1, [0, 2, 4])):
        want, dwant = _value_and_grad(ref.softmax_entropy, x[row, jnp.array(kept)], 1.0)
        np.testing.assert_allclose(got[row], want, rtol=1e-13)
        np.testing.assert_allclose(dgot[row, jnp.array(kept)], dwant, rtol=1e-12, atol=1e-14)
    assert dgot[0, 1] == 0.0 and dgot[1, 1] == 0.0 and dgot[1, 3] == 0.0


def test_fully_masked_and_all_minus_inf_rows_give_zero_and_zero_gradient():
    x = jnp.array([[1.0, 2.0, 3.0], [-jnp.inf, -jnp.inf, -jnp.inf], [4.0, jnp.nan, 5.0]])
    keep = jnp.array([[True], [True], [False]])
    got, dgot = _value_and_grad(lambda z: sj.softmax_entropy(z, where=keep), x, jnp.ones(3))
    assert np.isfinite(got[0]) and got[1] == 0.0 and got[2] == 0.0
    assert not np.signbit(got[1]) and not np.signbit(got[2])
    assert np.all(np.asarray(dgot[1:]) == 0.0)


def test_one_certain_class_has_zero_entropy_and_zero_gradient():
    x = jnp.array([[5.0, -jnp.inf, -jnp.inf]])
    got, dgot = _value_and_grad(sj.softmax_entropy, x, jnp.ones(1))
    assert got[0] == 0.0 and not np.signbit(got[0])
    assert np.all(np.asarray(dgot) == 0.0)


def test_plus_inf_makes_only_its_row_nan():
    x = jnp.array([[1.0, jnp.inf], [1.0, 2.0]])
    got = sj.softmax_entropy(x)
    assert np.isnan(got[0]) and np.isfinite(got[1])
    dgot = jax.grad(lambda z: sj.softmax_entropy(z)[1])(x)
    assert np.all(np.isfinite(np.asarray(dgot[1])))


def test_rows_do_not_depend_on_the_rest_of_the_batch():
    x = _logits((4, 9)).astype(jnp.float32)
    alone = sj.softmax_entropy(x[2:3])
    big = sj.softmax_entropy(x.at[0].multiply(1e30))
    assert alone[0] == big[2]


def test_bfloat16_input_keeps_its_dtype_and_is_accurate_to_rounding():
    x = _logits((4, 32)).astype(jnp.bfloat16)
    got = sj.softmax_entropy(x)
    assert got.dtype == jnp.bfloat16
    with jax.enable_x64(True):
        want = ref.softmax_entropy(x.astype(jnp.float64))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-8)


def test_scalar_and_bad_inputs():
    assert sj.softmax_entropy(jnp.array(3.0), axis=None) == 0.0
    with pytest.raises(TypeError, match="logits"):
        sj.softmax_entropy(jnp.array([1, 2]))
    with pytest.raises(ValueError):
        sj.softmax_entropy(jnp.ones((2, 3)), where=jnp.ones((4,), bool))
