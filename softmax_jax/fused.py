r"""Fused linear + softmax cross-entropy for large vocabularies.

The output layer of a language model computes logits :math:`z = x W + b` for ``N`` tokens
over ``V`` classes and then a softmax cross-entropy. Written plainly, the ``N x V`` logits and
their gradient are materialised: 4096 tokens x 32000 classes is 0.5 GB of float32, and a
128k vocabulary takes gigabytes. :func:`linear_softmax_cross_entropy` computes the same loss
and the same gradients for ``x``, ``W`` and ``b`` while holding only one block of logits at a
time.

How it works
------------

The tokens are processed in blocks of ``token_block`` rows. For each token block:

1. Its log-sum-exp is built over vocabulary blocks with the online softmax rule
   (Milakov & Gimelshein, 2018): a running maximum :math:`m` and a running sum
   :math:`s = \sum_c e^{z_c - m}` are merged block by block,

   .. math::
       m' = \max(m, \max_{c \in B} z_c), \qquad
       s' = s\,e^{m - m'} + \sum_{c \in B} e^{z_c - m'},

   and :math:`\mathrm{lse} = m + \log s`. The target logit and (for label smoothing) the sum
   of the logits are gathered in the same pass.

2. With the log-sum-exp known, the notes' output-layer rules give the gradients block by
   block: with :math:`\delta = \partial\ell/\partial z = a - y` (plus the smoothing, z-loss and
   soft-cap terms below), :math:`\partial\ell/\partial x = \delta W^\top`,
   :math:`\partial\ell/\partial W = x^\top \delta` and :math:`\partial\ell/\partial b =
   \sum_i \delta_i`.

When whole rows of logits fit the block (``vocab_block >= V``, the default up to
``V = 131072`` per device, with ``token_block`` about ``2**23 / V``) the logits of a token
block are computed once and reused for the gradient: three matrix products in all, as in
Liger Kernel's fused linear cross-entropy; the gradient is then formed in 4096-column chunks.
Otherwise step 2 recomputes each vocabulary block (four matrix products, as in Apple's Cut
Cross-Entropy); the working memory is then ``token_block x vocab_block`` logits.

For ``reduction="mean"`` and ``"sum"`` the gradients are computed inside the forward pass
(in float32, or float64 under x64) and are the only residuals; the backward pass just scales
them by the incoming cotangent. For ``reduction="none"`` the forward pass keeps two numbers
per token, the maximum and :math:`\log s` (together the log-sum-exp), and the backward pass
recomputes the blocks with the per-token cotangents as row weights.

On a 2-core CPU (``scripts/bench_fused.py``), value and gradient at ``N=4096, D=256,
V=32000`` take about 1/23 of the unfused optax loss's temporary memory and 0.85-0.9 of its
time; at ``N=2048, D=128, V=131072``, about 1/55 of the memory.

Vocabulary parallelism
----------------------

Inside :func:`jax.shard_map`, with ``W`` (and ``b``) sharded along ``V`` over the mesh axis
``axis_name``, each device holds a slice of the vocabulary. This is Megatron-LM's
vocab-parallel cross-entropy: the global maximum comes from ``pmax``, the global sum of
exponentials from ``psum``, the target logit from the one shard that owns the label, and the
smoothing term sums the logits over the *global* vocabulary and divides by the global size
(not the local mean). The cotangent of ``x`` is a partial sum on each shard and is
``psum``-ed over the vocabulary axis; in general every cotangent is summed over the mesh
axes it varies over and its primal input does not (a data axis for ``W`` and ``b``).

Under plain :func:`jax.jit` with batch-sharded ``NamedSharding`` inputs nothing special is
needed: token blocks are taken as strided rows, so a block spans every data shard and XLA's
SPMD partitioner keeps each device on its own rows.

Differentiation: ``jax.jvp`` and ``jax.jacfwd`` of the loss itself raise (it is a
``custom_vjp``). Second-order derivatives are not a goal, but ``jax.hessian``
(forward-over-reverse) and reverse-over-reverse do work: they differentiate the blockwise
rules, which are plain ``jnp``, and agree with the unfused loss in the tests. They keep what
those loops need for their own derivative, so the memory savings are gone and the unfused
:func:`softmax_jax.softmax_cross_entropy_with_integer_labels` serves as well.

With ``axis_name``, ``shard_map`` must run with its default ``check_vma=True`` (the varying
axes decide which cotangents are summed); the call refuses otherwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from softmax_jax import _validation as _v

__all__ = ["linear_softmax_cross_entropy"]

# Automatic block sizes (measured on CPU, see scripts/bench_fused.py). Whole rows of logits
# are held when a block of at least _MIN_HELD_TOKENS rows fits in _HELD_ELEMENTS logits
# (32 MiB of float32); otherwise vocabulary blocks of _VOCAB_BLOCK columns and token blocks
# of _TWO_PASS_ELEMENTS / _VOCAB_BLOCK rows.
_HELD_ELEMENTS = 2**23
_MIN_HELD_TOKENS = 64
_TWO_PASS_ELEMENTS = 2**22
_VOCAB_BLOCK = 4096
# Width of the column chunks in which held rows produce dx, dW and db (bounds the D x chunk
# product that is added into dW).
_UPDATE_CHUNK = 4096
_REDUCTIONS = ("mean", "sum", "none")


class _Config(NamedTuple):
    """Static (hashable) settings of one call."""

    reduction: str
    ignore_index: int | None
    smoothing: bool
    zloss: bool
    capped: bool
    axis_name: Hashable | None
    token_block: int
    vocab_block: int  # >= V: whole rows are held and reused for the gradient
    update_chunk: int
    # Mesh axes each primal input varies over inside shard_map (empty outside).
    vma_x: frozenset
    vma_w: frozenset
    vma_b: frozenset
    # dtypes of the primal inputs, for the cotangents.
    dtype_x: str
    dtype_w: str
    dtype_b: str | None


class _Params(NamedTuple):
    """Scalar hyper-parameters, kept as arrays so new values do not recompile."""

    eps: jax.Array
    lam: jax.Array
    cap: jax.Array


# --------------------------------------------------------------------------------------------
# Varying manual axes (shard_map's type system)
# --------------------------------------------------------------------------------------------


def _varying(x: Any) -> frozenset:
    """Mesh axes along which ``x`` varies inside ``shard_map`` (empty outside of it)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


