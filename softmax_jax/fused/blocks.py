"""Block helpers of the fused engine: the sharded vocabulary, column slices, the token view,
the online log-sum-exp and its merge, and the online expectation of a log-ratio (a KL)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def num_classes(v_local: int, axis_name: Hashable | None) -> int:
    """The global vocabulary size: ``v_local`` columns on each device along ``axis_name``
    (the vocabulary axis; None when the vocabulary is not sharded)."""
    return v_local if axis_name is None else v_local * lax.axis_size(axis_name)


def shard_start(size: int, axis_name: Hashable | None) -> Any:
    """The global index of this device's first entry of an axis split in slices of ``size``
    along ``axis_name`` (0 without one)."""
    return 0 if axis_name is None else lax.axis_index(axis_name) * size


def fold_vocab(body: Callable[[Any, Any, int], Any], carry: Any, v: int, block: int) -> Any:
    """``carry = body(carry, start, width)`` over columns ``[0, v)`` in blocks: full blocks in
    a ``fori_loop`` (traced ``start``), a narrower last block once more; ``width`` is static."""
    nfull, tail = divmod(v, block)
    if nfull == 1:
        carry = body(carry, 0, block)
    elif nfull > 1:
        carry = lax.fori_loop(0, nfull, lambda j, c: body(c, j * block, block), carry)
    if tail:
        carry = body(carry, nfull * block, tail)
    return carry


def cols(a: jax.Array, start: Any, width: int) -> jax.Array:
    """Columns ``[start, start + width)`` of the last axis."""
    if isinstance(start, int) and start == 0 and width == a.shape[-1]:
        return a
    return lax.dynamic_slice_in_dim(a, start, width, axis=a.ndim - 1)


def narrow_bits(dtype: Any, ct: np.dtype) -> np.dtype | None:
    """The unsigned-integer dtype of ``dtype``'s bits when it is narrower than ``ct``."""
    size = np.dtype(dtype).itemsize
    return np.dtype(f"uint{8 * size}") if size < np.dtype(ct).itemsize else None


def weight_cols(w: jax.Array, start: Any, width: int, ct: np.dtype) -> jax.Array:
    """A block of a weight matrix, sliced through its bits when narrower than ``ct``.

    XLA's CPU backend carries out every data movement of bfloat16 in float32, and the
    conversion of the whole ``w`` it inserts is then hoisted out of the loop: a float32
    ``D x V`` temporary. Slicing an unsigned-integer view of the bits avoids the conversion,
    but the view of the whole ``w`` is hoisted in turn, and XLA:CPU makes it a copy. So the
    view is taken of ``w`` passed through an optimisation barrier together with the loop's
    ``start``: it then depends on the iteration, stays in the loop and is fused into the
    slice, and no ``w``-sized temporary is left (measured by ``memory_analysis()``).
    """
    bits = narrow_bits(w.dtype, ct)
    if bits is None or (isinstance(start, int) and start == 0 and width == w.shape[-1]):
        return cols(w, start, width)
    return through_bits(w, start, bits, lambda a: cols(a, start, width))


def through_bits(a: jax.Array, index: Any, bits: np.dtype,
                 take: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """``take(a)`` done on the bits of a narrow float ``a`` (see :func:`weight_cols`); a
    traced ``index`` goes through the optimisation barrier with ``a``, so that the bit view
    stays inside the loop that ``index`` counts."""
    if not isinstance(index, int):
        a, _ = lax.optimization_barrier((a, index))
    return lax.bitcast_convert_type(take(lax.bitcast_convert_type(a, bits)), a.dtype)


def put_cols(a: jax.Array, start: Any, update: jax.Array, add: bool) -> jax.Array:
    width = update.shape[-1]
    if isinstance(start, int) and start == 0 and width == a.shape[-1]:
        return a + update if add else update
    if add:
        update = lax.dynamic_slice_in_dim(a, start, width, axis=a.ndim - 1) + update
    return lax.dynamic_update_slice_in_dim(a, update, start, axis=a.ndim - 1)


def matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int], ct: np.dtype) -> jax.Array:
    """``a`` times ``b`` contracting ``a``'s axis ``contract[0]`` with ``b``'s
    ``contract[1]``, accumulated in ``ct``."""
    if a.dtype != b.dtype:
        common = jnp.promote_types(a.dtype, b.dtype)
        a, b = a.astype(common), b.astype(common)
    return lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=ct)


