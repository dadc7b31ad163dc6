"""The contrastive rules keep the pair engine's protocol (:class:`PairRule`): frozen,
hashable dataclasses (a ``jax.jit`` static argument), whose declared sizes match what
they return for a tile and for the statistics, in both the full and the gradient-only form
(traced with ``jax.eval_shape``: nothing is compiled)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax.fused.blocks import Tokens
from softmax_jax.fused.contrastive_rules import ClipRule, SigmoidRule
from softmax_jax.fused.pair_interface import PairRule, Stats, Tile
from tests import _inputs

_TB, _NT, _M = 2, 2, 4  # rows viewed [tb, nt]; columns [M]
_Z = _inputs.normal(0, (_TB, _M))
_TILE = Tile(_Z, None, jnp.asarray(np.eye(_TB, _M, dtype=bool)))
_RULES = {"clip": ClipRule(True), "clip_one_way": ClipRule(False), "sigmoid": SigmoidRule()}


def _stats(rule: PairRule) -> Stats:
    row = _inputs.uniform(1, (_TB, _NT), 1.0, 2.0)
    col = _inputs.uniform(2, (_M,), 1.0, 2.0)
    return Stats(row, row, (row,) * rule.sizes().sums, col, col)


@pytest.mark.parametrize("name", list(_RULES))
def test_pair_rule_is_a_frozen_hashable_dataclass(name):
    rule = _RULES[name]
    assert PairRule in type(rule).__mro__  # a subclass: it inherits the defaults
    assert dataclasses.is_dataclass(rule)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.__setattr__(dataclasses.fields(rule)[0].name, None)
    assert hash(rule) == hash(dataclasses.replace(rule)) and rule == dataclasses.replace(rule)
    assert rule.gradient_only() != rule


@pytest.mark.parametrize("gradient_only", [False, True], ids=["full", "gradient_only"])
@pytest.mark.parametrize("name", list(_RULES))
def test_pair_rule_returns_what_its_sizes_declare(name, gradient_only):
    rule = _RULES[name].gradient_only() if gradient_only else _RULES[name]
    sizes = rule.sizes()
    sums = jax.eval_shape(rule.sums, _TILE)
    assert len(sums) == sizes.sums
    assert all(s.shape == (_TB,) for s in sums)
    if gradient_only:
        assert sizes.sums == 0
        return

    def tile_gradient(stats, r_row, r_col):
        outs = rule.outputs(stats, Tokens(_TB * _NT, _TB))
        inputs = rule.grad_inputs(outs, r_row, r_col)
        tile_inputs = type(inputs)(tuple(a[:, 0] for a in inputs.rows), inputs.cols)
        return outs, rule.dlogits(_TILE, tile_inputs)

    outs, dz = jax.eval_shape(tile_gradient, _stats(rule), _inputs.normal(3, (_TB, _NT)),
                              _inputs.normal(4, (_M,)))
    assert (len(outs.cols) > 0) == sizes.col_lse
    assert all(a.shape == (_TB, _NT) for a in outs.rows)
    assert all(a.shape == (_M,) for a in outs.cols)
    assert dz.shape == _Z.shape
