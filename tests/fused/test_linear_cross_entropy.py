"""linear_softmax_cross_entropy against the unfused formula: x @ w + b, soft cap, core loss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from _inputs import normal
from _residuals import saved_residuals

import softmax_jax as sj
from softmax_jax.fused import linear_softmax_cross_entropy

N, D, V = 37, 12, 101  # deliberately not multiples of any block size


IGNORE = -100


OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.15},
    "z_loss": {"z_loss": 1e-2},
    "soft_cap": {"soft_cap": 3.0},
    "all": {"ignore_index": IGNORE, "label_smoothing": 0.3, "z_loss": 1e-3, "soft_cap": 5.0},
}


# auto: whole rows held (one token block); rows: whole rows, several padded token blocks;
# two_pass: recomputed vocabulary blocks with a ragged last block.
BLOCKS = {
    "auto": {},
    "rows": {"token_block": 8},
    "two_pass": {"token_block": 16, "vocab_block": 24},
}


def _inputs(dtype=jnp.float32, n=N, d=D, v=V, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    w = rng.standard_normal((d, v)) * 0.8
    b = rng.standard_normal(v) * 0.5
    labels = rng.integers(0, v, n)
    # Labels on every block boundary (first and last column of each block of 8 or 24, and
    # V - 1), where an off-by-one in a block's label lookup would show; then the ignored ones.
    edges = _block_edges(v)[: max(0, n - 5)]
    labels[4:4 + len(edges)] = edges
    labels[3] = labels[n - 1] = IGNORE
    return (*(jnp.asarray(a, dtype) for a in (x, w, b)), jnp.asarray(labels, jnp.int32))


def _cotangent(dtype=jnp.float32):
    return normal(9, N, dtype)


def _block_edges(v, blocks=(8, 24)):
    starts = {s for vb in blocks for s in range(0, v, vb)}
    return sorted({0, v - 1} | starts | {s - 1 for s in starts if s > 0})


def unfused(x, w, labels, b=None, *, reduction="mean", soft_cap=None, ignore_index=None,
            **kw):
    """The reference: materialised logits, the optional cap, then the core loss."""
    z = x @ w
    if b is not None:
        z = z + b
    if soft_cap is not None:
        z = soft_cap * jnp.tanh(z / soft_cap)
    per = sj.softmax_cross_entropy_with_integer_labels(z, labels, ignore_index=ignore_index, **kw)
    if reduction == "none":
        return per
    per = per.astype(jnp.promote_types(per.dtype, jnp.float32))
    if reduction == "sum":
        return per.sum()
    count = labels.shape[0] if ignore_index is None else jnp.sum(labels != ignore_index)
    return per.sum() / jnp.maximum(count, 1)


@functools.partial(jax.jit, static_argnames=("fused", "reduction", "opts", "blocks"))
def _value_and_grads(x, w, b, labels, cot, class_weights=None, *, fused, reduction, opts,
                     blocks=()):
    """Value and gradients for x, w, b of the fused loss (``fused``) or of the unfused
    reference; "none" is contracted with the cotangent ``cot``. ``opts`` and ``blocks`` are
    the keyword arguments as hashable tuples of items: one compiled program per
    configuration, shared by every test that uses it."""
    kw = dict(opts) | ({} if class_weights is None else {"class_weights": class_weights})

    def fn(x, w, b):
        if fused:
            return linear_softmax_cross_entropy(x, w, labels, b, reduction=reduction, **kw,
                                                **dict(blocks))
        return unfused(x, w, labels, b, reduction=reduction, **kw)

    def scalar(x, w, b):
        out = fn(x, w, b)
        return (jnp.sum(out.astype(jnp.float32) * cot), out) if reduction == "none" else (
            out, out)

    (_, out), grads = jax.value_and_grad(scalar, argnums=(0, 1, 2), has_aux=True)(x, w, b)
    return out, grads


def _items(kw):
    return tuple(sorted(kw.items()))


def _fused_and_unfused(x, w, b, labels, cot, reduction, opts, blocks):
    """The fused and the unfused ``(value, (dx, dw, db))``."""
    got = _value_and_grads(x, w, b, labels, cot, fused=True, reduction=reduction,
                           opts=_items(opts), blocks=_items(blocks))
    want = _value_and_grads(x, w, b, labels, cot, fused=False, reduction=reduction,
                            opts=_items(opts))
    return got, want


def _assert_close(got, want, rtol, atol):
    for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g64, w64 = np.asarray(g, np.float64), np.asarray(w_, np.float64)
        scale = max(1.0, float(np.max(np.abs(w64))))
        np.testing.assert_allclose(g64, w64, rtol=rtol, atol=atol * scale)


def _labels_for(opts, labels):
    # Without ignore_index, -100 would be an out-of-range label (NaN): use valid ones.
    return labels if "ignore_index" in opts else jnp.abs(labels) % V


def _check_against_unfused(reduction, opts, blocks):
    x, w, b, labels = _inputs()
    labels = _labels_for(opts, labels)
    got, want = _fused_and_unfused(x, w, b, labels, _cotangent(), reduction, opts, blocks)
    _assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_each_option_matches_unfused_float32(reduction, opts):
    """Every option alone (and all together, with ignore_index), on the two-pass path."""
    _check_against_unfused(reduction, opts, BLOCKS["two_pass"])


@pytest.mark.parametrize("blocks", BLOCKS.values(), ids=BLOCKS.keys())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_each_block_layout_matches_unfused_float32(reduction, blocks):
    """Held rows in one or several (padded) token blocks, and recomputed vocabulary blocks."""
    _check_against_unfused(reduction, OPTIONS["all"], blocks)


def _torch_reference(x, w, b, labels, cot, reduction, *, label_smoothing=0.0, z_loss=0.0,
                     soft_cap=None, ignore_index=None, class_weights=None):
    """PyTorch in float64: value and (dx, dw, db) of F.cross_entropy on x @ w + b with the
    cap, plus an explicit z_loss * lse**2 on the counted tokens."""
    t = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (x, w, b)]
    z = t[0] @ t[1] + t[2]
    if soft_cap is not None:
        z = soft_cap * torch.tanh(z / soft_cap)
    y = torch.tensor(np.asarray(labels, np.int64))
    ign = -100 if ignore_index is None else ignore_index
    cw = None if class_weights is None else torch.tensor(np.asarray(class_weights, np.float64))
    per = torch.nn.functional.cross_entropy(z, y, weight=cw, ignore_index=ign,
                                            label_smoothing=label_smoothing, reduction="none")
    kept = (y != ign).double()
    per = per + z_loss * torch.logsumexp(z, 1) ** 2 * kept
    if reduction == "none":
        out, scalar = per, (per * torch.tensor(np.asarray(cot, np.float64))).sum()
    else:
        den = kept.sum() if cw is None else (cw[y.clamp(min=0)] * kept).sum()
        out = scalar = per.sum() / den.clamp(min=1e-300)
    scalar.backward()
    return out.detach().numpy(), tuple(a.grad.numpy() for a in t)


@pytest.mark.parametrize("opts", [
    {"label_smoothing": 0.15}, {"z_loss": 1e-2}, {"soft_cap": 3.0},
    {"class_weights": np.linspace(0.3, 2.0, V)}, {"ignore_index": IGNORE},
    {"ignore_index": IGNORE, "label_smoothing": 0.3, "z_loss": 1e-3, "soft_cap": 5.0,
     "class_weights": np.linspace(2.0, 0.5, V)},
], ids=["smoothing", "z_loss", "soft_cap", "class_weights", "ignore_index", "all"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_each_option_matches_pytorch_float64(reduction, opts):
    """An oracle that shares no code with the fused rule (the core loss does): PyTorch's
    F.cross_entropy with weight/ignore_index/label_smoothing, the cap and the z-loss term
    written out, on two-pass vocabulary blocks."""
    x, w, b, labels = _inputs()
    labels = _labels_for(opts, labels)
    cot = _cotangent()
    cw = opts.get("class_weights")
    static = {k: v for k, v in opts.items() if k != "class_weights"}
    got = _value_and_grads(x, w, b, labels, cot, None if cw is None else jnp.asarray(cw),
                           fused=True, reduction=reduction, opts=_items(static),
                           blocks=_items(BLOCKS["two_pass"]))
    want = _torch_reference(x, w, b, labels, cot, reduction, **opts)
    _assert_close(got, want, rtol=1e-5, atol=1e-6)


@functools.partial(jax.jit, static_argnames=("reduction",))
def _fused_and_optax_without_bias(x, w, labels, *, reduction):
    """The fused loss and the mean's (dx, dw), then the same from optax."""
    got = linear_softmax_cross_entropy(x, w, labels, reduction=reduction)
    grads = jax.grad(lambda x, w: linear_softmax_cross_entropy(x, w, labels), (0, 1))(x, w)
    per = optax.softmax_cross_entropy_with_integer_labels(x @ w, labels)
    want = per.mean() if reduction == "mean" else per
    optax_grads = jax.grad(
        lambda x, w: optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean(),
        (0, 1))(x, w)
    return got, grads, want, optax_grads


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_without_bias_matches_optax(reduction):
    x, w, _, labels = _inputs()
    labels = jnp.abs(labels) % V
    got, (gx, gw), want, (ox, ow) = _fused_and_optax_without_bias(x, w, labels,
                                                                 reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    _assert_close((gx, gw), (ox, ow), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "reduction,blocks",
    [("mean", BLOCKS["auto"]), ("sum", BLOCKS["two_pass"]), ("none", BLOCKS["rows"])],
    ids=["mean-auto", "sum-two_pass", "none-rows"],
)
def test_matches_unfused_float64(x64, reduction, blocks):
    x, w, b, labels = (a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a
                       for a in _inputs())
    got, want = _fused_and_unfused(x, w, b, labels, _cotangent(jnp.float64), reduction,
                                   OPTIONS["all"], blocks)
    assert got[0].dtype == jnp.float64
    assert all(g.dtype == jnp.float64 for g in got[1])
    _assert_close(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
    "reduction,blocks",
    [("mean", BLOCKS["rows"]), ("none", BLOCKS["two_pass"])],
    ids=["mean-rows", "none-two_pass"],
)
def test_half_precision(reduction, blocks, dtype):
    """bf16/f16 inputs: math in f32, gradients in the input dtype, close to the f32 result
    on the same (rounded) inputs."""
    x, w, b, labels = _inputs(dtype)
    opts = _items(OPTIONS["all"])
    cot = _cotangent()
    got = _value_and_grads(x, w, b, labels, cot, fused=True, reduction=reduction, opts=opts,
                           blocks=_items(blocks))
    x32, w32, b32 = (a.astype(jnp.float32) for a in (x, w, b))
    want = _value_and_grads(x32, w32, b32, labels, cot, fused=False, reduction=reduction,
                            opts=opts)
    loss, grads = got
    assert loss.dtype == jnp.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    # Values: f32 inside and out (every reduction returns the compute dtype).
    _assert_close(loss, want[0], rtol=tol, atol=tol)
    # Gradients: accumulated in f32, then rounded once to the input dtype.
    _assert_close(grads, want[1], rtol=tol, atol=tol)


_jit_unfused = jax.jit(unfused, static_argnames=(
    "reduction", "soft_cap", "ignore_index", "label_smoothing", "z_loss"))


def test_half_precision_reduction_is_not_rounded_to_bf16():
    x, w, b, labels = _inputs(jnp.bfloat16)
    got = linear_softmax_cross_entropy(x, w, labels, b, ignore_index=IGNORE)
    want = _jit_unfused(*(a.astype(jnp.float32) for a in (x, w)), labels,
                        b.astype(jnp.float32), ignore_index=IGNORE)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_mixed_input_dtypes_keep_each_gradient_dtype():
    x, w, b, labels = _inputs()
    x = x.astype(jnp.bfloat16)
    grads = jax.jit(jax.grad(
        lambda x, w, b: linear_softmax_cross_entropy(x, w, labels, b, ignore_index=IGNORE),
        argnums=(0, 1, 2)))(x, w, b)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.float32]