def _sorted_axes(axes: frozenset) -> tuple:
    return tuple(sorted(axes, key=str))


def _vary(x: jax.Array, axes: frozenset) -> jax.Array:
    """Marks ``x`` as varying over ``axes`` (a no-op at run time)."""
    missing = axes - _varying(x)
    if not missing:
        return x
    pcast = getattr(lax, "pcast", None)
    if pcast is not None:
        return pcast(x, _sorted_axes(missing), to="varying")
    return lax.pvary(x, _sorted_axes(missing))  # type: ignore[attr-defined]


def _axis_set(axis_name: Hashable | None) -> frozenset:
    if axis_name is None:
        return frozenset()
    if isinstance(axis_name, (tuple, list)):
        return frozenset(axis_name)
    return frozenset((axis_name,))


def _vary_all(tree: Any, axes: frozenset) -> Any:
    if not axes:
        return tree
    return jax.tree.map(lambda t: _vary(t, axes), tree)


def _match_varying(ct: jax.Array, target: frozenset) -> jax.Array:
    """A cotangent with exactly its primal's varying axes: sums over any extra axis.

    A ``custom_vjp`` inside ``shard_map`` must return cotangents typed like its primal
    inputs. A cotangent that varies over an axis its primal does not (``dx`` over the
    vocabulary axis, ``dW`` over a data axis) holds one partial sum per device: ``psum``.
    """
    extra = _varying(ct) - target
    if extra:
        ct = lax.psum(ct, _sorted_axes(extra))
    return _vary(ct, target)


# --------------------------------------------------------------------------------------------
# Block helpers
# --------------------------------------------------------------------------------------------


