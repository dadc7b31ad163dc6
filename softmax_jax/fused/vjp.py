r"""The ``custom_vjp`` shared by every fused loss: a rule
(:class:`~softmax_jax.fused.interface.Rule`), the engine, and two strategies.

- ``"mean"`` and ``"sum"`` (:func:`reduced`): the gradients are computed inside the forward
  pass, with per-row weights :math:`r_i = s_i / \mathrm{den}` (``s`` the row scale: 1
  counted, 0 ignored, NaN invalid; ``den`` the kept count or, with class weights, PyTorch's
  summed label weights), and are the only residuals; the backward pass scales them by the
  incoming cotangent.
- ``"none"`` (:func:`per_token`): the forward pass keeps each row's statistics (O(N)); the
  backward pass recomputes the blocks with :math:`r_i = s_i \bar g_i`. A rule may give
  several outputs per row (a ``[N, k]`` loss, as the log-probabilities and entropies do) or
  differentiable auxiliary outputs (the cross-entropy's log-sum-exp under ``return_stats``):
  ``r`` then has one column per cotangent (``Rule.weights``, ``Rule.aux_weights``), all
  joined in the same recomputing pass. A "mean" or "sum" with differentiable auxiliary
  outputs is the per-token strategy, reduced outside the rule.

Each cotangent comes back in its primal's dtype and with its primal's varying mesh axes
(partial sums over a vocabulary or data axis are ``psum``-ed). The rule's constant inputs
(labels, class weights, the teacher's head) get zero cotangents. A hyper-parameter out of
range (traced, so it could not raise; :meth:`~softmax_jax.fused.interface.Rule.valid`)
makes the loss and every cotangent NaN, as in the unfused losses.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax import _validation as _v

from . import blocks, engine, vma
from .interface import Rule


class Static(NamedTuple):
    """Static (hashable) facts of one call."""

    rule: Rule
    engine: engine.Options
    reduction: str
    vma_x: frozenset
    vma_w: frozenset
    vma_b: frozenset
    dtypes: tuple[str, str, str | None]  # of x, w, b
    token_axes: tuple = ()  # mesh axes the tokens of "mean"/"sum" are split over


def _scale(static: Static, w: jax.Array, consts: Any) -> tuple[np.dtype, jax.Array]:
    """The compute dtype and the rule's row scale (1 counted, 0 ignored, NaN invalid)."""
    ct = _v.compute_dtype(*static.dtypes[:2])
    num_classes = blocks.num_classes(w.shape[1], static.engine.axis_name)
    return ct, static.rule.scale(consts, num_classes, ct)


def _valid(static: Static, params: Any, cap: jax.Array) -> jax.Array:
    """Whether the traced hyper-parameters are in range (the rule's, and a soft cap > 0)."""
    ok = static.rule.valid(params)
    return ok & (cap > 0) if static.engine.capped else ok


def _over_tokens(static: Static, value: jax.Array) -> jax.Array:
    """A sum over this device's tokens made a sum over every device's (``token_axes``)."""
    return vma.total(value, static.token_axes) if static.token_axes else value


def _cast(static: Static, grads: engine.Grads, g: jax.Array, dparams: Any):
    """``g`` times the gradients, each in its primal's dtype and varying axes."""
    dx = vma.match_varying(g * grads.dx, static.vma_x).astype(static.dtypes[0])
    dw = vma.match_varying(g.astype(grads.dw.dtype) * grads.dw, static.vma_w)
    dw = dw.astype(static.dtypes[1])
    db = None
    if grads.db is not None:
        db = vma.match_varying(g * grads.db, static.vma_b).astype(static.dtypes[2])
    dparams = jax.tree.map(lambda p: vma.match_varying(g * p, frozenset()), dparams)
    dcap = vma.match_varying(g * grads.dcap, frozenset())
    return dx, dw, db, dparams, dcap


def _run(static, x, w, b, consts, params, cap, r=None, saved=None):
    rule = static.rule
    return engine.run(rule, static.engine, rule.heads(x, w, b, consts), rule.rows(consts),
                      rule.classes(consts), params, cap, r, saved)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def reduced(static: Static, x, w, b, consts, params, cap) -> tuple[jax.Array, tuple]:
    """``(loss, aux)``: the summed (or averaged) loss, with gradients formed in the forward
    pass, and the rule's auxiliary per-token outputs (no gradient)."""
    return _reduced_fwd(static, x, w, b, consts, params, cap)[0]


