r"""Two-level chunked linear + softmax losses: the benchmark anchor for the fused losses.

**A benchmark anchor, not public API.** ``scripts/bench_fused.py`` times the library's fused
losses against this design, which is written here from its published algorithm (Tokamax's
chunked XLA ``linear_softmax_cross_entropy_loss``) rather than imported: Tokamax needs
Python >= 3.12 and is not a dependency. Use ``softmax_jax.linear_softmax_cross_entropy`` in
real code.

The design, for hidden states ``x`` ``[N, D]`` and a head ``w`` ``[D, V]``:

* **Two-level blocking.** Tokens in blocks of ``token_block`` (1024) rows, classes in blocks of
  ``vocab_block`` (2048) columns. ``V`` is zero-padded up to a multiple of the vocabulary
  block (and ``w`` laid out as contiguous ``[D, vocab_block]`` blocks, in the same copy), and
  ``N`` up to a multiple of the token block. Unlike Tokamax, the padded classes
  are masked to :math:`-\infty` before they enter any log-sum-exp, so the value is exact
  (Tokamax's zero-padded classes each add :math:`e^0` to the normaliser: at ``V = 32000``
  its loss reads 10.892 where the true value is 10.878). Padded tokens get weight 0.
* **Forward: log-sum-exp only.** Each ``[token_block, vocab_block]`` logit block
  :math:`z = x_B w_C` is folded into an online log-sum-exp per token,
  :math:`m \leftarrow \max(m, \max_c z_c)`, :math:`s \leftarrow s\,e^{m_\text{old} - m} +
  \sum_c e^{z_c - m}`, and dropped. Only the per-token :math:`\mathrm{lse} = m + \log s` (and,
  for distillation, one per-token scalar) is saved for the backward pass.
* **Backward: logits recomputed.** For each block the logits are computed again,
  :math:`\partial\ell/\partial z` is formed from them and the saved log-sum-exps, and
  :math:`dx_B \mathrel{+}= \delta\, w_C^\top`, :math:`dw_C \mathrel{+}= x_B^\top \delta`. The
  cross-entropy costs four ``N x D x V`` matmuls in all: one forward, three backward.

Cross-entropy (:func:`chunked_cross_entropy`), integer labels, per token
:math:`\ell_i = \mathrm{lse}(z_i) - z_{i, y_i}` and
:math:`\partial\ell_i/\partial z_{ic} = \mathrm{softmax}(z_i)_c - [c = y_i]`.

Distillation (:func:`chunked_distillation`), student logits :math:`s = x w`, teacher logits
:math:`t = x_T w_T`, temperature :math:`T`, :math:`Q = \mathrm{softmax}(s/T)`,
:math:`P = \mathrm{softmax}(t/T)`, per token

* :math:`\beta = 0`: :math:`T^2\,\mathrm{KL}(P\|Q) = T^2\,(E_P[(t - s)/T] - \mathrm{lse}(t/T)
  + \mathrm{lse}(s/T))`, with gradient :math:`\partial/\partial s = T (Q - P)`;
* :math:`\beta = 1`: :math:`T^2\,\mathrm{KL}(Q\|P) = T^2\,(E_Q[(s - t)/T] - \mathrm{lse}(s/T)
  + \mathrm{lse}(t/T))`, gradient :math:`T\,Q \odot (\log Q - \log P - \mathrm{KL}(Q\|P))`;
* :math:`0 < \beta < 1`: with :math:`M = \beta P + (1 - \beta) Q`,
  :math:`T^2 (\beta\,\mathrm{KL}(P\|M) + (1-\beta)\,\mathrm{KL}(Q\|M))`, gradient
  :math:`T (1 - \beta)\, Q \odot (\log Q - \log M - \mathrm{KL}(Q\|M))` (the terms in
  :math:`\partial M/\partial Q` cancel, since :math:`\sum_c M_c = 1`).

The forward pass computes both log-sum-exps per token; for the two KL directions the
expectation is accumulated in the same pass under the same online rescaling, while the
generalised JSD needs both log-sum-exps first and so takes a second pass over the blocks.
The backward pass recomputes both logit blocks. The teacher's arguments are constants: their
cotangents are zero.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["TOKEN_BLOCK", "VOCAB_BLOCK", "chunked_cross_entropy", "chunked_distillation"]

TOKEN_BLOCK = 1024
VOCAB_BLOCK = 2048


class _Config(NamedTuple):
    n: int  # tokens
    v: int  # classes
    tb: int  # token block
    vb: int  # vocabulary block
    reduction: str
    temperature: float = 1.0
    beta: float = 0.0

    @property
    def nt(self) -> int:
        return -(-self.n // self.tb)

    @property
    def nv(self) -> int:
        return -(-self.v // self.vb)


def _config(x: jax.Array, w: jax.Array, reduction: str, token_block: int, vocab_block: int,
            **extra: float) -> _Config:
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"need x [N, D] and w [D, V], got {x.shape} and {w.shape}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if token_block < 1 or vocab_block < 1:
        raise ValueError(f"block sizes must be >= 1, got {token_block}, {vocab_block}")
    n, v = x.shape[0], w.shape[1]
    return _Config(n, v, min(token_block, n), min(vocab_block, v), reduction, **extra)


def _compute_dtype(*arrays: jax.Array) -> Any:
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _token_blocks(a: jax.Array, cfg: _Config) -> jax.Array:
    """``[N, ...]`` zero-padded to ``[nt * tb, ...]`` and viewed as ``[nt, tb, ...]``."""
    pad = [(0, cfg.nt * cfg.tb - cfg.n)] + [(0, 0)] * (a.ndim - 1)
    return jnp.pad(a, pad).reshape(cfg.nt, cfg.tb, *a.shape[1:])


def _vocab_blocks(w: jax.Array, cfg: _Config) -> jax.Array:
    """``[D, V]`` zero-padded to ``[D, nv * vb]`` and laid out as ``[nv, D, vb]`` (one copy),
    so that each vocabulary block is contiguous."""
    wp = jnp.pad(w, ((0, 0), (0, cfg.nv * cfg.vb - cfg.v)))
    return wp.reshape(w.shape[0], cfg.nv, cfg.vb).transpose(1, 0, 2)


def _block(blocks: jax.Array, j: Any) -> jax.Array:
    return lax.dynamic_index_in_dim(blocks, j, axis=0, keepdims=False)


def _real_cols(j: Any, cfg: _Config) -> jax.Array | None:
    """``[1, vb]`` mask of the block's real (unpadded) classes; None when V needs no padding."""
    if cfg.v % cfg.vb == 0:
        return None
    return (j * cfg.vb + jnp.arange(cfg.vb) < cfg.v)[None, :]