def rescale(s: jax.Array, m_old: jax.Array, m_new: jax.Array) -> jax.Array:
    r""":math:`s\,e^{m_{old} - m_{new}}`, 0 for an empty part (:math:`s = 0`), whose
    :math:`m_{old} = -\infty` would otherwise give NaN."""
    return jnp.where(s == 0, 0.0, s * jnp.exp(m_old - m_new))


def block_exp(z: jax.Array, m_old: jax.Array,
              axis: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""One block of the online log-sum-exp along ``axis`` (each row's by default): the
    block's maximum, the new running maximum :math:`m' = \max(m, \max_c z_c)` and
    :math:`e^{z - m'}` (with a shift of 0 where :math:`m'` is not finite, so an all
    :math:`-\infty` row gives zeros, not NaN). Exponentiating against :math:`m'` rather than
    the block's own maximum gives the sum with no rescaling of the block; an online
    expectation takes the same exponentials in its own fused reduction
    (:func:`log_ratio_sum`)."""
    bm = jnp.max(z, axis=axis)
    m_new = jnp.maximum(m_old, bm)
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    return bm, m_new, jnp.exp(z - jnp.expand_dims(shift, axis))


def online_lse(z: jax.Array, m_old: jax.Array, s_old: jax.Array, axis: int = 1
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""One block of the online log-sum-exp along ``axis``, :math:`m' = \max(m, \max_c
    z_c)`, :math:`s' = s\,e^{m - m'} + \sum_c e^{z_c - m'}` (:func:`block_exp`,
    :func:`rescale`): ``(block maximum, m', s', e^{z - m'})``."""
    bm, m_new, e = block_exp(z, m_old, axis)
    return bm, m_new, rescale(s_old, m_old, m_new) + jnp.sum(e, axis=axis), e


def merge_shards(axis: Any, ms, ss, firsts, argmax):
    """Merges per-shard statistics over the vocabulary axis (identity without one)."""
    if axis is None:
        return ms, ss, firsts, argmax
    m_all = tuple(lax.pmax(m, axis) for m in ms)
    ss = tuple(lax.psum(rescale(s, m, ma), axis) for s, m, ma in zip(ss, ms, m_all, strict=True))
    firsts = tuple(lax.psum(f, axis) for f in firsts)
    if argmax is not None:
        big = jnp.iinfo(argmax.dtype).max
        argmax = lax.pmin(jnp.where(ms[0] == m_all[0], argmax, big), axis)
    return m_all, ss, firsts, argmax


def finished_shift(m: jax.Array) -> jax.Array:
    r"""A row's final running maximum as its normaliser's shift, by the core rule
    (:class:`softmax_jax._normalizer.Normalizer`): 0 for a row with no entry above
    :math:`-\infty` (its sum is 0), NaN for a row holding :math:`+\infty`. That row has no
    softmax (:math:`\infty/\infty`), so its loss and gradients must be NaN, as the unfused
    losses and ``jax.nn.softmax`` give, not the :math:`+\infty` that the sum of
    :math:`e^{+\infty}` would make of its log-sum-exp. One select on O(rows) numbers."""
    return jnp.where(m == -jnp.inf, 0.0, jnp.where(m == jnp.inf, jnp.nan, m))


def _finite(m: jax.Array) -> jax.Array:
    """A running maximum as the shift it stands for: 0 while the part is empty."""
    return jnp.where(jnp.isfinite(m), m, 0.0)


def shift_log_ratio(acc: jax.Array, s: jax.Array, old: tuple[jax.Array, jax.Array],
                    new: tuple[jax.Array, jax.Array]) -> jax.Array:
    r"""Moves a centred sum of :func:`log_ratio_step` from the maxima ``old = (m_a, m_b)``
    to ``new``: its values drop by :math:`\Delta = (m_a' - m_a) - (m_b' - m_b)` (each
    difference of the size of the logits' spread, not of the logits), so
    :math:`A' = e^{m_a - m_a'}(A - \Delta\,S_a)`, with ``s`` the sum :math:`S_a` relative
    to ``m_a`` (an empty part, :math:`S_a = 0`, gives :math:`A' = 0`)."""
    delta = (_finite(new[0]) - _finite(old[0])) - (_finite(new[1]) - _finite(old[1]))
    return jnp.where(s == 0, 0.0, (acc - delta * s) * jnp.exp(old[0] - new[0]))


def _fenced(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """``arrays`` through an optimisation barrier: a sum over expressions of them is then
    fused with its own copy of those expressions instead of sharing one, which XLA:CPU
    writes to memory as a block-sized array."""
    return tuple(lax.optimization_barrier(arrays))


def _centred(z: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""``(z - m, max(z - m, -F))`` per row, for the running maximum ``m`` (a non-finite
    one counts as 0) and ``F`` the largest float: the centred block, and the same with
    :math:`-\infty` entries raised to :math:`-F` (a centred value below :math:`-F` has
    overflowed, and its exponential is 0 either way), so that a product with them is
    finite. The floor is built as ``0 * m - F``, a per-row array rather than a constant,
    so the clamp stays in the fused reduction; ``m - F`` would overflow to :math:`-\infty`
    for :math:`m` below about :math:`-10^{31}`, half an ulp of :math:`F`."""
    shift = _finite(m)[:, None]
    centred = z - shift
    floor = 0.0 * shift - jnp.finfo(z.dtype).max
    return centred, jnp.maximum(centred, floor)


def log_ratio_sum(za: jax.Array, zb: jax.Array, new: tuple[jax.Array, jax.Array],
                  block_s: jax.Array) -> jax.Array:
    r"""A block's :math:`\sum_c e^{a_c - m_a'}\big((a_c - m_a') - (b - m_b')\big)` against
    a one-column stream ``zb`` (one value :math:`b` per row, broadcast over the block) and
    the running maxima ``new = (m_a', m_b')``: a class of weight :math:`e^{a_c - m_a'} = 0`
    adds 0 whatever its value, and :math:`b = -\infty` under a block of weight
    (``block_s``, the block's :math:`\sum_c e^{a_c - m_a'}`, :math:`> 0`) makes it
    :math:`+\infty`.

    It is formed without a select, as one reduction that XLA:CPU fuses with its own
    exponentials (the block's :math:`\sum_c e^{a_c - m_a'}` takes them in another): the
    values are taken with :math:`-\infty` raised to minus the largest float
    (:func:`_centred`), so :math:`0 \cdot \infty` never occurs.
    """
    fa, fma, fzb, fmb = _fenced(za, new[0], zb, new[1])
    a, a_low = _centred(fa, fma)
    total = jnp.sum(jnp.exp(a) * (a_low - _centred(fzb, fmb)[1]), axis=1)
    lost = (zb[:, 0] == -jnp.inf) & (block_s > 0)
    return jnp.where(lost, jnp.inf, total)


def log_ratio_step(acc: jax.Array, s: jax.Array, block_sum: jax.Array,
                   old: tuple[jax.Array, jax.Array],
                   new: tuple[jax.Array, jax.Array]) -> jax.Array:
    r"""One block of the online expectation of the log-ratio of two softmaxes,

    .. math::
        A = \sum_c e^{a_c - m_a}\big((a_c - m_a) - (b_c - m_b)\big), \qquad
        \mathrm{KL}(\mathrm{softmax}(a) \| \mathrm{softmax}(b)) = A / S_a - \log S_a
          + \log S_b,

    with :math:`m` the running maxima of the two streams and :math:`S` their sums of
    exponentials relative to them. Each stream is centred by its own maximum, so every value
    is of the size of the logits' spread: the one-pass :math:`E_P[a - b] - (\mathrm{lse}\,a
    - \mathrm{lse}\,b)` subtracts numbers of the logits' size and loses float32 accuracy
    when the two differ by a large constant. ``block_sum`` is the block's part against the
    maxima after it (:func:`log_ratio_sum`, :func:`shared_log_ratio_sum`); ``s`` the
    running :math:`S_a` before the block, ``old``/``new`` the maxima ``(m_a, m_b)`` before
    and after it."""
    return shift_log_ratio(acc, s, old, new) + block_sum


def online_step(streams: tuple[jax.Array, ...], ms: tuple[jax.Array, ...],
                ss: tuple[jax.Array, ...], pairs: tuple[tuple[int, int], ...],
                expects: tuple[jax.Array, ...]):
    r"""One vocabulary block of every stream's online log-sum-exp (:func:`online_lse`) and
    of the online log-ratio expectation (:func:`log_ratio_step`) of each pair ``(i, j)`` of
    ``pairs``, with ``expects`` their running sums. Returns ``(block maxima, m', s',
    expects')``, per stream and per pair.

    Against a one-column stream (the entropy's), each sum is its own reduction that
    recomputes what it needs from the block (:func:`log_ratio_sum`): on XLA:CPU each is
    then one vectorised pass that reads the block and writes only per-row sums, where a
    block of exponentials shared by two sums is written to memory and read back
    (``memory_analysis()``: one more block-sized temporary). Between two full streams (a
    distillation's KL) the expectation reuses the normaliser's exponentials
    (:func:`shared_log_ratio_sum`): recomputing them there, with the extra maximum pass that
    finds a class one side cannot cover, cost more time (0.89x to 0.99x of the chunked
    anchor at V = 131072) than the block it saves."""
    exps = [block_exp(z, m) for z, m in zip(streams, ms, strict=True)]
    new_m = tuple(m_new for _, m_new, _ in exps)
    block_s = tuple(jnp.sum(e, axis=1) for _, _, e in exps)
    new_s = tuple(rescale(s, m, m_new) + b
                  for s, m, m_new, b in zip(ss, ms, new_m, block_s, strict=True))

    def block_sum(i: int, j: int) -> jax.Array:
        maxima = (new_m[i], new_m[j])
        if streams[j].shape[1] == 1:
            return log_ratio_sum(streams[i], streams[j], maxima, block_s[i])
        return shared_log_ratio_sum(exps[i][2], streams[i], streams[j], maxima)

    new_expects = tuple(
        log_ratio_step(acc, ss[i], block_sum(i, j), (ms[i], ms[j]), (new_m[i], new_m[j]))
        for acc, (i, j) in zip(expects, pairs, strict=True))
    return tuple(bm for bm, _, _ in exps), new_m, new_s, new_expects


def shared_log_ratio_sum(weight: jax.Array, za: jax.Array, zb: jax.Array,
                         new: tuple[jax.Array, jax.Array]) -> jax.Array:
    r"""A block's :math:`\sum_c e^{a_c - m_a'}\big((a_c - m_a') - (b_c - m_b')\big)` between
    two full streams, from the normaliser's own exponentials
    ``weight`` :math:`= e^{a - m_a'}`: a class of weight 0 adds 0 whatever its values (a
    select), one of weight :math:`> 0` against :math:`b_c = -\infty` adds :math:`+\infty`."""
    values = (za - _finite(new[0])[:, None]) - (zb - _finite(new[1])[:, None])
    return jnp.sum(jnp.where(weight == 0, 0.0, weight * values), axis=1)


def merge_log_ratios(axis: Any, accs, ss, pairs, ms):
    """Merges the :func:`log_ratio_step` sums of every shard of the vocabulary axis: each
    is moved to the global maxima, then they are added (identity without an axis)."""
    if axis is None:
        return accs
    m_all = tuple(lax.pmax(m, axis) for m in ms)
    return tuple(
        lax.psum(shift_log_ratio(acc, ss[i], (ms[i], ms[j]), (m_all[i], m_all[j])), axis)
        for acc, (i, j) in zip(accs, pairs, strict=True))


class Tokens:
    """Token block ``k`` holds the strided rows ``k, k + nt, ...``: viewed as ``[tb, nt]``
    (a free reshape) it is index ``k`` of axis 1. Under jit with batch-sharded inputs each
    block then spans every data shard, and no copy of ``x`` or ``dx`` is made."""

    def __init__(self, n: int, target: int):
        target = max(1, min(target, n))
        first = -(-n // target)
        self.n, self.tb, self.nt = n, -(-n // first), first
        for nt in range(first, min(n, 2 * first) + 1):
            if n % nt == 0:
                self.tb, self.nt = n // nt, nt
                break
        self.pad = self.tb * self.nt - n

    def view(self, a: jax.Array) -> jax.Array:
        if self.pad:  # zero rows, made inert by r = 0
            a = jnp.pad(a, [(0, self.pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((self.tb, self.nt) + a.shape[1:])

    def unview(self, a: jax.Array) -> jax.Array:
        a = a.reshape((self.tb * self.nt,) + a.shape[2:])
        return a[: self.n] if self.pad else a

    @staticmethod
    def take(a: jax.Array, k: Any) -> jax.Array:
        """Token block ``k``; a narrow float block is taken through its bits, as in
        :func:`weight_cols`, so that no float32 copy of the whole array is hoisted."""
        bits = narrow_bits(a.dtype, np.dtype(np.float32)) if jnp.issubdtype(
            a.dtype, jnp.floating) else None
        def index(b: jax.Array) -> jax.Array:
            return lax.dynamic_index_in_dim(b, k, axis=1, keepdims=False)

        return index(a) if bits is None or isinstance(k, int) else through_bits(a, k, bits, index)

    @staticmethod
    def put(a: jax.Array, k: Any, block: jax.Array) -> jax.Array:
        return lax.dynamic_update_index_in_dim(a, block, k, axis=1)


def token_loop(tokens: Tokens, step: Callable[[Any, Any], Any], carry: Any) -> Any:
    """``carry = step(k, carry)`` over the token blocks (no loop for a single block)."""
    if tokens.nt == 1:
        return step(0, carry)
    return lax.fori_loop(0, tokens.nt, step, carry)


def balanced(total: int, target: int) -> int:
    """A block size <= ``target`` that splits ``total`` into near-equal blocks."""
    target = max(1, min(target, total))
    return -(-total // -(-total // target))


def transposed(x: jax.Array) -> jax.Array:
    """``x.T`` as an array of its own. Left to itself XLA folds the transpose into the
    ``dW = x^T dz`` product, which then contracts both operands' first axes; XLA:CPU runs
    that form as a plain dot, about 15% slower than the row-major product its YNNPACK path
    takes (4.1 against 3.6 ms for a 128 x 2048 x 2048 block, measured)."""
    return lax.optimization_barrier(x.T)


def grad_matmul(
    dz: jax.Array, other: jax.Array, contract: tuple[int, int], ct: np.dtype, dz_first: bool,
    result: np.dtype,
) -> jax.Array:
    """A gradient product of ``dz`` (compute dtype) with ``x`` or a block of ``w``,
    accumulated in ``ct``; ``result`` is the dtype of the input whose gradient it is.

    Only when both ``other`` and that input are narrower than ``ct`` (bfloat16 ``x`` and
    ``w``) is ``dz`` rounded to ``other``'s dtype, as Cut Cross-Entropy and Liger Kernel do:
    the gradient is narrow anyway, and the product runs on narrow operands. Otherwise
    ``other`` is widened, so that the gradient of a wider input (float32 ``x`` with bfloat16
    ``w``) keeps its own dtype's accuracy. ``other`` is a block taken through its bits behind
    the loop-index barrier (:func:`weight_cols`, :meth:`Tokens.take`), so its widening stays
    in the loop: no float32 copy of the whole ``w`` is hoisted out of it.
    """
    size = np.dtype(ct).itemsize
    if np.dtype(other.dtype).itemsize < size and np.dtype(result).itemsize < size:
        dz = dz.astype(other.dtype)
    else:
        other = other.astype(ct)
    a, b = (dz, other) if dz_first else (other, dz)
    return lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=ct)
