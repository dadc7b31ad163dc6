"""Bad input fails at call time with the argument named, never with a silently wrong number."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import softmax_jax as sj

Z = jnp.zeros((4, 5))


Y = jnp.zeros((4,), jnp.int32)


P = jnp.full((4, 5), 0.2)


@pytest.mark.parametrize(
    "call,exc,pattern",
    [
        (lambda: sj.softmax(jnp.arange(5)), TypeError, r"x must be a floating-point.*int32"),
        (lambda: sj.softmax(Z, axis=2), ValueError, r"axis=2 is out of range"),
        (lambda: sj.softmax(Z, axis=1.0), TypeError,
         r"axis must be an int, a tuple of ints or None"),
        (lambda: sj.softmax(Z, axis=(0, 1.0)), TypeError, r"axis must be an int or a tuple"),
        (lambda: sj.softmax(Z, axis=(1, -1)), ValueError, r"names the same axis of x twice"),
        (lambda: sj.logsumexp(Z, axis=()), ValueError, r"at least one axis"),
        (lambda: sj.softmax(Z, axis=(0, 2)), ValueError, r"axis=2 is out of range"),
        (lambda: sj.softmax(Z, axis=(0, 1), where=jnp.ones(3, bool)), ValueError,
         r"where.shape=\(3,\) must broadcast"),
        (lambda: sj.softmax_cross_entropy_with_integer_labels(
            Z[None], jnp.zeros(5, jnp.int32), axis=(0, 2)), ValueError,
         r"labels.shape=\(5,\) must be logits.shape=\(1, 4, 5\) without axis \(0, 2\)"),
        (lambda: sj.softmax(jnp.float32(1.0)), ValueError, r"at least one dimension"),
        (lambda: sj.softmax(Z, where=jnp.ones((3,), bool)), ValueError, r"where.shape=\(3,\)"),
        (lambda: sj.softmax(Z, where=jnp.ones((4, 5))), TypeError, r"where must be a boolean"),
        (lambda: sj.softmax_cross_entropy_with_integer_labels(Z, jnp.zeros(4)), TypeError,
         r"labels must be an integer array.*float32.*softmax_cross_entropy"),
        (lambda: sj.softmax_cross_entropy_with_integer_labels(Z, jnp.zeros((5,), jnp.int32)),
         ValueError, r"labels.shape=\(5,\) must be logits.shape=\(4, 5\) without axis 1"),
        (lambda: sj.softmax_cross_entropy_with_integer_labels(Z.astype(jnp.int32), Y),
         TypeError, r"logits must be a floating-point"),
        (lambda: sj.softmax_cross_entropy_with_integer_labels(Z, Y, label_smoothing=1.5),
         ValueError, r"label_smoothing must lie in \[0, 1\], got 1.5"),
        (lambda: sj.softmax_cross_entropy_with_integer_labels(Z, Y, label_smoothing=-0.1),
         ValueError, r"label_smoothing"),
        (lambda: sj.softmax_cross_entropy_with_integer_labels(Z, Y, z_loss=-1.0),
         ValueError, r"z_loss must lie in \[0, inf\)"),
        (lambda: sj.softmax_cross_entropy_with_integer_labels(Z, Y, ignore_index=1.0),
         TypeError, r"ignore_index must be an int"),
        (lambda: sj.softmax_cross_entropy_with_integer_labels(Z, Y, label_smoothing=jnp.ones(2)),
         ValueError, r"label_smoothing must be a scalar"),
        (lambda: sj.softmax_cross_entropy(Z, P[:, :4]), ValueError,
         r"labels.shape=\(4, 4\) must equal or broadcast to logits.shape=\(4, 5\)"),
        (lambda: sj.softmax_cross_entropy(Z, Y), ValueError,
         r"labels.shape=\(4,\) must .*integer one-hot labels.*integer_labels"),
        (lambda: sj.softmax_cross_entropy(Z, P.astype(jnp.complex64)), TypeError,
         r"labels must be a floating-point array of probabilities or integer one-hot"),
        (lambda: sj.softmax_cross_entropy_with_integer_labels(Z, Y, where=jnp.ones(5, bool)),
         ValueError, r"where.shape=\(5,\) has the labels' rank.*where\[None, :\]"),
        (lambda: sj.softmax_cross_entropy(Z[None], P[None], where=jnp.ones(5, bool)),
         ValueError, r"where.shape=\(5,\) must have the logits' rank 3.*labels' rank 2"),
        (lambda: sj.softmax_cross_entropy_with_integer_labels(Z, Y, ignore_index=2**40),
         ValueError, r"ignore_index=1099511627776 lies outside the range of the int32"),
        (lambda: sj.distillation_loss(Z, Z, temperature=float("inf")), ValueError,
         r"temperature must be > 0 and finite, got inf"),
        (lambda: sj.log_likelihood(P, P[:2]), ValueError, r"probs and labels"),
        (lambda: sj.sigmoid_binary_cross_entropy(Z, jnp.zeros((4, 5), jnp.complex64)),
         TypeError, r"labels must be floating-point probabilities or integer/boolean"),
        (lambda: sj.sigmoid_binary_cross_entropy(Z[:, :1], P[:, 0]), ValueError,
         r"labels.shape=\(4,\) must equal or broadcast to logits.shape=\(4, 1\)"),
        (lambda: sj.sigmoid_binary_cross_entropy(Z, P[:, :3]), ValueError,
         r"labels.shape=\(4, 3\)"),
        (lambda: sj.sigmoid_binary_cross_entropy(jnp.zeros(3, jnp.int32), jnp.zeros(3)),
         TypeError, r"logits must be a floating-point"),
        (lambda: sj.quadratic_cost(P, P.T), ValueError, r"activations and targets"),
        (lambda: sj.sigmoid(jnp.array([True])), TypeError, r"x must be a floating-point"),
    ],
)
def test_bad_input_raises_with_the_argument_named(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_checks_also_fire_under_jit():
    with pytest.raises(ValueError, match="labels.shape"):
        jax.jit(lambda z: sj.softmax_cross_entropy_with_integer_labels(z, jnp.zeros(3, int)))(Z)


def test_row_mask_and_class_mask_shapes_are_accepted():
    x = jnp.arange(20.0).reshape(4, 5)
    rows = sj.softmax(x, where=jnp.array([True, False, True, True])[:, None])
    assert float(rows[1].sum()) == 0.0
    with pytest.raises(ValueError, match=r"where\[:, None\]"):
        sj.softmax(x, where=jnp.array([True, False, True, True]))
    classes = sj.softmax(x, where=jnp.array([True, True, False, True, True]))
    assert float(classes[:, 2].sum()) == 0.0
    assert float(classes[0].sum()) == pytest.approx(1.0)
