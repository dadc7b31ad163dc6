"""The fused losses read ``where`` one way: a boolean mask of ``x``'s leading shape, or one
that broadcasts to it (NumPy broadcasting), one flag per token. A broadcast mask gives what
the mask broadcast by hand gives; any other dtype or shape raises, naming the rule."""

from __future__ import annotations

import numpy as np
import pytest

from softmax_jax.fused import (
    linear_log_probs,
    linear_softmax_cross_entropy,
    linear_softmax_distillation,
)
from tests import _inputs

_B, _T, _D, _V = 2, 3, 4, 7
_X = _inputs.normal(0, (_B, _T, _D))
_W = _inputs.normal(1, (_D, _V))
_TX = _inputs.normal(2, (_B, _T, 3))
_TW = _inputs.normal(3, (3, _V))
_LABELS = _inputs.integers(4, (_B, _T), _V)

_LOSSES = {
    "cross_entropy": lambda where: linear_softmax_cross_entropy(
        _X, _W, _LABELS, where=where, reduction="none"),
    "distillation": lambda where: linear_softmax_distillation(
        _X, _W, _TX, _TW, where=where, reduction="none"),
    "log_probs": lambda where: linear_log_probs(_X, _W, _LABELS, where=where),
}

_MASKS = {
    "per_position": np.array([True, False, True]),  # [T]: the same positions in every row
    "per_sequence": np.array([[True], [False]]),  # [B, 1]: whole sequences
    "scalar": np.array(False),
}


@pytest.mark.parametrize("mask", list(_MASKS))
@pytest.mark.parametrize("loss", list(_LOSSES))
def test_fused_where_broadcasts_to_the_token_shape(loss, mask):
    where = _MASKS[mask]
    got = _LOSSES[loss](where)
    want = _LOSSES[loss](np.broadcast_to(where, (_B, _T)))
    np.testing.assert_array_equal(got, want)
    assert np.all(np.asarray(got)[~np.broadcast_to(where, (_B, _T))] == 0.0)


@pytest.mark.parametrize("loss", list(_LOSSES))
def test_fused_where_must_be_boolean(loss):
    with pytest.raises(TypeError, match="where must be a boolean mask"):
        _LOSSES[loss](np.ones((_B, _T), np.int32))


@pytest.mark.parametrize("loss", list(_LOSSES))
def test_fused_where_must_broadcast_to_the_token_shape(loss):
    with pytest.raises(ValueError, match=r"where must be a boolean mask of shape \(2, 3\)"
                                         r" .*broadcasts.*where.shape=\(6,\)"):
        _LOSSES[loss](np.ones((_B * _T,), bool))