@jax.jit
def _reductions_and_dx(x, w, b, labels):
    """The per-token, mean and summed losses with ignore_index, and the mean's dx."""
    def loss(x, reduction):
        return linear_softmax_cross_entropy(x, w, labels, b, reduction=reduction,
                                            ignore_index=IGNORE)

    mean, dx = jax.value_and_grad(loss)(x, "mean")
    return loss(x, "none"), mean, loss(x, "sum"), dx


def test_ignored_tokens_have_zero_loss_and_no_gradient():
    x, w, b, labels = _inputs()
    per, a, _, gx = _reductions_and_dx(x, w, b, labels)
    assert per[3] == 0 and per[N - 1] == 0
    # Changing an ignored token's input changes nothing, and its dx row is 0.
    np.testing.assert_array_equal(gx[3], 0.0)
    x2 = x.at[3].set(1e3)
    c = _reductions_and_dx(x2, w, b, labels)[1]
    assert a == c


def test_mean_divides_by_the_number_of_counted_tokens():
    x, w, b, labels = _inputs()
    per, mean, total, _ = _reductions_and_dx(x, w, b, labels)
    np.testing.assert_allclose(mean, per.sum() / (N - 2), rtol=1e-6)
    np.testing.assert_allclose(total, per.sum(), rtol=1e-6)