def _inverse_denominator(static: Static, consts, scale: jax.Array) -> jax.Array:
    """The factor of the summed loss: 1 for ``"sum"``, ``1 / den`` for ``"mean"``."""
    if static.reduction != "mean":
        return jnp.ones((), scale.dtype)
    den = _over_tokens(static, static.rule.denominator(consts, scale))
    # Nothing counted: loss 0 and gradients 0 rather than 0 / 0 (PyTorch: NaN). Counted
    # tokens whose label weights add up to 0: NaN, as PyTorch's weighted mean gives.
    kept = _over_tokens(static, jnp.sum(scale != 0)) > 0
    return jnp.where(den == 0, jnp.where(kept, jnp.nan, 0.0), 1.0 / jnp.where(den == 0, 1.0, den))


def _reduced_fwd(static, x, w, b, consts, params, cap):
    rule = static.rule
    ct, scale = _scale(static, w, consts)
    inv = _inverse_denominator(static, consts, scale)
    r = rule.weights(consts, scale, inv)
    stats, grads = _run(static, x, w, b, consts, params, cap, r=r)
    ok = _valid(static, params, cap)
    total = _over_tokens(static, jnp.sum(rule.row_loss(consts, scale, stats, params)))
    loss = jnp.where(ok, total * inv, jnp.nan)
    dparams = rule.cotangents(consts, scale, stats, grads.row_sums, r, params)
    return (loss, rule.aux(stats)), (grads, dparams, ok)


def _reduced_bwd(static, res, g):
    g = g[0]  # the auxiliary outputs (statistics) carry no gradient
    grads, dparams, ok = res
    g = jnp.where(ok, g.astype(grads.dx.dtype), jnp.nan)
    dx, dw, db, dparams, dcap = _cast(static, grads, g, dparams)
    return dx, dw, db, None, dparams, dcap


reduced.defvjp(_reduced_fwd, _reduced_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def per_token(static: Static, x, w, b, consts, params, cap) -> tuple[jax.Array, tuple]:
    """``(losses, aux)`` per token; the backward pass recomputes the blocks."""
    return _per_token_fwd(static, x, w, b, consts, params, cap)[0]


def _per_token_fwd(static, x, w, b, consts, params, cap):
    rule = static.rule
    _, scale = _scale(static, w, consts)
    stats, _ = _run(static, x, w, b, consts, params, cap)
    loss = jnp.where(_valid(static, params, cap), rule.row_loss(consts, scale, stats, params),
                     jnp.nan)
    return (loss, rule.aux(stats)), (x, w, b, consts, params, cap, stats)


def _per_token_bwd(static, res, g):
    g, g_aux = g
    x, w, b, consts, params, cap, stats = res
    rule = static.rule
    ct, scale = _scale(static, w, consts)
    r = rule.weights(consts, scale, g.astype(ct))
    if rule.differentiable_aux():
        r = rule.aux_weights(r, g_aux)
    _, grads = _run(static, x, w, b, consts, params, cap, r=r, saved=stats)
    dparams = rule.cotangents(consts, scale, stats, grads.row_sums, r, params)
    one = jnp.where(_valid(static, params, cap), jnp.ones((), ct), jnp.nan)
    dx, dw, db, dparams, dcap = _cast(static, grads, one, dparams)
    return dx, dw, db, None, dparams, dcap


per_token.defvjp(_per_token_fwd, _per_token_bwd)


@functools.partial(jax.jit, static_argnums=(0,))
def dispatch(static: Static, x, w, b, consts, params, cap) -> tuple[jax.Array, tuple]:
    """``(loss, aux)``, in the compute dtype for every reduction (float32 for narrower
    inputs): per-token losses are weighted, summed and ratioed downstream."""
    rule = static.rule
    if static.reduction == "none":
        return per_token(static, x, w, b, consts, params, cap)
    if rule.differentiable_aux():
        loss, aux = per_token(static, x, w, b, consts, params, cap)
        _, scale = _scale(static, w, consts)
        total = _over_tokens(static, jnp.sum(loss))
        return total * _inverse_denominator(static, consts, scale), aux
    return reduced(static, x, w, b, consts, params, cap)