def _logits(x_blk: jax.Array, wb: jax.Array, j: Any, cfg: _Config, ct: Any,
            scale: float = 1.0) -> jax.Array:
    """One ``[tb, vb]`` block ``x_blk @ wb[j] * scale``, padded classes at -inf."""
    z = jnp.matmul(x_blk.astype(ct), _block(wb, j).astype(ct), preferred_element_type=ct)
    if scale != 1.0:
        z = z * scale
    mask = _real_cols(j, cfg)
    return z if mask is None else jnp.where(mask, z, -jnp.inf)


def _lse_step(m: jax.Array, s: jax.Array, z: jax.Array) -> tuple[jax.Array, ...]:
    """Online log-sum-exp merge of a block; returns the new max, sum and the old-sum factor."""
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    rescale = jnp.exp(m - m_new)  # m = -inf at the start: factor 0, never NaN (m_new finite)
    return m_new, s * rescale + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1), rescale


def _fold_vocab(token_data: Any, cfg: _Config, init: Callable, step: Callable) -> Any:
    """For each token block (leading axis of ``token_data``), folds ``step(j, blk, state)``
    over the vocabulary blocks from ``init(blk)``; returns the final states, stacked."""

    def per_token_block(_, blk):
        return None, lax.fori_loop(0, cfg.nv, lambda j, st: step(j, blk, st), init(blk))

    return lax.scan(per_token_block, None, token_data)[1]