def test_all_ignored_mean_is_zero_with_zero_gradients():
    x, w, b, _ = _inputs()
    labels = jnp.full((N,), IGNORE)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda x, w, b: linear_softmax_cross_entropy(x, w, labels, b, ignore_index=IGNORE),
        argnums=(0, 1, 2)))(x, w, b)
    assert loss == 0.0
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


@functools.partial(jax.jit, static_argnames=("blocks",))
def _per_mean_and_dx_of_the_sum(x, w, b, labels, *, blocks):
    def loss(x, reduction):
        return linear_softmax_cross_entropy(x, w, labels, b, reduction=reduction,
                                            ignore_index=IGNORE, **dict(blocks))

    return (loss(x, "none"), loss(x, "mean"),
            jax.grad(lambda x: loss(x, "none").sum())(x))


@pytest.mark.parametrize(
    "bad,blocks", [(V, BLOCKS["auto"]), (-1, BLOCKS["rows"]), (10**6, BLOCKS["two_pass"])]
)
def test_out_of_range_label_gives_nan(bad, blocks):
    x, w, b, labels = _inputs()
    labels = labels.at[5].set(bad)
    per, mean, gx = _per_mean_and_dx_of_the_sum(x, w, b, labels, blocks=_items(blocks))
    assert np.isnan(per[5])
    assert np.isfinite(np.delete(np.asarray(per), 5)).all()
    assert np.isnan(mean)
    assert np.isnan(gx[5]).all() and np.isfinite(np.delete(np.asarray(gx), 5, axis=0)).all()


