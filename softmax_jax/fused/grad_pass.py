r"""The gradient pass of the fused engine (:mod:`.engine`): from the rule's logit gradient
:math:`\delta` of each block (:meth:`~.interface.Rule.dlogits`, carried through the soft
cap by :func:`dlogits`) it accumulates the notes' output-layer rules

.. math::
    \bar x = \delta W^\top, \qquad \bar W = x^\top \delta, \qquad \bar b = \sum_i \delta_i,

in one of the two layouts of :class:`~.layout.BlockLayout`:

- :func:`held_loop`, held rows: a token block's logits are computed once and serve the
  statistics passes (:func:`.stats_pass.tile_stats`) and the gradient, formed in column
  chunks of at most ``UPDATE_CHUNK``; a run that only takes the gradient (the statistics
  saved by the forward pass) computes the logits chunk by chunk instead, so that no
  block of whole rows is written;
- :func:`tiled_grads`, two-level blocks: the tokens inside each vocabulary block, so that
  ``dW`` is accumulated in float32 one vocabulary block at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import vma
from .blocks import (
    Tokens,
    balanced,
    cols,
    fold_vocab,
    grad_matmul,
    narrow_bits,
    put_cols,
    token_loop,
    transposed,
    weight_cols,
)
from .call import Call, Views, block, logits, outputs
from .interface import Block, RowStats
from .layout import NARROW_SPAN_BYTES, UPDATE_CHUNK
from .stats_pass import tile_stats


def dlogits(call: Call, blk: Block, raw: jax.Array | None, stats: RowStats, r: jax.Array):
    r"""The rule's ``dlogits`` carried through the soft cap: ``(dz, row sums, d cap)``.

    With :math:`c = \mathrm{cap}\tanh(z/\mathrm{cap})` and :math:`t = c/\mathrm{cap}`,
    :math:`\partial c/\partial z = 1 - t^2` and :math:`\partial c/\partial\mathrm{cap} =
    t - (z/\mathrm{cap})(1 - t^2)`.
    """
    dz, row_sums = call.rule.dlogits(blk, stats, r, call.params)
    dcap = jnp.zeros((), call.ct)
    if raw is not None:
        cap = call.cap
        t = jnp.where(jnp.isinf(cap), 0.0, blk.logits[0] / cap)
        slope = 1.0 - jnp.square(t)
        u = jnp.where(jnp.isinf(cap), 0.0, raw / cap)
        dcap = jnp.sum(jnp.where(dz == 0, 0.0, dz * (t - u * slope)))
        dz = dz * slope
    return dz, row_sums, dcap


def _held_grads(call: Call, tile, xs, stats: RowStats, r: jax.Array, carry):
    """One held token block's gradient in column chunks: ``(dx, dW, db, d cap, row
    sums)`` with ``dW``, ``db`` and ``d cap`` accumulated into ``carry``'s."""
    head0, ct = call.heads[0], call.ct
    v = head0.w.shape[1]
    x_t = transposed(xs[0])

    def grad_body(acc, start, width):
        dx, dw, db, dcap, gs = acc
        blk, raw = tile(start, width)
        dz, add, dc = dlogits(call, blk, raw, stats, r)
        dx = dx + grad_matmul(dz, weight_cols(head0.w, start, width, ct), (1, 1), ct, True,
                              head0.x.dtype)
        dw = put_cols(dw, start, grad_matmul(dz, x_t, (1, 0), ct, False, head0.w.dtype),
                      add=True)
        if db is not None:
            db = put_cols(db, start, jnp.sum(dz, axis=0), add=True)
        gs = tuple(a + b for a, b in zip(gs, add, strict=True))
        return vma.vary_all((dx, dw, db, dcap + dc, gs), call.axes)

    dw, db, dcap, n_sums = carry
    zero_rows = tuple(jnp.zeros((xs[0].shape[0],), ct) for _ in range(n_sums))
    init = vma.vary_all((jnp.zeros(xs[0].shape, ct), dw, db, dcap, zero_rows), call.axes)
    return fold_vocab(grad_body, init, v, balanced(v, UPDATE_CHUNK))