def _grad_loop(token_data: Any, x_key: str, wb: jax.Array, cfg: _Config, ct: Any,
               dlogits: Callable) -> tuple[jax.Array, jax.Array]:
    """``dx`` ``[N, D]`` and ``dw`` ``[D, V]`` from ``dlogits(j, blk, z)``, the ``[tb, vb]``
    gradient of the loss w.r.t. logit block ``z = x_blk @ wb[j]`` (recomputed here)."""
    d = wb.shape[1]

    def per_token_block(dw, blk):
        x_blk = blk[x_key].astype(ct)

        def step(j, carry):
            dx, dw = carry
            w_blk = _block(wb, j).astype(ct)
            delta = dlogits(j, blk, jnp.matmul(x_blk, w_blk, preferred_element_type=ct))
            dx = dx + jnp.matmul(delta, w_blk.T, preferred_element_type=ct)
            dw_blk = _block(dw, j) + jnp.matmul(x_blk.T, delta, preferred_element_type=ct)
            return dx, lax.dynamic_update_index_in_dim(dw, dw_blk, j, axis=0)

        dx, dw = lax.fori_loop(0, cfg.nv, step, (jnp.zeros((cfg.tb, d), ct), dw))
        return dw, dx

    dw, dx = lax.scan(per_token_block, jnp.zeros((cfg.nv, d, cfg.vb), ct), token_data)
    return dx.reshape(-1, d)[: cfg.n], dw.transpose(1, 0, 2).reshape(d, -1)[:, : cfg.v]


def _token_scale(g: jax.Array, cfg: _Config, ct: Any) -> jax.Array:
    """``d loss / d per-token loss`` for each padded token: g (sum) or g / N (mean), 0 on
    padding, as ``[nt, tb]``."""
    real = (jnp.arange(cfg.nt * cfg.tb) < cfg.n).astype(ct)
    scale = g.astype(ct) / cfg.n if cfg.reduction == "mean" else g.astype(ct)
    return (real * scale).reshape(cfg.nt, cfg.tb)


def _reduce(per_token: jax.Array, cfg: _Config) -> jax.Array:
    total = jnp.sum(per_token.reshape(-1)[: cfg.n])
    return total / cfg.n if cfg.reduction == "mean" else total


# ---------------------------------------------------------------------------------------
# Cross-entropy with integer labels.