def test_large_logits_stay_finite():
    x, w, b, labels = _inputs()
    x = 300.0 * x  # logits in the thousands: exp would overflow without the max shift
    labels = jnp.abs(labels) % V
    loss, grads = jax.jit(jax.value_and_grad(
        lambda x, w, b: linear_softmax_cross_entropy(x, w, labels, b, token_block=8,
                                                     vocab_block=24), argnums=(0, 1, 2)))(x, w, b)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads)
    want = _jit_unfused(x, w, labels, b)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_traced_hyperparameters_under_jit():
    x, w, b, labels = _inputs()

    @jax.jit
    def f(eps, lam, cap):
        return linear_softmax_cross_entropy(x, w, labels, b, ignore_index=IGNORE,
                                            label_smoothing=eps, z_loss=lam, soft_cap=cap)

    got = f(0.3, 1e-3, 5.0)
    want = _jit_unfused(x, w, labels, b, **OPTIONS["all"])
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_compiled_gradient_holds_no_n_by_v_buffer():
    n, d, v = 1024, 32, 8192
    x, w, _, labels = _inputs(n=n, d=d, v=v)
    labels = jnp.abs(labels) % v
    fused = jax.value_and_grad(
        lambda x, w: linear_softmax_cross_entropy(x, w, labels, token_block=64), (0, 1))
    plain = jax.value_and_grad(lambda x, w: unfused(x, w, labels), (0, 1))
    temp = {
        name: jax.jit(f).lower(x, w).compile().memory_analysis().temp_size_in_bytes
        for name, f in [("fused", fused), ("plain", plain)]
    }
    logits_bytes = n * v * 4
    assert temp["plain"] >= logits_bytes
    assert temp["fused"] < logits_bytes / 4, temp


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_saved_residuals_are_small(reduction):
    """Reverse mode keeps no N x V array: "mean" keeps the three gradients, "none" the inputs
    and two numbers per token."""
    x, w, b, labels = _inputs()
    res = saved_residuals(
        lambda x, w, b: linear_softmax_cross_entropy(
            x, w, labels, b, reduction=reduction, ignore_index=IGNORE).sum(),
        x, w, b)
    for shape, _ in res:
        assert int(np.prod(shape)) <= max(D * V, N * D), res
        assert shape not in ((N, V), (V, N)), res