def _balanced_block(total: int, target: int) -> int:
    """A block size <= ``target`` that splits ``total`` into near-equal blocks."""
    target = max(1, min(target, total))
    return -(-total // -(-total // target))


def _token_layout(n: int, target: int) -> tuple[int, int]:
    """``(token_block, num_blocks)``, preferring a block count that divides ``n``."""
    target = max(1, min(target, n))
    first = -(-n // target)
    for nt in range(first, min(n, 2 * first) + 1):
        if n % nt == 0:
            return n // nt, nt
    return -(-n // first), first


def _fold_vocab(
    body: Callable[[Any, Any, int], Any], carry: Any, v: int, block: int
) -> Any:
    """Runs ``carry = body(carry, start, width)`` over the columns ``[0, v)`` in blocks.

    Full blocks run in a ``fori_loop`` with a traced ``start``; a narrower last block, if
    any, runs once more with a static start. ``width`` is always a static int.
    """
    nfull, tail = divmod(v, block)
    if nfull == 1:
        carry = body(carry, 0, block)
    elif nfull > 1:
        carry = lax.fori_loop(0, nfull, lambda j, c: body(c, j * block, block), carry)
    if tail:
        carry = body(carry, nfull * block, tail)
    return carry


def _cols(a: jax.Array, start: Any, width: int) -> jax.Array:
    """Columns ``[start, start + width)`` of a 2-D (or 1-D) array."""
    if isinstance(start, int) and start == 0 and width == a.shape[-1]:
        return a
    return lax.dynamic_slice_in_dim(a, start, width, axis=a.ndim - 1)


def _add_cols(a: jax.Array, start: Any, update: jax.Array) -> jax.Array:
    """``a`` with ``update`` added into columns ``[start, start + width)`` (in place)."""
    width = update.shape[-1]
    if isinstance(start, int) and start == 0 and width == a.shape[-1]:
        return a + update
    old = lax.dynamic_slice_in_dim(a, start, width, axis=a.ndim - 1)
    return lax.dynamic_update_slice_in_dim(a, old + update, start, axis=a.ndim - 1)


def _matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int], ct: np.dtype) -> jax.Array:
    """``a`` times ``b`` contracting ``a``'s axis ``contract[0]`` with ``b``'s ``contract[1]``,
    accumulated in ``ct``."""
    return lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=ct
    )


# --------------------------------------------------------------------------------------------
# The blockwise engine
# --------------------------------------------------------------------------------------------


class _Stats(NamedTuple):
    """Per-token results of the statistics pass (global over a sharded vocabulary)."""

    m: jax.Array  # max logit
    log_s: jax.Array  # log sum_c exp(z_c - m)
    loss: jax.Array  # per-token loss, scaled by the row factor (0 ignored, NaN invalid)


def _logits_block(
    x_c: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    start: Any,
    width: int,
    params: _Params,
    cfg: _Config,
    ct: np.dtype,
) -> jax.Array:
    """Logits ``[tokens, width]`` of columns ``start:start+width`` in ``ct``, soft-capped
    when asked."""
    w_j = _cols(w, start, width)
    if w_j.dtype != x_c.dtype:
        w_j = w_j.astype(jnp.promote_types(w_j.dtype, x_c.dtype))
        x_c = x_c.astype(w_j.dtype)
    z = _matmul(x_c, w_j, (1, 0), ct)
    if b is not None:
        z = z + _cols(b, start, width).astype(ct)
    if cfg.capped:
        z = params.cap * jnp.tanh(z / params.cap)
    return z


def _target_mask(loc: jax.Array, width: int) -> jax.Array:
    """``[tokens, width]`` booleans: is column ``j`` the token's label?"""
    cols = lax.broadcasted_iota(loc.dtype, (loc.shape[0], width), 1)
    return cols == loc[:, None]


