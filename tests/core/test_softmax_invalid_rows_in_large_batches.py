"""A row holding NaN or +inf in a batch large enough for XLA:CPU's vectorised (YNNPACK)
reductions, whose max and min skip NaN: the row is NaN throughout, and every other row is
unchanged. The other tests use small shapes, which take XLA's own loops."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _inputs import device

import softmax_jax as sj

# 4096 x 64 float32: the size at which XLA:CPU hands the softmax's reductions to YNNPACK.
N, V = 4096, 64


def _logits() -> np.ndarray:
    z = np.random.default_rng(0).standard_normal((N, V)).astype(np.float32)
    z[1, 5] = np.nan
    z[2, 7] = np.inf
    return z


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_nan_and_inf_rows_are_nan_and_the_others_match_jax_nn(name):
    z = _logits()
    ours = getattr(sj, name)
    theirs = getattr(jax.nn, name)
    kwargs = {"axis": -1, "keepdims": True} if name == "logsumexp" else {"axis": -1}
    got = np.asarray(jax.jit(lambda a: ours(a, **kwargs))(device(z)))
    want = np.asarray(jax.jit(lambda a: theirs(a, **kwargs))(device(z)))
    assert np.isnan(got[1:3]).all(), got[1:3]
    np.testing.assert_allclose(np.delete(got, [1, 2], 0), np.delete(want, [1, 2], 0),
                               rtol=2e-6, atol=2e-6)