def _call(**overrides):
    x, w, b, labels = _inputs()
    args = {"x": x, "w": w, "labels": labels, "b": b} | overrides
    return linear_softmax_cross_entropy(
        args.pop("x"), args.pop("w"), args.pop("labels"), args.pop("b"), **args)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"x": jnp.ones((N,))}, ValueError, r"x must be a 2-D \[N, D\].*\(37,\)"),
        ({"x": jnp.ones((N, D), jnp.int32)}, TypeError, "x must be a floating-point"),
        ({"w": jnp.ones((V, D))}, ValueError, r"w must be \[D, V\] with D = x.shape\[-1\] = 12"),
        ({"w": jnp.ones((D,))}, ValueError, r"w must be a 2-D \[D, V\]"),
        ({"labels": jnp.ones((N,))}, TypeError, "labels must be an integer array"),
        ({"labels": jnp.ones((N, 1), jnp.int32)}, ValueError, r"labels.shape must have x's"),
        ({"labels": jnp.ones((N + 1,), jnp.int32)}, ValueError, r"labels.shape=\(38,\)"),
        ({"b": jnp.ones((V + 1,))}, ValueError, r"b must be a 1-D \[V\].*\(102,\)"),
        ({"b": jnp.ones((V,), jnp.int32)}, TypeError, "b must be a floating-point"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must lie in \[0, 1\]"),
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        ({"z_loss": -1.0}, ValueError, "z_loss"),
        ({"soft_cap": 0.0}, ValueError, "soft_cap must be > 0"),
        ({"soft_cap": -2.0}, ValueError, "soft_cap must be > 0"),
        ({"token_block": 0}, ValueError, "token_block must be a positive int"),
        ({"vocab_block": 2.5}, ValueError, "vocab_block must be a positive int"),
        ({"ignore_index": 1.0}, TypeError, "ignore_index must be an int"),
        ({"axis_name": "vocab"}, ValueError, "axis_name='vocab'.*shard_map"),
        ({"x": jnp.ones((0, D))}, ValueError, "at least one token"),
    ],
)
def test_bad_arguments_raise_at_call_time(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_integer_label_dtypes_are_accepted():
    x, w, b, labels = _inputs()
    small = (jnp.abs(labels) % V) % 100  # 0..99, in every dtype's range
    per, dw = jax.jit(lambda w: (
        optax.softmax_cross_entropy_with_integer_labels(x @ w + b, small),
        jax.grad(lambda w: optax.softmax_cross_entropy_with_integer_labels(
            x @ w + b, small).mean())(w)))(w)

    @jax.jit
    def fused(w, labels):  # compiled once per label dtype
        def loss(w, reduction):
            return linear_softmax_cross_entropy(x, w, labels, b, reduction=reduction,
                                                **BLOCKS["two_pass"])

        return loss(w, "none"), jax.grad(loss)(w, "mean")

    for dt in (jnp.int8, jnp.uint8, jnp.int16, jnp.uint32):
        got, g = fused(w, small.astype(dt))
        np.testing.assert_allclose(got, per, rtol=1e-5, atol=1e-6)
        _assert_close(g, dw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reverse_over_reverse_agrees_with_unfused(reduction):
    x, w, b, labels = _inputs(n=6, d=4, v=7)
    labels = jnp.abs(labels) % 7

    def grad_norm(loss):
        return lambda x: jnp.sum(jax.grad(lambda x: loss(x).sum())(x) ** 2)

    got = jax.jit(jax.grad(grad_norm(
        lambda x: linear_softmax_cross_entropy(x, w, labels, b, reduction=reduction))))(x)
    want = jax.jit(jax.grad(grad_norm(
        lambda x: unfused(x, w, labels, b, reduction=reduction))))(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_hessian_agrees_with_unfused():
    x, w, b, labels = _inputs(n=5, d=3, v=7)
    labels = jnp.abs(labels) % 7
    got = jax.jit(jax.hessian(lambda x: linear_softmax_cross_entropy(x, w, labels, b)))(x)
    want = jax.jit(jax.hessian(lambda x: unfused(x, w, labels, b)))(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_forward_mode_raises():
    x, w, b, labels = _inputs(n=6, d=4, v=7)
    labels = jnp.abs(labels) % 7
    with pytest.raises(TypeError):
        jax.jvp(lambda x: linear_softmax_cross_entropy(x, w, labels, b), (x,), (x,))


def test_axis_name_outside_shard_map_is_refused():
    x, w, labels = jnp.ones((4, 3)), jnp.ones((3, 5)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="axis_name='vocab'.*does not vary"):
        linear_softmax_cross_entropy(x, w, labels, axis_name="vocab")
    with pytest.raises(ValueError, match="does not vary"):
        jax.jit(lambda x, w: linear_softmax_cross_entropy(x, w, labels, axis_name="v"))(x, w)
