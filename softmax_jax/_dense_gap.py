r"""The weighted gap :math:`\sum_k y_k (m - z_k)` of the dense cross-entropy, exact and fast.

The dense loss is :math:`\sum_k y_k(-\log a_k) = \sum_k y_k (m - z_k) + \log s \sum_k y_k`.
In the first sum a zero target on a :math:`-\infty` (or masked) logit must add 0, not
:math:`0 \cdot \infty = \mathrm{NaN}`. Guarding every term with ``where`` makes XLA:CPU's
reduction about 5x slower, so the plain sum is computed first, and only the rows where it
came out NaN or infinite are recomputed with the guarded form (through ``lax.cond``, so
that a call with no such row pays nothing), which also halves each gap before the sum, so
that logits spanning more than the float range stay finite. A row's value depends on that
row alone: it is the plain sum if that is finite, else the guarded one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from softmax_jax._normalizer import batched_as_rows


def weighted_gap(y: jax.Array, z: jax.Array, m: jax.Array, axis: int, masked: bool) -> jax.Array:
    r""":math:`\sum_k y_k (m - z_k)` along ``axis`` (kept as size 1), with
    :math:`0 \cdot \infty` read as 0; ``m`` is the row shift of the normaliser. Masked
    calls (``masked``) take the guarded form directly."""
    if masked:
        return guarded_gap(y, z, m, axis)
    return _gap(axis)(y, z, m)


def guarded_gap(y: jax.Array, z: jax.Array, m: jax.Array, axis: int) -> jax.Array:
    """The weighted gap with every term made safe, for masked calls and NaN rows."""
    # Capping each gap at the largest float makes 0 * gap = 0 for a -inf logit; a positive
    # target on such a logit then gets its true infinite loss back from the second sum.
    # The gap is halved first (exact in binary) and the sum doubled last: m - z overflows
    # once the logits span more than the largest float, while y (m - z) may not.
    # (Both stay clear of select-in-reduce, which XLA:CPU materialises as N x V.)
    big = jnp.finfo(z.dtype).max
    half = jnp.minimum(0.5 * m - 0.5 * z, big)
    capped = 2.0 * jnp.sum(y * half, axis=axis, keepdims=True)
    hopeless = jnp.any((y > 0) & (z == -jnp.inf), axis=axis, keepdims=True)
    return jnp.where(hopeless, jnp.inf, capped)


def _plain_or_guarded(y: jax.Array, z: jax.Array, m: jax.Array, axis: int) -> jax.Array:
    plain = jnp.sum(y * (m - z), axis=axis, keepdims=True)
    # NaN: a zero target on a -inf logit; inf: that, or an m - z beyond the float range.
    bad = ~jnp.isfinite(plain)
    return jax.lax.cond(
        jnp.any(bad),
        lambda: jnp.where(bad, guarded_gap(y, z, m, axis), plain),
        lambda: plain,
    )


@functools.cache
def _gap(axis: int):
    r"""The unmasked weighted gap along ``axis``, with its own batching and derivative rules.

    Under ``vmap`` the mapped axis becomes one more row axis
    (:func:`softmax_jax._normalizer.batched_as_rows`), so the ``lax.cond`` stays a choice
    instead of a ``select`` that runs both branches. The tangent is
    :math:`\sum_k \dot y_k (m - z_k) - y_k \dot z_k + \dot m \sum_k y_k`, so that
    ``custom_vmap`` (which has no autodiff of its own) stays differentiable to any order.
    """

    gap = jax.custom_jvp(
        batched_as_rows(lambda y, z, m: _plain_or_guarded(y, z, m, axis), _gap, axis)
    )

    @gap.defjvp
    def _tangent(primals, tangents):
        (y, z, m), (dy, dz, dm) = primals, tangents
        big = jnp.finfo(z.dtype).max
        d = jnp.sum(dy * jnp.minimum(m - z, big) - jnp.where(y == 0, 0.0, y * dz),
                    axis=axis, keepdims=True)
        return gap(y, z, m), d + dm * jnp.sum(y, axis=axis, keepdims=True)

    return gap
