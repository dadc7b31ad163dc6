"""linear_softmax_cross_entropy's options: class weights, per-token statistics, block layout,
hyper-parameter derivatives, and non-finite logits inside a vocabulary block."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import softmax_jax as sj
from softmax_jax.fused import BlockLayout, FusedStats, linear_softmax_cross_entropy

N, D, V = 19, 6, 29


IGNORE = -100


BLOCKS = {
    "held": {},
    "held_tokens": {"token_block": 5},
    "tiles": {"token_block": 6, "vocab_block": 8},
}


def _inputs(n=N, d=D, v=V, seed=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.7, dtype)
    b = jnp.asarray(rng.normal(size=(v,)) * 0.5, dtype)
    labels = rng.integers(0, v, n)
    # the first and last column of each vocabulary block of 8, and V - 1
    edges = sorted({c for s in range(0, v, 8) for c in (s, s - 1) if c >= 0} | {v - 1})
    labels[3:3 + len(edges)] = edges[: max(0, n - 3)]
    return x, w, b, jnp.asarray(labels).at[2].set(IGNORE)


def _unfused(x, w, labels, b, reduction, *, soft_cap=None, class_weights=None, **kw):
    z = x @ w + b
    if soft_cap is not None:
        z = soft_cap * jnp.tanh(z / soft_cap)
    per = sj.softmax_cross_entropy_with_integer_labels(
        z, labels, ignore_index=IGNORE, class_weights=class_weights, **kw)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    kept = labels != IGNORE
    den = kept.sum() if class_weights is None else jnp.where(
        kept, class_weights[jnp.clip(labels, 0)], 0.0).sum()
    return per.sum() / den


def test_all_negative_infinite_vocabulary_block_is_not_nan():
    # Padded vocabulary entries with a -inf bias fill the last block entirely.
    x, w = jnp.eye(2, 4), jnp.ones((4, 10))
    b = jnp.zeros(10).at[8:].set(-jnp.inf)
    labels = jnp.array([0, 1])
    expected, ref = jax.jit(jax.value_and_grad(
        lambda x, w, b: optax.softmax_cross_entropy_with_integer_labels(x @ w + b, labels).mean(),
        argnums=(0, 1, 2)))(x, w, b)
    for blocks in ({"vocab_block": 4}, {"vocab_block": 4, "token_block": 1}, {}):
        loss, grads = jax.jit(jax.value_and_grad(
            functools.partial(linear_softmax_cross_entropy, **blocks), argnums=(0, 1, 3)))(
            x, w, labels, b)
        np.testing.assert_allclose(loss, expected, rtol=1e-6)
        np.testing.assert_allclose(loss, 2.0794, atol=1e-4)
        for got, want in zip(grads, ref, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_traced_zero_smoothing_with_negative_infinite_logits_is_not_nan():
    x, w = jnp.eye(2, 4), jnp.ones((4, 10))
    b = jnp.zeros(10).at[8:].set(-jnp.inf)
    labels = jnp.array([0, 1])
    for blocks in ({}, {"vocab_block": 4}):
        loss = jax.jit(lambda eps, blocks=blocks: linear_softmax_cross_entropy(
            x, w, labels, b, label_smoothing=eps, **blocks))(0.0)
        np.testing.assert_allclose(loss, 2.0794, atol=1e-4)


def test_z_loss_with_overflowing_lse_gives_inf_not_nan():
    x, w = jnp.ones((1, 1)), jnp.ones((1, 3))
    b = jnp.array([3e38, 0.0, -1.0])
    dx, db = jax.jit(jax.grad(lambda x, b: linear_softmax_cross_entropy(
        x, w, jnp.array([0]), b, z_loss=1.0), argnums=(0, 1)))(x, b)
    assert np.isposinf(db[0])
    np.testing.assert_array_equal(db[1:], 0.0)
    assert not np.isnan(dx).any()


@functools.partial(jax.jit, static_argnames=("fused", "reduction", "blocks"))
def _hyper_grads(x, w, b, labels, weight, eps, lam, cap, *, fused, reduction, blocks=None):
    def loss(eps, lam, cap):
        kw = {"label_smoothing": eps, "z_loss": lam, "soft_cap": cap}
        if fused:
            out = linear_softmax_cross_entropy(x, w, labels, b, reduction=reduction,
                                               ignore_index=IGNORE, **kw, **BLOCKS[blocks])
        else:
            out = _unfused(x, w, labels, b, reduction, **kw)
        return jnp.sum(out * weight) if reduction == "none" else out

    return jax.grad(loss, argnums=(0, 1, 2))(eps, lam, cap)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("blocks", ["held", "tiles"])
def test_hyperparameter_gradients_are_exact(x64, reduction, blocks):
    x, w, b, labels = _inputs()
    weight = jnp.linspace(0.5, 1.5, N)
    hyper = (np.float64(0.1), np.float64(0.02), np.float64(2.5))
    got = _hyper_grads(x, w, b, labels, weight, *hyper, fused=True, reduction=reduction,
                       blocks=blocks)
    want = _hyper_grads(x, w, b, labels, weight, *hyper, fused=False, reduction=reduction)
    assert all(abs(float(g)) > 1e-4 for g in got)
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_infinite_soft_cap_means_no_cap():
    x, w, b, labels = _inputs(dtype=jnp.float32)
    plain = linear_softmax_cross_entropy(x, w, labels, b, ignore_index=IGNORE)
    capped = linear_softmax_cross_entropy(x, w, labels, b, ignore_index=IGNORE,
                                          soft_cap=float("inf"))
    traced = jax.jit(lambda c: linear_softmax_cross_entropy(
        x, w, labels, b, ignore_index=IGNORE, soft_cap=c))(jnp.inf)
    np.testing.assert_allclose(capped, plain, rtol=1e-6)
    np.testing.assert_allclose(traced, plain, rtol=1e-6)


def test_numpy_integer_ignore_index_behaves_as_the_core():
    x, w, b, labels = _inputs(dtype=jnp.float32)
    got = linear_softmax_cross_entropy(x, w, labels, b, ignore_index=np.int64(IGNORE),
                                       reduction="none")
    want = jax.jit(lambda x, w, b: sj.softmax_cross_entropy_with_integer_labels(
        x @ w + b, labels, ignore_index=np.int64(IGNORE)))(x, w, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@functools.partial(jax.jit, static_argnames=("reduction", "smoothing", "blocks"))
def _class_weighted_value_and_grads(x, w, b, labels, cw, *, reduction, smoothing, blocks):
    return jax.value_and_grad(lambda x, w, b: jnp.sum(linear_softmax_cross_entropy(
        x, w, labels, b, class_weights=cw, ignore_index=IGNORE, label_smoothing=smoothing,
        reduction=reduction, **BLOCKS[blocks]) * (jnp.arange(N) + 1.0 if reduction == "none"
                                                  else 1.0)), argnums=(0, 1, 2))(x, w, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_class_weights_match_pytorch(x64, reduction, smoothing, blocks):
    x, w, b, labels = _inputs()
    cw = jnp.asarray(np.random.default_rng(1).uniform(0.2, 2.0, V))
    got, grads = _class_weighted_value_and_grads(x, w, b, labels, cw, reduction=reduction,
                                                 smoothing=smoothing, blocks=blocks)
    tx, tw, tb = (torch.tensor(np.asarray(a), requires_grad=True) for a in (x, w, b))
    out = torch.nn.functional.cross_entropy(
        tx @ tw + tb, torch.tensor(np.asarray(labels)), weight=torch.tensor(np.asarray(cw)),
        ignore_index=IGNORE, label_smoothing=smoothing, reduction=reduction)
    if reduction == "none":
        out = (out * torch.arange(1.0, N + 1, dtype=out.dtype)).sum()
    out.backward()
    np.testing.assert_allclose(got, out.item(), rtol=1e-10)
    for g, t in zip(grads, (tx, tw, tb), strict=True):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_class_weights_with_z_loss_and_cap_match_the_core(x64):
    x, w, b, labels = _inputs()
    cw = jnp.linspace(0.5, 2.0, V)
    kw = {"label_smoothing": 0.1, "z_loss": 0.01, "soft_cap": 4.0, "class_weights": cw}
    got = jax.jit(jax.value_and_grad(lambda x: linear_softmax_cross_entropy(
        x, w, labels, b, ignore_index=IGNORE, vocab_block=7, **kw)))(x)
    want = jax.jit(jax.value_and_grad(lambda x: _unfused(x, w, labels, b, "mean", **kw)))(x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-12)


def test_class_weights_are_checked():
    x, w, b, labels = _inputs(dtype=jnp.float32)
    with pytest.raises(ValueError, match="one weight per class"):
        linear_softmax_cross_entropy(x, w, labels, class_weights=jnp.ones(V + 1))
    with pytest.raises(TypeError, match="floating"):
        linear_softmax_cross_entropy(x, w, labels, class_weights=jnp.ones(V, jnp.int32))


@functools.partial(jax.jit, static_argnames=("reduction", "blocks"))
def _loss_stats_and_plain_loss(x, w, b, labels, *, reduction, blocks):
    kw = {"ignore_index": IGNORE, "soft_cap": 3.0, "reduction": reduction, **BLOCKS[blocks]}
    loss, stats = linear_softmax_cross_entropy(x, w, labels, b, return_stats=True, **kw)
    return loss, stats, linear_softmax_cross_entropy(x, w, labels, b, **kw)


@jax.jit
def _capped_lse_and_argmax(x, w, b):
    z = 3.0 * jnp.tanh((x @ w + b) / 3.0)
    return jax.nn.logsumexp(z, axis=1), jnp.argmax(z, axis=1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_stats_match_logsumexp_and_argmax(reduction, blocks):
    x, w, b, labels = _inputs(dtype=jnp.float32)
    loss, stats, plain = _loss_stats_and_plain_loss(x, w, b, labels, reduction=reduction,
                                                    blocks=blocks)
    lse, argmax = _capped_lse_and_argmax(x, w, b)
    assert isinstance(stats, FusedStats)
    assert stats.lse.dtype == jnp.float32 and stats.lse.shape == (N,)
    assert stats.argmax.dtype == jnp.int32 and stats.argmax.shape == (N,)
    np.testing.assert_allclose(stats.lse, lse, rtol=1e-6)
    np.testing.assert_array_equal(stats.argmax, argmax)
    np.testing.assert_allclose(loss, plain, rtol=1e-6)


# Rows of w: logit patterns with ties in the same and in different blocks of 8 (V = 20).
_TIES = np.zeros((7, 20), np.float32)


_TIES[1, [3, 11, 19]] = 1.0  # three blocks


_TIES[2, [9, 17]] = 1.0  # the second and third block


_TIES[3, [8, 16]] = 1.0  # block starts


_TIES[4, [7, 15]] = 1.0  # block ends


_TIES[5, 19] = 1.0  # the last class alone


_TIES[6, [0, 5]] = -1.0  # ties at the maximum 0 everywhere else


@pytest.mark.parametrize("blocks", [{}, {"vocab_block": 8}, {"vocab_block": 8, "token_block": 3}],
                         ids=["held", "tiles", "small_tiles"])
def test_argmax_takes_the_first_of_tied_classes_across_blocks(blocks):
    # jnp.argmax's rule, the first index among equal maxima, whichever blocks hold them.
    x = jnp.eye(7, dtype=jnp.float32)
    w = jnp.asarray(_TIES)
    labels = jnp.zeros((7,), jnp.int32)
    _, stats = linear_softmax_cross_entropy(x, w, labels, return_stats=True, **blocks)
    want = jnp.argmax(x @ w, axis=1)
    np.testing.assert_array_equal(want, [0, 3, 9, 8, 7, 19, 1])
    np.testing.assert_array_equal(stats.argmax, want)


def test_stats_lse_gradient_adds_to_the_loss_gradient():
    x, w, b, labels = _inputs(dtype=jnp.float32)

    def total(x):
        loss, stats = linear_softmax_cross_entropy(x, w, labels, b, return_stats=True)
        return loss + stats.lse.sum()

    want = jax.jit(jax.grad(lambda x: linear_softmax_cross_entropy(x, w, labels, b)
                            + sj.logsumexp(x @ w + b, axis=-1).sum()))(x)
    np.testing.assert_allclose(jax.jit(jax.grad(total))(x), want, rtol=1e-5, atol=1e-6)


def test_default_layout_rule():
    assert BlockLayout.default(4096, 256, 32000) == BlockLayout(256, 32000)
    assert BlockLayout.default(2048, 128, 131072) == BlockLayout(2048, 2048)
    assert BlockLayout.default(4096, 256, 32000, heads=2) == BlockLayout(128, 32000)
    assert BlockLayout.default(10, 4, 7) == BlockLayout(10, 7)
    # Narrow weights never get a float32 D x V accumulator above 64 MiB.
    assert not BlockLayout.default(4096, 4096, 32000, weight_itemsize=2).holds_rows(32000)
    # Per-token outputs form their gradient in the backward pass, which recomputes the
    # logits in either layout: they take tiles, which cover whole rows when V is small.
    assert BlockLayout.default(2048, 128, 32768, per_token=True) == BlockLayout(2048, 1024)
    assert BlockLayout.default(4096, 256, 131072, per_token=True) == BlockLayout(2048, 1024)
    assert BlockLayout.default(10, 4, 7, per_token=True) == BlockLayout(10, 7)
    assert BlockLayout.resolve(2048, 128, 32768, 4, per_token=True) == BlockLayout(2048, 1024)
    assert BlockLayout.resolve(2048, 128, 32768, 4, vocab_block=40000, per_token=True) == (
        BlockLayout(256, 32768))


def test_bad_block_sizes_raise():
    x, w, b, labels = _inputs(dtype=jnp.float32)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive int"):
            linear_softmax_cross_entropy(x, w, labels, token_block=bad)


@pytest.mark.parametrize("kind", ["ce", "distillation"])
def test_bf16_gradient_has_no_weight_sized_temporary(kind):
    # N=16384, D=1024, V=262144 scaled down in N and D. XLA:CPU can hoist a bit-view copy of
    # each bf16 weight out of the vocabulary loop (136 and 269 MiB here); what may remain is
    # a dW span buffer (at most 32 MiB) and O(N D) arrays.
    n, d, v = 512, 256, 262144
    bf = jnp.bfloat16
    shapes = [jax.ShapeDtypeStruct(s, bf) for s in ((n, d), (d, v), (n, d // 2), (d // 2, v))]
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)
    if kind == "ce":
        fn = jax.grad(lambda x, w, y: linear_softmax_cross_entropy(x, w, y), argnums=(0, 1))
        compiled = jax.jit(fn).lower(shapes[0], shapes[1], labels).compile()
    else:
        fn = jax.grad(lambda x, w, tx, tw: sj.linear_softmax_distillation(
            x, w, tx, tw, beta=0.5), argnums=(0, 1))
        compiled = jax.jit(fn).lower(*shapes).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < d * v * 2 // 2, temp  # under half of one bf16 copy of the student's w


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_dw_written_in_several_spans(monkeypatch, dtype):
    """bf16/f16 dW blocks gathered in span buffers: with a span of two vocabulary blocks,
    V = 29 in blocks of 8 makes spans of 16 and 13 columns (the last with a 5-wide block)."""
    from softmax_jax.fused import grad_pass

    # The span size is read when the fused program is traced (and the traces of its
    # custom_vjp rules are cached): each computation below is one compiled program.
    x, w, b, labels = _inputs(dtype=dtype)
    f32 = [a.astype(jnp.float32) for a in (x, w, b)]
    monkeypatch.setattr(grad_pass, "NARROW_SPAN_BYTES", 2 * 8 * D * 2)
    jax.clear_caches()
    grad = jax.grad(lambda x, w, b: linear_softmax_cross_entropy(
        x, w, labels, b, ignore_index=IGNORE, **BLOCKS["tiles"]), argnums=(0, 1, 2))
    got = jax.jit(grad)(x, w, b)
    monkeypatch.undo()
    jax.clear_caches()
    want = jax.jit(jax.grad(lambda x, w, b: _unfused(x, w, labels, b, "mean"),
                            argnums=(0, 1, 2)))(*f32)
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    for g, e in zip(got, want, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), e, rtol=tol, atol=tol)