def held_loop(call: Call, tokens: Tokens, views: Views, want_stats: bool, want_grad: bool):
    """Held rows: each token block's logits are computed once, for every statistics pass
    and the gradient; without the statistics, chunk by chunk for the gradient alone."""
    head0, ct, v = call.heads[0], call.ct, call.heads[0].w.shape[1]

    def token_step(k, carry):
        dw, db, dcap, outs = carry
        xs, rows = views.at(tokens, k)
        if want_stats:
            held, raw = logits(call, xs, 0, v)

            def tile(start, width):
                return (block(call, tuple(cols(z, start, width) for z in held), start, rows),
                        None if raw is None else cols(raw, start, width))

            stats = vma.vary_all(tile_stats(call, lambda s, w: tile(s, w)[0], v, v,
                                            tokens.tb), call.token_axes())
            outs = outs._replace(
                stats=jax.tree.map(lambda o, u: tokens.put(o, k, u), outs.stats, stats))
        else:
            def tile(start, width):
                zs, raw_c = logits(call, xs, start, width)
                return block(call, zs, start, rows), raw_c

            stats = jax.tree.map(lambda a: tokens.take(a, k), views.stats)
        if want_grad:
            assert views.r is not None and outs.dx is not None
            dx, dw, db, dcap, gs = _held_grads(call, tile, xs, stats, tokens.take(views.r, k),
                                               (dw, db, dcap, len(outs.grad_sums)))
            outs = outs._replace(dx=tokens.put(outs.dx, k, dx), grad_sums=tuple(
                tokens.put(o, k, g) for o, g in zip(outs.grad_sums, gs, strict=True)))
        return vma.vary_all((dw, db, dcap), call.axes) + (outs,)

    d = head0.x.shape[1]
    dw0 = db0 = None
    if want_grad:
        dw0 = jnp.zeros((d, v), ct)
        db0 = None if head0.b is None else jnp.zeros((v,), ct)
    carry = (*vma.vary_all((dw0, db0, jnp.zeros((), ct)), call.axes),
             outputs(call, tokens, want_stats, want_grad))
    dw, db, dcap, outs = token_loop(tokens, token_step, carry)
    return outs, dw, db, dcap


def tiled_grads(call: Call, tokens: Tokens, views: Views):
    """Two-level gradient: the tokens inside each vocabulary block, so that ``dW`` is
    accumulated in float32 one ``[D, vocab_block]`` block at a time (Cut Cross-Entropy's
    order) and written once in ``w``'s dtype.

    For bfloat16/float16 ``w`` the blocks are first written, as bits, into a span buffer of
    at most ``NARROW_SPAN_BYTES``, and each full span is then written into ``dW``. XLA:CPU
    carries out a bfloat16 ``dynamic_update_slice`` in float32 over the whole array, one
    pass over ``dW`` per write: per span instead of per block, that is 16 passes instead of
    128 at ``D = 1024, V = 262144``. An unsigned-integer update is done in place.
    """
    head0, ct = call.heads[0], call.ct
    d, v = head0.w.shape
    vb = call.opt.layout.vocab_block
    bits = narrow_bits(head0.w.dtype, ct)
    span = v if bits is None else max(vb, NARROW_SPAN_BYTES // (bits.itemsize * d) // vb * vb)

    def vocab_body(acc, start, width, local):
        buf, db, dcap, outs = acc
        w_j = weight_cols(head0.w, start, width, ct)

        def token_step(k, c):
            dw_j, db_j, dcap, outs = c
            xs, rows = views.at(tokens, k)
            stats = jax.tree.map(lambda a: tokens.take(a, k), views.stats)
            zs, raw = logits(call, xs, start, width)
            assert views.r is not None and outs.dx is not None
            dz, add, dc = dlogits(call, block(call, zs, start, rows), raw, stats,
                                  tokens.take(views.r, k))
            dx_k = tokens.take(outs.dx, k) + grad_matmul(
                dz, w_j, (1, 1), ct, True, head0.x.dtype)
            outs = outs._replace(
                dx=tokens.put(outs.dx, k, dx_k),
                grad_sums=tuple(tokens.put(o, k, tokens.take(o, k) + a)
                                for o, a in zip(outs.grad_sums, add, strict=True)))
            dw_j = dw_j + grad_matmul(dz, transposed(xs[0]), (1, 0), ct, False,
                                      head0.w.dtype)
            db_j = None if db_j is None else db_j + jnp.sum(dz, axis=0)
            return vma.vary_all((dw_j, db_j, dcap + dc), call.axes) + (outs,)

        db0 = None if db is None else jnp.zeros((width,), ct)
        init = vma.vary_all((jnp.zeros((d, width), ct), db0, dcap), call.axes) + (outs,)
        dw_j, db_j, dcap, outs = token_loop(tokens, token_step, init)
        dw_j = dw_j.astype(head0.w.dtype)
        if bits is not None:
            dw_j = lax.bitcast_convert_type(dw_j, bits)
        buf = put_cols(buf, local, dw_j, add=False)
        if db is not None:
            db = put_cols(db, start, db_j, add=False)
        return vma.vary_all((buf, db, dcap), call.axes) + (outs,)

    def span_body(acc, first, width):
        dw, db, dcap, outs = acc
        buf = dw if bits is None else vma.vary_all(jnp.zeros((d, width), bits), call.axes)
        buf, db, dcap, outs = fold_vocab(
            lambda c, start, w: vocab_body(c, first + start, w, start),
            (buf, db, dcap, outs), width, vb)
        if bits is not None:
            buf = put_cols(dw, first, lax.bitcast_convert_type(buf, head0.w.dtype), add=False)
        return vma.vary_all((buf, db, dcap), call.axes) + (outs,)

    db0 = None if head0.b is None else jnp.zeros((v,), ct)
    init = vma.vary_all((jnp.zeros((d, v), head0.w.dtype), db0, jnp.zeros((), ct)), call.axes)
    init = init + (outputs(call, tokens, False, True),)
    dw, db, dcap, outs = fold_vocab(span_body, init, v, span)
    return outs, dw, db, dcap

