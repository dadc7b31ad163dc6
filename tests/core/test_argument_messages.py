"""Error messages state the values an argument really accepts."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import softmax_jax as sj
from softmax_jax.fused import linear_softmax_cross_entropy

_Z = jnp.zeros((2, 3))


@pytest.mark.parametrize("value", [-1.0, 0.0, float("inf"), float("nan")])
def test_temperature_message_states_the_open_range(value):
    with pytest.raises(ValueError, match=r"temperature must be > 0 and finite, got"):
        sj.distillation_loss(_Z, _Z, temperature=value)


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_z_loss_message_excludes_infinity(value):
    with pytest.raises(ValueError, match=r"z_loss must lie in \[0, inf\), got"):
        sj.softmax_cross_entropy_with_integer_labels(_Z, jnp.array([0, 1]), z_loss=value)


@pytest.mark.parametrize("value", [-2.0, 0.0, float("nan")])
def test_soft_cap_message_states_positive(value):
    with pytest.raises(ValueError, match=r"soft_cap must be > 0, got"):
        linear_softmax_cross_entropy(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.array([0, 1]),
                                     soft_cap=value)


def test_nan_logit_scale_message_says_finite_number():
    with pytest.raises(ValueError, match="logit_scale must be a finite number, got nan"):
        sj.contrastive_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), logit_scale=float("nan"))
