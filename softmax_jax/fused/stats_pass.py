r"""The statistics passes of the fused engine (:mod:`.engine`): each row's online
log-sum-exp of every stream the rule names (Milakov & Gimelshein, 2018),

.. math::
    m' = \max(m, \max_{c \in B} z_c), \qquad
    s' = s\,e^{m - m'} + \sum_{c \in B} e^{z_c - m'},

with the rule's additive first sums, the online KL of each pair of
:meth:`~.interface.Rule.expectation_streams` (:func:`.blocks.log_ratio_step`), the merge
across vocabulary shards (``pmax`` then ``psum`` under ``axis_name``) and, when the rule asks
for one, a second pass over the finished normalisers (:meth:`~.interface.Rule.second_sums`).

:func:`tile_stats` is one token block's passes over its vocabulary blocks; :func:`stats_loop`
runs it over the token blocks of the two-level layout (the held-rows layout runs it inside
:func:`.grad_pass.held_loop`, on logits computed once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from softmax_jax._normalizer import Normalizer

from . import vma
from .blocks import (
    Tokens,
    finished_shift,
    fold_vocab,
    merge_log_ratios,
    merge_shards,
    online_step,
    token_loop,
)
from .call import Call, Views, block, logits, outputs
from .interface import Block, RowStats


def _first_pass(call: Call, tile: Callable[[Any, int], Block], v: int, vb: int, tb: int):
    """The first pass over one token block's vocabulary blocks: ``(m, s, first sums, KL
    sums, argmax)``, each merged over the vocabulary's shards."""
    rule = call.rule
    n_streams, n_first, _ = rule.sizes()
    # Online KL(softmax(stream i) || softmax(stream j)) for each pair (i, j) of
    # expectation_streams() (the last entries of ``first``).
    pairs = rule.expectation_streams()

    def body(acc, start, width):
        ms, ss, sums, expects, amax = acc
        blk = tile(start, width)
        streams = rule.streams(blk, call.params)
        bms, new_m, new_s, expects = online_step(streams, ms, ss, pairs, expects)
        if amax is not None:
            cand = (jnp.argmax(streams[0], axis=1) + blk.first_class).astype(jnp.int32)
            amax = jnp.where(bms[0] > ms[0], cand, amax)
        add = rule.first_sums(blk, call.params)
        sums = tuple(a + b for a, b in zip(sums, add, strict=True))
        return vma.vary_all((new_m, new_s, sums, expects, amax), call.axes)

    zeros = jnp.zeros((tb,), call.ct)
    init = (tuple(jnp.full((tb,), -jnp.inf, call.ct) for _ in range(n_streams)),
            (zeros,) * n_streams, (zeros,) * (n_first - len(pairs)), (zeros,) * len(pairs),
            jnp.zeros((tb,), jnp.int32) if call.opt.want_argmax else None)
    ms, ss, firsts, expects, amax = fold_vocab(body, vma.vary_all(init, call.axes), v, vb)
    expects = merge_log_ratios(call.opt.axis_name, expects, ss, pairs, ms)
    ms, ss, firsts, amax = merge_shards(call.opt.axis_name, ms, ss, firsts, amax)
    return ms, ss, firsts, expects, amax


def tile_stats(call: Call, tile: Callable[[Any, int], Block], v: int, vb: int,
               tb: int) -> RowStats:
    """The statistics of one token block: first pass, shard merge, optional second pass.
    ``tile(start, width)`` is the block of columns ``start:start+width``."""
    rule = call.rule
    pairs = rule.expectation_streams()
    n_second = rule.sizes()[2]
    ms, ss, firsts, expects, amax = _first_pass(call, tile, v, vb, tb)
    logs = tuple(jnp.log(s) for s in ss)
    firsts = firsts + tuple(
        jnp.where(ss[i] == 0, 0.0, e / jnp.where(ss[i] == 0, 1.0, ss[i])) - logs[i] + logs[j]
        for e, (i, j) in zip(expects, pairs, strict=True))
    norms = tuple(Normalizer(finished_shift(m)[:, None], log_s[:, None])
                  for m, log_s in zip(ms, logs, strict=True))
    stats = RowStats(norms, firsts, (), amax)
    if not n_second:
        return stats

    def second_body(acc, start, width):
        add = rule.second_sums(tile(start, width), stats, call.params)
        return vma.vary_all(tuple(a + b for a, b in zip(acc, add, strict=True)), call.axes)

    zeros = jnp.zeros((tb,), call.ct)
    seconds = fold_vocab(second_body, vma.vary_all((zeros,) * n_second, call.axes), v, vb)
    if call.opt.axis_name is not None:
        seconds = tuple(lax.psum(s, call.opt.axis_name) for s in seconds)
    return stats._replace(second=seconds)


def stats_loop(call: Call, tokens: Tokens, views: Views) -> RowStats:
    """Two-level statistics: the vocabulary in blocks inside each token block."""
    v = call.heads[0].w.shape[1]

    def token_step(k, outs):
        xs, rows = views.at(tokens, k)

        def tile(start, width):
            return block(call, logits(call, xs, start, width)[0], start, rows)

        stats = vma.vary_all(tile_stats(call, tile, v, call.opt.layout.vocab_block,
                                        tokens.tb), call.token_axes())
        return jax.tree.map(lambda o, u: tokens.put(o, k, u), outs, stats)

    return token_loop(tokens, token_step, outputs(call, tokens, True, False).stats)