def _ce_forward(cfg: _Config, x, w, labels):
    ct = _compute_dtype(x, w)
    wp = _vocab_blocks(w, cfg)
    data = {"x": _token_blocks(x, cfg), "y": _token_blocks(labels.astype(jnp.int32), cfg)}

    def init(blk):
        neg = jnp.full((cfg.tb,), -jnp.inf, ct)
        return neg, jnp.zeros((cfg.tb,), ct), jnp.zeros((cfg.tb,), ct)

    def step(j, blk, state):
        m, s, z_label = state
        z = _logits(blk["x"], wp, j, cfg, ct)
        m, s, _ = _lse_step(m, s, z)
        local = blk["y"] - j * cfg.vb
        hit = (local >= 0) & (local < cfg.vb)
        picked = jnp.take_along_axis(z, jnp.clip(local, 0, cfg.vb - 1)[:, None], axis=1)[:, 0]
        return m, s, z_label + jnp.where(hit, picked, 0.0)

    m, s, z_label = _fold_vocab(data, cfg, init, step)
    lse = m + jnp.log(s)
    return _reduce(lse - z_label, cfg), (x, w, labels, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ce(cfg: _Config, x, w, labels):
    return _ce_forward(cfg, x, w, labels)[0]


def _ce_bwd(cfg: _Config, res, g):
    x, w, labels, lse = res
    ct = _compute_dtype(x, w)
    data = {"x": _token_blocks(x, cfg), "y": _token_blocks(labels.astype(jnp.int32), cfg),
            "lse": lse, "c": _token_scale(g, cfg, ct)}

    def dlogits(j, blk, z):
        mask = _real_cols(j, cfg)
        p = jnp.exp(z - blk["lse"][:, None])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        one_hot = (blk["y"] - j * cfg.vb)[:, None] == jnp.arange(cfg.vb)[None, :]
        return (p - one_hot.astype(ct)) * blk["c"][:, None]

    dx, dw = _grad_loop(data, "x", _vocab_blocks(w, cfg), cfg, ct, dlogits)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_ce.defvjp(_ce_forward, _ce_bwd)


def chunked_cross_entropy(
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    reduction: str = "mean",
    token_block: int = TOKEN_BLOCK,
    vocab_block: int = VOCAB_BLOCK,
) -> jax.Array:
    r"""Integer-label cross-entropy of ``x @ w``, two-level chunked (benchmark anchor).

    :math:`\ell_i = \mathrm{lse}_c(x_i w_{:c}) - x_i w_{:y_i}`, summed (``"sum"``) or averaged
    (``"mean"``) over the ``N`` tokens. Labels must lie in ``[0, V)``. Gradients flow to ``x``
    and ``w``. The arithmetic runs in ``float32`` (``float64`` for ``float64`` inputs); the
    gradients are returned in the inputs' dtypes.
    """
    cfg = _config(x, w, reduction, token_block, vocab_block)
    if labels.shape != (cfg.n,):
        raise ValueError(f"labels must have shape ({cfg.n},), got {labels.shape}")
    return _ce(cfg, x, w, labels)


# ---------------------------------------------------------------------------------------
# Distillation: forward KL, reverse KL, generalised JSD, with temperature.


def _both_logits(blk, j, wp, twp, cfg: _Config, ct, z_s=None):
    inv_t = 1.0 / cfg.temperature
    if z_s is None:
        s = _logits(blk["x"], wp, j, cfg, ct, inv_t)
    else:  # the student block recomputed by the gradient loop, unscaled and unmasked
        s = z_s * inv_t
        mask = _real_cols(j, cfg)
        s = s if mask is None else jnp.where(mask, s, -jnp.inf)
    return s, _logits(blk["tx"], twp, j, cfg, ct, inv_t)


def _log_mix(log_p: jax.Array, log_q: jax.Array, beta: float) -> jax.Array:
    """:math:`\\log(\\beta P + (1 - \\beta) Q)` from the two log-probabilities."""
    return jnp.logaddexp(np.log(beta) + log_p, np.log1p(-beta) + log_q)


def _kd_forward(cfg: _Config, x, w, tx, tw):
    ct = _compute_dtype(x, w, tx, tw)
    wp, twp = _vocab_blocks(w, cfg), _vocab_blocks(tw, cfg)
    data = {"x": _token_blocks(x, cfg), "tx": _token_blocks(tx, cfg)}
    beta = cfg.beta

    def init(blk):
        neg, zero = jnp.full((cfg.tb,), -jnp.inf, ct), jnp.zeros((cfg.tb,), ct)
        return neg, zero, neg, zero, zero

    def step(j, blk, state):
        m_s, s_s, m_t, s_t, acc = state
        s, t = _both_logits(blk, j, wp, twp, cfg, ct)
        m_s, s_s, rescale_s = _lse_step(m_s, s_s, s)
        m_t, s_t, rescale_t = _lse_step(m_t, s_t, t)
        mask = _real_cols(j, cfg)
        if beta == 0.0:  # E_P[t - s] under the teacher's running max
            weight, gap, rescale = jnp.exp(t - m_t[:, None]), t - s, rescale_t
        else:  # E_Q[s - t] under the student's running max (unused for the JSD)
            weight, gap, rescale = jnp.exp(s - m_s[:, None]), s - t, rescale_s
        term = weight * gap
        term = term if mask is None else jnp.where(mask, term, 0.0)
        return m_s, s_s, m_t, s_t, acc * rescale + jnp.sum(term, axis=1)

    m_s, s_s, m_t, s_t, acc = _fold_vocab(data, cfg, init, step)
    lse_s, lse_t = m_s + jnp.log(s_s), m_t + jnp.log(s_t)
    if beta == 0.0:
        kl = acc / s_t - lse_t + lse_s
        per_token, aux = kl, kl
    elif beta == 1.0:
        kl = acc / s_s - lse_s + lse_t
        per_token, aux = kl, kl
    else:
        data = dict(data, lse_s=lse_s, lse_t=lse_t)
        kl_pm, kl_qm = _fold_vocab(
            data, cfg,
            lambda blk: (jnp.zeros((cfg.tb,), ct), jnp.zeros((cfg.tb,), ct)),
            functools.partial(_jsd_step, wp=wp, twp=twp, cfg=cfg, ct=ct),
        )
        per_token, aux = beta * kl_pm + (1.0 - beta) * kl_qm, kl_qm
    loss = cfg.temperature**2 * _reduce(per_token, cfg)
    return loss, (x, w, tx, tw, lse_s, lse_t, aux)


def _jsd_step(j, blk, state, *, wp, twp, cfg: _Config, ct):
    kl_pm, kl_qm = state
    s, t = _both_logits(blk, j, wp, twp, cfg, ct)
    log_q, log_p = s - blk["lse_s"][:, None], t - blk["lse_t"][:, None]
    log_m = _log_mix(log_p, log_q, cfg.beta)
    pm, qm = jnp.exp(log_p) * (log_p - log_m), jnp.exp(log_q) * (log_q - log_m)
    mask = _real_cols(j, cfg)
    if mask is not None:
        pm, qm = jnp.where(mask, pm, 0.0), jnp.where(mask, qm, 0.0)
    return kl_pm + jnp.sum(pm, axis=1), kl_qm + jnp.sum(qm, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kd(cfg: _Config, x, w, tx, tw):
    return _kd_forward(cfg, x, w, tx, tw)[0]


def _kd_bwd(cfg: _Config, res, g):
    x, w, tx, tw, lse_s, lse_t, aux = res
    ct = _compute_dtype(x, w, tx, tw)
    wp, twp = _vocab_blocks(w, cfg), _vocab_blocks(tw, cfg)
    data = {"x": _token_blocks(x, cfg), "tx": _token_blocks(tx, cfg), "lse_s": lse_s,
            "lse_t": lse_t, "aux": aux, "c": _token_scale(g, cfg, ct) * cfg.temperature}
    beta = cfg.beta

    def dlogits(j, blk, z):
        s, t = _both_logits(blk, j, wp, twp, cfg, ct, z_s=z)
        log_q, log_p = s - blk["lse_s"][:, None], t - blk["lse_t"][:, None]
        q = jnp.exp(log_q)
        if beta == 0.0:
            delta = q - jnp.exp(log_p)
        elif beta == 1.0:
            delta = q * (log_q - log_p - blk["aux"][:, None])
        else:
            log_m = _log_mix(log_p, log_q, beta)
            delta = (1.0 - beta) * q * (log_q - log_m - blk["aux"][:, None])
        mask = _real_cols(j, cfg)
        delta = delta if mask is None else jnp.where(mask, delta, 0.0)
        # d/d(raw logit) = (1/T) d/d(s/T); the T^2 of the loss leaves a factor T, in "c".
        return delta * blk["c"][:, None]

    dx, dw = _grad_loop(data, "x", wp, cfg, ct, dlogits)
    return dx.astype(x.dtype), dw.astype(w.dtype), jnp.zeros_like(tx), jnp.zeros_like(tw)


_kd.defvjp(_kd_forward, _kd_bwd)


def chunked_distillation(
    x: jax.Array,
    w: jax.Array,
    teacher_x: jax.Array,
    teacher_w: jax.Array,
    *,
    temperature: float = 1.0,
    beta: float = 0.0,
    reduction: str = "mean",
    token_block: int = TOKEN_BLOCK,
    vocab_block: int = VOCAB_BLOCK,
) -> jax.Array:
    r"""Distillation loss between ``x @ w`` (student) and ``teacher_x @ teacher_w``
    (teacher), two-level chunked (benchmark anchor).

    Per token, with :math:`Q = \mathrm{softmax}(x_i w / T)` and
    :math:`P = \mathrm{softmax}(x^T_i w_T / T)`: :math:`T^2\,\mathrm{KL}(P\|Q)` at
    ``beta=0``, :math:`T^2\,\mathrm{KL}(Q\|P)` at ``beta=1`` and the generalised
    Jensen-Shannon divergence :math:`T^2(\beta\,\mathrm{KL}(P\|M) + (1-\beta)\,
    \mathrm{KL}(Q\|M))`, :math:`M = \beta P + (1-\beta) Q`, in between; summed or averaged
    over the tokens. The teacher's width may differ from the student's. Gradients flow to
    ``x`` and ``w``; the teacher's cotangents are zero. ``temperature`` and ``beta`` are
    Python floats (static).
    """
    cfg = _config(x, w, reduction, token_block, vocab_block,
                  temperature=float(temperature), beta=float(beta))
    if teacher_x.shape[0] != cfg.n or teacher_w.shape != (teacher_x.shape[1], cfg.v):
        raise ValueError(
            f"teacher_x must be [{cfg.n}, D_T] and teacher_w [D_T, {cfg.v}], got"
            f" {teacher_x.shape} and {teacher_w.shape}"
        )
    if not cfg.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= cfg.beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    return _kd(cfg, x, w, teacher_x, teacher_w)