def _row_terms(
    c: jax.Array, loc: jax.Array, width: int, smoothing: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Block max, block sum of ``exp(c - max)``, target logit (0 if not in the block) and
    the block's sum of logits."""
    m = jnp.max(c, axis=1)
    s = jnp.sum(jnp.exp(c - m[:, None]), axis=1)
    inside = (loc >= 0) & (loc < width)
    picked = jnp.take_along_axis(c, jnp.clip(loc, 0, width - 1)[:, None], axis=1)[:, 0]
    zy = jnp.where(inside, picked, 0.0)
    zs = jnp.sum(c, axis=1) if smoothing else jnp.zeros_like(m)
    return m, s, zy, zs


def _delta(
    c: jax.Array,
    loc: jax.Array,
    m: jax.Array,
    log_s: jax.Array,
    r: jax.Array,
    params: _Params,
    v_global: int,
    cfg: _Config,
) -> jax.Array:
    r"""``r_i * dloss/dz`` for one block:
    :math:`a(1 + 2\lambda\,\mathrm{lse}) - (1 - \epsilon)\,\mathrm{onehot}(y) - \epsilon / V`,
    times :math:`1 - \tanh^2(z/\mathrm{cap}) = 1 - (c/\mathrm{cap})^2` under a soft cap
    (``c`` being the capped logit, so nothing beyond the logits needs keeping)."""
    a = jnp.exp((c - m[:, None]) - log_s[:, None])
    if cfg.zloss:
        a = a * (1.0 + 2.0 * params.lam * (m + log_s))[:, None]
    hit = 1.0 - params.eps if cfg.smoothing else 1.0
    d = a - jnp.where(_target_mask(loc, c.shape[1]), hit, 0.0)
    if cfg.smoothing:
        d = d - params.eps / v_global
    if cfg.capped:
        d = d * (1.0 - jnp.square(c / params.cap))
    # where, not a product: rows with r = 0 (ignored, padding) may hold inf or NaN.
    return jnp.where(r[:, None] == 0, 0.0, r[:, None] * d)


def _blockwise(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    labels: jax.Array,
    scale: jax.Array,
    r: jax.Array | None,
    saved: tuple[jax.Array, jax.Array] | None,
    params: _Params,
    cfg: _Config,
) -> tuple[_Stats | None, tuple[jax.Array, jax.Array, jax.Array | None] | None]:
    """The shared engine: walks token blocks, and vocabulary blocks within each.

    Args:
      x, w, b, labels: the (local) inputs; ``labels`` are global class ids.
      scale: per-token factor on the loss: 1, 0 (ignored) or NaN (invalid label).
      r: per-token factor on the gradient, or None to skip the gradient.
      saved: ``(m, log_s)`` from an earlier statistics pass, or None to compute them.

    Returns:
      ``(stats, grads)``: stats unless ``saved`` was given, grads ``(dx, dw, db)`` in the
      compute dtype unless ``r`` is None.
    """
    n, d = x.shape
    v = w.shape[1]
    ct = _v.compute_dtype(jnp.result_type(x.dtype, w.dtype))
    want_stats, want_grad = saved is None, r is not None
    hold_rows = cfg.vocab_block >= v
    axis = cfg.axis_name

    v_global = v
    local_labels = labels  # the label's column in this shard (may be outside it)
    if axis is not None:
        v_global = v * lax.axis_size(axis)
        local_labels = labels - lax.axis_index(axis).astype(labels.dtype) * v

    tb, nt = _token_layout(n, cfg.token_block)
    pad = tb * nt - n

    # Token block k holds the strided rows k, k + nt, k + 2 nt, ...: viewed as [tb, nt, ...]
    # (a free reshape), it is index k of axis 1. Under jit with a batch-sharded x every block
    # then spans all data shards, and no copy of x or dx is made.
    def view(a: jax.Array) -> jax.Array:
        if pad:  # zero rows; their scale 0 and r 0 make them inert
            a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((tb, nt) + a.shape[1:])

    def unview(a: jax.Array) -> jax.Array:
        a = a.reshape((tb * nt,) + a.shape[2:])
        return a[:n] if pad else a

    def take(a: jax.Array, k: Any) -> jax.Array:
        return lax.dynamic_index_in_dim(a, k, axis=1, keepdims=False)

    def put(a: jax.Array, k: Any, block: jax.Array) -> jax.Array:
        return lax.dynamic_update_index_in_dim(a, block, k, axis=1)

    per_token: list[jax.Array] = [local_labels, scale]
    if want_grad:
        assert r is not None
        per_token.append(r)
    if saved is not None:
        per_token.extend(saved)
    x_view = view(x)
    tok_views = [view(a) for a in per_token]

    axes_all = _varying(x) | _varying(w) | _varying(labels) | _varying(scale)
    if b is not None:
        axes_all |= _varying(b)
    if r is not None:
        axes_all |= _varying(r)
    if saved is not None:
        axes_all |= _varying(saved[0]) | _varying(saved[1])
    # The merged statistics no longer vary over the vocabulary axis.
    axes_tok = axes_all - _axis_set(axis)

    def combine(m, s, zy, zs):
        """Merges the per-shard statistics over the vocabulary axis."""
        if axis is None:
            return m, s, zy, zs
        m_all = lax.pmax(m, axis)
        s = lax.psum(s * jnp.exp(m - m_all), axis)
        zy = lax.psum(zy, axis)
        zs = lax.psum(zs, axis) if cfg.smoothing else zs
        return m_all, s, zy, zs

    def _vary_carry(carry):
        dw, db, outs = carry
        outs = dict(outs)
        if "stats" in outs:
            outs["stats"] = _vary_all(outs["stats"], axes_tok)
        if "dx" in outs:
            outs["dx"] = _vary_all(outs["dx"], axes_all)
        return (*_vary_all((dw, db), axes_all), outs)

    def token_step(k, carry):
        dw, db, outs = carry
        x_c = take(x_view, k)
        tok = [take(a, k) for a in tok_views]
        loc, sc = tok[0], tok[1]
        r_c = tok[2] if want_grad else None
        held: jax.Array | None = None

        if want_stats:
            if hold_rows:
                held = _logits_block(x_c, w, b, 0, v, params, cfg, ct)
                m, s, zy, zs = _row_terms(held, loc, v, cfg.smoothing)
            else:

                def stats_body(acc, start, width):
                    m0, s0, zy0, zs0 = acc
                    c = _logits_block(x_c, w, b, start, width, params, cfg, ct)
                    bm, bs, bzy, bzs = _row_terms(c, loc - start, width, cfg.smoothing)
                    m1 = jnp.maximum(m0, bm)
                    s1 = s0 * jnp.exp(m0 - m1) + bs * jnp.exp(bm - m1)
                    return _vary_all((m1, s1, zy0 + bzy, zs0 + bzs), axes_all)

                zeros = jnp.zeros((tb,), ct)
                init = _vary_all((jnp.full((tb,), -jnp.inf, ct), zeros, zeros, zeros), axes_all)
                m, s, zy, zs = _fold_vocab(stats_body, init, v, cfg.vocab_block)
            m, s, zy, zs = combine(m, s, zy, zs)
            log_s = jnp.log(s)
            lse = m + log_s
            loss = lse - zy
            if cfg.smoothing:
                loss = (1.0 - params.eps) * loss + params.eps * (lse - zs / v_global)
            if cfg.zloss:
                loss = loss + params.lam * jnp.square(lse)
            loss = jnp.where(sc == 0, 0.0, sc * loss)
            new = zip(outs["stats"], (m, log_s, loss), strict=True)
            outs = {**outs, "stats": [put(o, k, u) for o, u in new]}
        else:
            m, log_s = tok[-2], tok[-1]

        if want_grad:
            assert r_c is not None
            x_ct = x_c.astype(ct)

            def grad_body(acc, start, width):
                dx0, dw0, db0 = acc
                if held is not None:
                    c = _cols(held, start, width)
                else:
                    c = _logits_block(x_c, w, b, start, width, params, cfg, ct)
                delta = _delta(c, loc - start, m, log_s, r_c, params, v_global, cfg)
                w_j = _cols(w, start, width).astype(ct)
                dx1 = dx0 + _matmul(delta, w_j, (1, 1), ct)
                dw1 = _add_cols(dw0, start, _matmul(x_ct, delta, (0, 0), ct))
                db1 = None if db0 is None else _add_cols(db0, start, jnp.sum(delta, axis=0))
                return _vary_all((dx1, dw1, db1), axes_all)

            if hold_rows:
                chunk = _balanced_block(v, cfg.update_chunk)
            else:
                chunk = _balanced_block(v, cfg.vocab_block)
            init = _vary_all((jnp.zeros((tb, d), ct), dw, db), axes_all)
            dx_c, dw, db = _fold_vocab(grad_body, init, v, chunk)
            outs = {**outs, "dx": put(outs["dx"], k, dx_c)}
        return _vary_carry((dw, db, outs))

    outs0: dict[str, Any] = {}
    if want_stats:
        outs0["stats"] = [jnp.zeros((tb, nt), ct) for _ in range(3)]
    dw0 = db0 = None
    if want_grad:
        outs0["dx"] = jnp.zeros((tb, nt, d), ct)
        dw0 = jnp.zeros((d, v), ct)
        db0 = None if b is None else jnp.zeros((v,), ct)
    carry0 = _vary_carry((dw0, db0, outs0))
    if nt == 1:
        dw, db, outs = token_step(0, carry0)
    else:
        dw, db, outs = lax.fori_loop(0, nt, token_step, carry0)

    stats = _Stats(*(unview(a) for a in outs["stats"])) if want_stats else None
    grads = (unview(outs["dx"]), dw, db) if want_grad else None
    return stats, grads


# --------------------------------------------------------------------------------------------
# custom_vjp rules
# --------------------------------------------------------------------------------------------


def _compute_dtype(cfg: _Config) -> np.dtype:
    return _v.compute_dtype(jnp.result_type(cfg.dtype_x, cfg.dtype_w))


def _row_scale(labels: jax.Array, w: jax.Array, cfg: _Config) -> jax.Array:
    """1 for a counted token, 0 for an ignored one, NaN for an out-of-range label."""
    v_global = w.shape[1]
    if cfg.axis_name is not None:
        v_global = v_global * lax.axis_size(cfg.axis_name)
    valid = (labels >= 0) & (labels < v_global)
    ct = _compute_dtype(cfg)
    scale = jnp.where(valid, jnp.ones((), ct), jnp.full((), jnp.nan, ct))
    if cfg.ignore_index is not None:
        scale = jnp.where(labels == cfg.ignore_index, jnp.zeros((), ct), scale)
    return scale


def _cast_grads(grads, cfg: _Config):
    """Gradients in each input's dtype, with each input's varying mesh axes."""
    dx, dw, db = grads
    dx = _match_varying(dx, cfg.vma_x).astype(cfg.dtype_x)
    dw = _match_varying(dw, cfg.vma_w).astype(cfg.dtype_w)
    if db is not None:
        assert cfg.dtype_b is not None
        db = _match_varying(db, cfg.vma_b).astype(cfg.dtype_b)
    return dx, dw, db


# Reduced ("mean" / "sum"): gradients in the forward pass, the backward pass scales them.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _reduced(x, w, b, labels, params: _Params, cfg: _Config) -> jax.Array:
    return _reduced_fwd(x, w, b, labels, params, cfg)[0]


def _reduced_fwd(x, w, b, labels, params: _Params, cfg: _Config):
    scale = _row_scale(labels, w, cfg)
    ct = _compute_dtype(cfg)
    if cfg.reduction == "mean":
        count = jnp.sum(scale != 0).astype(ct)
        # No counted token at all: loss 0 and gradients 0 rather than 0 / 0.
        inv = 1.0 / jnp.maximum(count, 1.0)
    else:
        inv = jnp.ones((), ct)
    stats, grads = _blockwise(x, w, b, labels, scale, scale * inv, None, params, cfg)
    assert stats is not None and grads is not None
    loss = jnp.sum(stats.loss) * inv
    # The only residuals are the three gradients, already divided by the count.
    return loss, grads


def _reduced_bwd(cfg: _Config, grads, g):
    dx, dw, db = grads
    g = g.astype(dx.dtype)
    scaled = (g * dx, g * dw, None if db is None else g * db)
    return (*_cast_grads(scaled, cfg), None, None)


_reduced.defvjp(_reduced_fwd, _reduced_bwd)


# Per-token ("none"): the forward pass keeps (m, log_s), the backward pass recomputes.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _per_token(x, w, b, labels, params: _Params, cfg: _Config) -> jax.Array:
    return _per_token_fwd(x, w, b, labels, params, cfg)[0]


def _out_dtype(x, w, b) -> np.dtype:
    dt = jnp.result_type(x.dtype, w.dtype)
    return np.dtype(dt if b is None else jnp.result_type(dt, b.dtype))


def _per_token_fwd(x, w, b, labels, params: _Params, cfg: _Config):
    scale = _row_scale(labels, w, cfg)
    stats, _ = _blockwise(x, w, b, labels, scale, None, None, params, cfg)
    assert stats is not None
    loss = stats.loss.astype(_out_dtype(x, w, b))
    return loss, (x, w, b, labels, params, stats.m, stats.log_s)


def _per_token_bwd(cfg: _Config, res, g):
    x, w, b, labels, params, m, log_s = res
    scale = _row_scale(labels, w, cfg)
    r = jnp.where(scale == 0, 0.0, g.astype(m.dtype) * scale)
    _, grads = _blockwise(x, w, b, labels, scale, r, (m, log_s), params, cfg)
    assert grads is not None
    return (*_cast_grads(grads, cfg), None, None)


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _dispatch(x, w, b, labels, params: _Params, cfg: _Config) -> jax.Array:
    if cfg.reduction == "none":
        return _per_token(x, w, b, labels, params, cfg)
    return _reduced(x, w, b, labels, params, cfg)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def _check_block(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return int(value)


def _auto_blocks(
    n: int, v: int, token_block: int | None, vocab_block: int | None
) -> tuple[int, int]:
    """Default block sizes: whole rows with about 2**23 logits per token block when that
    leaves at least 64 rows (V <= 131072 per device); otherwise 4096-wide vocabulary blocks
    and 1024-row token blocks."""
    if vocab_block is None:
        vocab_block = v if _HELD_ELEMENTS // v >= _MIN_HELD_TOKENS else _VOCAB_BLOCK
    vocab_block = min(vocab_block, v)
    if token_block is None:
        budget = _HELD_ELEMENTS if vocab_block >= v else _TWO_PASS_ELEMENTS
        token_block = max(8, budget // vocab_block // 8 * 8)
    return min(token_block, n), vocab_block


def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    soft_cap: float | jax.typing.ArrayLike | None = None,
    axis_name: Hashable | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy of a linear layer's logits, without materialising the logits.

    With logits :math:`z = x W + b` (capped to :math:`\mathrm{cap}\,\tanh(z/\mathrm{cap})`
    when ``soft_cap`` is set), per token

    .. math::
        \ell = (1 - \epsilon)\,(\mathrm{lse}(z) - z_y)
             + \frac{\epsilon}{V} \sum_{c=1}^{V} (\mathrm{lse}(z) - z_c)
             + \lambda\,\mathrm{lse}(z)^2 ,

    exactly :func:`softmax_jax.softmax_cross_entropy_with_integer_labels` applied to
    ``x @ w + b``, with :math:`V` the full (global) vocabulary. The gradients follow the
    notes' output-layer rules, with
    :math:`\delta = \partial\ell/\partial z = a(1 + 2\lambda\,\mathrm{lse}) -
    (1 - \epsilon)\,\mathrm{onehot}(y) - \epsilon/V` (times :math:`1 - \tanh^2(z /
    \mathrm{cap})` under a soft cap):

    .. math::
        \frac{\partial\ell}{\partial x} = \delta W^\top, \qquad
        \frac{\partial\ell}{\partial W} = x^\top \delta, \qquad
        \frac{\partial\ell}{\partial b} = \textstyle\sum_i \delta_i .

    Only ``token_block x vocab_block`` logits exist at any time (see the module docstring
    for the algorithm). Reverse mode; ``jax.jvp``/``jax.jacfwd`` of the loss raise, and
    second derivatives work but without the memory savings (see the module docstring).

    Args:
      x: ``[N, D]`` floating-point inputs of the output layer (hidden states).
      w: ``[D, V]`` weights (the ``x @ w`` convention of JAX dense layers); under
        ``axis_name``, this device's ``[D, V / shards]`` slice of the vocabulary.
      labels: ``[N]`` integer class ids in ``[0, V)`` (global ids under ``axis_name``).
      b: optional ``[V]`` bias (this device's slice under ``axis_name``).
      reduction: ``"mean"`` (over the tokens that are not ignored; 0 when all are),
        ``"sum"`` or ``"none"`` (per-token losses).
      ignore_index: a label value (e.g. ``-100``) whose tokens get loss 0 and gradient 0
        and are left out of the mean.
      label_smoothing: :math:`\epsilon \in [0, 1]`, PyTorch's convention, over the global
        vocabulary.
      z_loss: :math:`\lambda \ge 0`, weight of the :math:`\mathrm{lse}^2` penalty.
      soft_cap: optional :math:`\mathrm{cap} > 0` for Gemma-style logit soft-capping.
      axis_name: the ``shard_map`` mesh axis (or tuple of axes) over which ``w`` and ``b``
        are sharded along the vocabulary (``check_vma=True``, the default, is required);
        None when the vocabulary is not sharded. ``labels`` stay global ids; any other mesh
        axis (a data axis) is left alone, so ``"mean"`` is over this device's tokens.
      token_block: rows of ``x`` per block. Default: about ``2**23 / V`` when whole rows
        are held (a 32 MiB float32 block), else 1024.
      vocab_block: vocabulary columns per block. At least ``V`` means whole rows are held
        and reused for the gradient (three matrix products); this is the default when a
        held block still has 64 or more rows (``V <= 131072`` per device). Smaller (default
        4096 for larger vocabularies) means the gradient pass recomputes each block (four
        matrix products, ``token_block x vocab_block`` logits).

    Returns:
      ``"mean"``/``"sum"``: a float32 scalar (float64 under x64), whatever the input dtype,
      so a bf16 model's loss is not rounded to bf16. ``"none"``: ``[N]`` per-token losses
      in the inputs' dtype, as the core losses do. A label outside ``[0, V)`` that is not
      ``ignore_index`` gives NaN for its token (and so for the reductions). Gradients come
      back in each input's dtype; internally logits, log-sum-exps and all three gradients
      are accumulated in float32 (at least).

    Raises:
      TypeError: non-floating ``x``/``w``/``b`` or non-integer ``labels``.
      ValueError: inconsistent shapes, an unknown ``reduction``, ``label_smoothing``
        outside ``[0, 1]``, a negative ``z_loss``, ``soft_cap <= 0`` or bad block sizes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import softmax_jax as sj
      >>> from softmax_jax.fused import linear_softmax_cross_entropy
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[2.0, 3.0, 4.0], [1.0, 1.0, 1.0]])  # logits x @ w: the notes' rows
      >>> labels = jnp.array([1, 0])
      >>> print(linear_softmax_cross_entropy(x, w, labels, reduction="none"))
      [1.4076 1.0986]
      >>> print(sj.softmax_cross_entropy_with_integer_labels(x @ w, labels))
      [1.4076 1.0986]
      >>> print(jax.grad(linear_softmax_cross_entropy, argnums=1)(x, w, labels))  # x^T (a - y) / N
      [[ 0.0450 -0.3776  0.3326]
       [-0.3333  0.1667  0.1667]]
    """
    x = _v.as_float_array("x", x)
    w = _v.as_float_array("w", w)
    labels = _v.as_int_array("labels", labels)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D [N, D] array, got x.shape={tuple(x.shape)}")
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D [D, V] array, got w.shape={tuple(w.shape)}")
    n, d = x.shape
    if w.shape[0] != d:
        raise ValueError(
            f"w must be [D, V] with D = x.shape[1] = {d}, got w.shape={tuple(w.shape)}"
            f" (x.shape={tuple(x.shape)}); pass the kernel of x @ w, not its transpose"
        )
    v = w.shape[1]
    if n == 0 or v == 0:
        raise ValueError(
            f"x and w need at least one token and one class, got x.shape={tuple(x.shape)},"
            f" w.shape={tuple(w.shape)}"
        )
    if labels.shape != (n,):
        raise ValueError(
            f"labels must be a 1-D [N] array with N = x.shape[0] = {n}, got"
            f" labels.shape={tuple(labels.shape)}"
        )
    if labels.dtype.itemsize < 4 or not jnp.issubdtype(labels.dtype, jnp.signedinteger):
        labels = labels.astype(jnp.int32)
    if b is not None:
        b = _v.as_float_array("b", b)
        if b.shape != (v,):
            raise ValueError(
                f"b must be a 1-D [V] array with V = w.shape[1] = {v}, got"
                f" b.shape={tuple(b.shape)}"
            )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer))
    ):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    eps, smoothing = _v.hyperparameter("label_smoothing", label_smoothing, 0.0, 1.0)
    lam, zloss = _v.hyperparameter("z_loss", z_loss, 0.0, None)
    capped = soft_cap is not None
    if soft_cap is None:
        cap = jnp.ones((), jnp.float32)
    else:
        cap, _ = _v.hyperparameter("soft_cap", soft_cap, -math.inf, None)
        if not isinstance(soft_cap, jax.core.Tracer) and not float(np.asarray(soft_cap)) > 0:
            raise ValueError(f"soft_cap must be > 0 (or None), got {soft_cap!r}")
    if axis_name is not None:
        missing = _axis_set(axis_name) - _varying(w)
        if missing:
            raise ValueError(
                f"axis_name={axis_name!r}: w (shape {tuple(w.shape)}) does not vary over mesh"
                f" axis {sorted(missing, key=str)}. Call this inside jax.shard_map (with the"
                " default check_vma=True) with w sharded along V over that axis, e.g."
                " in_specs=P(None, axis_name) for w; use axis_name=None when w holds the"
                " whole vocabulary"
            )
    tb = _check_block("token_block", token_block)
    vb = _check_block("vocab_block", vocab_block)
    tb, vb = _auto_blocks(n, v, tb, vb)
    ct = _v.compute_dtype(jnp.result_type(x.dtype, w.dtype))
    cfg = _Config(
        reduction=reduction,
        ignore_index=None if ignore_index is None else int(ignore_index),
        smoothing=smoothing,
        zloss=zloss,
        capped=capped,
        axis_name=axis_name,
        token_block=tb,
        vocab_block=vb,
        update_chunk=_UPDATE_CHUNK,
        vma_x=_varying(x),
        vma_w=_varying(w),
        vma_b=frozenset() if b is None else _varying(b),
        dtype_x=str(x.dtype),
        dtype_w=str(w.dtype),
        dtype_b=None if b is None else str(b.dtype),
    )
    params = _Params(eps.astype(ct), lam.astype(ct), cap.astype(ct))
    return _dispatch(x, w, b, labels, params, cfg)
