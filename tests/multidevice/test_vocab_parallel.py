"""The vocabulary-parallel (``jax.shard_map`` with ``axis_name``) and batch-sharded
(``jax.jit`` with ``NamedSharding``) fused losses on 8 simulated devices, against the same
call on one device: values and gradients of ``x``, ``w``, ``b`` (and the temperature)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import normal, uniform
from _rounding import gradient_rounding_ratios
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from softmax_jax import reference
from softmax_jax.fused import linear_softmax_cross_entropy, linear_softmax_distillation

N, D, V = 32, 8, 64  # V divisible by 8 shards, N by 2 data shards
IGNORE = -100


def _over_data(out, labels, ct, reduction, data_axis):
    """One device's loss made the global one: ``"none"`` weighted by the cotangents ``ct``
    and summed, then summed over the data shards; ``"mean"`` is over the local tokens, so it
    is combined with the local counts into the global mean."""
    if reduction == "none":
        out = jnp.sum(out * ct)
    if data_axis is None:
        return out
    if reduction == "mean":
        count = jnp.sum(labels != IGNORE).astype(out.dtype)
        return jax.lax.psum(out * count, data_axis) / jax.lax.psum(count, data_axis)
    return jax.lax.psum(out, data_axis)


def _inputs(dtype=jnp.float32):
    labels = np.random.default_rng(45).integers(0, V, N)
    labels[[3, 17]] = IGNORE
    return (normal(42, (N, D), dtype), normal(43, (D, V), dtype, 0.7),
            normal(44, (V,), dtype, 0.3), jnp.asarray(labels, jnp.int32))


def _max_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b))))
    return float(np.max(np.abs(a - b))) / scale


def _report(name: str, got, want) -> float:
    """The largest relative error over the leaves of ``got`` against ``want``."""
    errs = [_max_err(g, w) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                                             strict=True)]
    return max(errs)


OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.2},
    "all": {"label_smoothing": 0.1, "z_loss": 1e-2, "soft_cap": 4.0},
}


def _check_vocab_parallel(mesh: Mesh, data_axis: str | None, options: dict, reduction: str,
                         blocks: dict) -> None:
    """shard_map over (data x) vocab against the unsharded call: value and d/dx, dw, db."""
    x, w, b, labels = _inputs()
    kw = dict(options, ignore_index=IGNORE)
    ct = normal(7, (N,))

    def unsharded(x, w, b):
        out = linear_softmax_cross_entropy(x, w, labels, b, reduction=reduction, **kw)
        return jnp.sum(out * ct) if reduction == "none" else out

    def local(x, w, b, labels, ct):
        out = linear_softmax_cross_entropy(
            x, w, labels, b, reduction=reduction, axis_name="vocab", **kw, **blocks
        )
        return _over_data(out, labels, ct, reduction, data_axis)

    tok = P(data_axis) if data_axis else P()
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(data_axis, None), P(None, "vocab"), P("vocab"), tok, tok),
        out_specs=P(),
    )

    def sharded_fn(x, w, b):
        return sharded(x, w, b, labels, ct)

    want = jax.value_and_grad(unsharded, argnums=(0, 1, 2))(x, w, b)
    got = jax.jit(jax.value_and_grad(sharded_fn, argnums=(0, 1, 2)))(x, w, b)
    opts = "+".join(options) or "plain"
    name = f"vocab_parallel mesh={dict(mesh.shape)} {reduction} {opts} {blocks}"
    err = _report(name, got, want)
    assert err < 1e-5, (name, err)


def _check_per_token_values(mesh: Mesh) -> None:
    """reduction='none' output sharded over data: per-token values equal the unsharded."""
    x, w, b, labels = _inputs()
    want = linear_softmax_cross_entropy(x, w, labels, b, reduction="none", ignore_index=IGNORE,
                                        label_smoothing=0.3)
    f = jax.shard_map(
        lambda x, w, b, y: linear_softmax_cross_entropy(
            x, w, y, b, reduction="none", ignore_index=IGNORE, label_smoothing=0.3,
            axis_name="vocab"),
        mesh=mesh,
        in_specs=(P("data", None), P(None, "vocab"), P("vocab"), P("data")),
        out_specs=P("data"),
    )
    got = jax.jit(f)(x, w, b, labels)
    err = _report("per-token values, data x vocab", got, want)
    assert err < 1e-5, err


def _check_out_of_range_label(mesh: Mesh) -> None:
    """A label >= global V is NaN even though it is < V on no shard and >= V_local on all."""
    x, w, b, labels = _inputs()
    labels = labels.at[5].set(V)  # out of range globally
    f = jax.shard_map(
        lambda x, w, b, y: linear_softmax_cross_entropy(
            x, w, y, b, reduction="none", ignore_index=IGNORE, axis_name="vocab"),
        mesh=mesh,
        in_specs=(P(), P(None, "vocab"), P("vocab"), P()),
        out_specs=P(),
    )
    got = np.asarray(jax.jit(f)(x, w, b, labels))
    assert np.isnan(got[5]) and np.isfinite(np.delete(got, 5)).all(), got


def _check_batch_sharded_jit(mesh: Mesh) -> None:
    """Plain jit with batch-sharded NamedSharding inputs: XLA's partitioner does the work."""
    x, w, b, labels = _inputs()
    kw = {"ignore_index": IGNORE, "label_smoothing": 0.1, "token_block": 8}

    def loss(x, w, b, y):
        return linear_softmax_cross_entropy(x, w, y, b, **kw)

    want = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, b, labels)
    rows = NamedSharding(mesh, P(mesh.axis_names))
    rep = NamedSharding(mesh, P())
    xs, ys = jax.device_put(x, rows), jax.device_put(labels, rows)
    ws, bs = jax.device_put(w, rep), jax.device_put(b, rep)
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(xs, ws, bs, ys)
    got = compiled.compile()(xs, ws, bs, ys)
    err = _report("jit, batch-sharded NamedSharding over 8 devices", got, want)
    assert err < 1e-5, err
    assert got[1][0].sharding.is_equivalent_to(rows, 2), got[1][0].sharding


def _check_bf16(mesh: Mesh) -> None:
    """bf16 inputs under shard_map against float32 unsharded on the same rounded inputs.

    The f32 loss agrees to float32 rounding. Each gradient is a product of the logit
    gradient dz, rounded to bf16 (as the fused rule does for narrow weights), with bf16
    operands, accumulated in f32 and rounded once more (``_rounding.py``).
    """
    x, w, b, labels = _inputs()
    xb, wb, bb = (a.astype(jnp.bfloat16) for a in (x, w, b))
    xr, wr, br = (a.astype(jnp.float32) for a in (xb, wb, bb))
    want = jax.value_and_grad(
        lambda x, w, b: linear_softmax_cross_entropy(x, w, labels, b, ignore_index=IGNORE),
        argnums=(0, 1, 2),
    )(xr, wr, br)
    f = jax.shard_map(
        lambda x, w, b, y: linear_softmax_cross_entropy(
            x, w, y, b, ignore_index=IGNORE, axis_name="vocab"),
        mesh=mesh,
        in_specs=(P(), P(None, "vocab"), P("vocab"), P()),
        out_specs=P(),
    )
    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(xb, wb, bb, labels)
    assert got[0].dtype == jnp.float32, got[0].dtype
    assert all(g.dtype == jnp.bfloat16 for g in got[1]), [g.dtype for g in got[1]]
    loss_err = abs(float(got[0]) - float(want[0])) / abs(float(want[0]))
    assert loss_err < 8 * float(jnp.finfo(jnp.float32).eps), loss_err
    # dz of the mean loss from the plain formula, in float64
    z = np.asarray(xr, np.float64) @ np.asarray(wr, np.float64) + np.asarray(br, np.float64)
    a = reference.np_softmax(z)
    kept = np.asarray(labels) != IGNORE
    dz = np.where(kept[:, None], a - np.eye(V)[np.where(kept, labels, 0)], 0.0) / kept.sum()
    ratios = gradient_rounding_ratios(got[1], want[1], dz, xr, wr,
                                      float(jnp.finfo(jnp.bfloat16).eps))
    assert max(ratios) <= 1.0, ratios


def _check_argmax_ties(mesh: Mesh, blocks: dict) -> None:
    """return_stats' argmax takes the first of equal maxima across shards, as jnp.argmax."""
    ties = np.zeros((6, V), np.float32)
    ties[1, [5, 13, 61]] = 1.0  # shards 0, 1 and 7
    ties[2, [8, 16]] = 1.0  # the starts of shards 1 and 2
    ties[3, [15, 40]] = 1.0  # the end of shard 1 and shard 5
    ties[4, V - 1] = 1.0  # the last class alone
    ties[5, [0, 1]] = -1.0  # maximum 0 from class 2 on, in every shard
    x = jnp.eye(6, dtype=jnp.float32)
    w = jnp.asarray(ties)
    labels = jnp.zeros((6,), jnp.int32)
    f = jax.shard_map(
        lambda x, w, y: linear_softmax_cross_entropy(
            x, w, y, axis_name="vocab", return_stats=True, **blocks)[1].argmax,
        mesh=mesh, in_specs=(P(), P(None, "vocab"), P()), out_specs=P())
    got = np.asarray(jax.jit(f)(x, w, labels))
    want = np.asarray(jnp.argmax(x @ w, axis=1))
    assert want.tolist() == [0, 5, 8, 15, V - 1, 2], want
    assert got.tolist() == want.tolist(), (blocks, got, want)


def _check_unchecked_shard_map_is_refused(mesh: Mesh) -> None:
    """Without check_vma the varying axes are unknown, so cotangents could not be summed
    correctly: the call refuses rather than return wrong gradients."""
    x, w, b, labels = _inputs()
    f = jax.shard_map(
        lambda x, w, y: linear_softmax_cross_entropy(x, w, y, axis_name="vocab"),
        mesh=mesh,
        in_specs=(P(), P(None, "vocab"), P()),
        out_specs=P(),
        check_vma=False,
    )
    try:
        jax.jit(f)(x, w, labels)
    except ValueError as e:
        assert "check_vma" in str(e), e
    else:
        raise AssertionError("check_vma=False was accepted")


def _teacher():
    return normal(3, (N, D + 3)), normal(4, (D + 3, V), scale=0.6), normal(5, (V,), scale=0.2)


def _check_distillation(mesh: Mesh, data_axis: str | None, beta: float, hard_weight: float,
                       reduction: str, blocks: dict) -> None:
    """Vocab-parallel distillation (w, b, teacher_w, teacher_b sharded along V) against the
    unsharded call: value and d/dx, dw, db, d/dtemperature."""
    x, w, b, labels = _inputs()
    tx, tw, tb = _teacher()
    ct = normal(8, (N,))
    kw = {"beta": beta, "hard_weight": hard_weight, "ignore_index": IGNORE,
          "label_smoothing": 0.1, "reduction": reduction}

    def unsharded(x, w, b, temp):
        out = linear_softmax_distillation(x, w, tx, tw, labels=labels, b=b, teacher_b=tb,
                                          temperature=temp, **kw)
        return jnp.sum(out * ct) if reduction == "none" else out

    def local(x, w, b, temp, tx, tw, tb, labels, ct):
        out = linear_softmax_distillation(x, w, tx, tw, labels=labels, b=b, teacher_b=tb,
                                          temperature=temp, axis_name="vocab", **kw, **blocks)
        return _over_data(out, labels, ct, reduction, data_axis)

    tok = P(data_axis) if data_axis else P()
    rows = P(data_axis, None)
    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(rows, P(None, "vocab"), P("vocab"), P(), rows, P(None, "vocab"), P("vocab"),
                  tok, tok),
        out_specs=P())
    want = jax.value_and_grad(unsharded, argnums=(0, 1, 2, 3))(x, w, b, 1.5)
    got = jax.jit(jax.value_and_grad(
        lambda x, w, b, t: sharded(x, w, b, t, tx, tw, tb, labels, ct), argnums=(0, 1, 2, 3)))(
        x, w, b, 1.5)
    name = (f"distill_parallel mesh={dict(mesh.shape)} beta={beta} hard={hard_weight}"
            f" {reduction} {blocks}")
    err = _report(name, got, want)
    assert err < 1e-5, (name, err)


def _check_class_weights(mesh: Mesh, reduction: str, blocks: dict) -> None:
    """Class weights sharded along V with w: PyTorch's weighted mean over the global
    vocabulary's weights."""
    x, w, b, labels = _inputs()
    cw = uniform(5, (V,), 0.2, 2.0)
    kw = {"ignore_index": IGNORE, "label_smoothing": 0.2, "reduction": reduction}
    ct = normal(9, (N,))

    def unsharded(x, w, b):
        out = linear_softmax_cross_entropy(x, w, labels, b, class_weights=cw, **kw)
        return jnp.sum(out * ct) if reduction == "none" else out

    def local(x, w, b, cw, labels, ct):
        out = linear_softmax_cross_entropy(x, w, labels, b, class_weights=cw, axis_name="vocab",
                                           **kw, **blocks)
        return jnp.sum(out * ct) if reduction == "none" else out

    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(), P(None, "vocab"), P("vocab"), P("vocab"), P(), P()), out_specs=P())
    want = jax.value_and_grad(unsharded, argnums=(0, 1, 2))(x, w, b)
    got = jax.jit(jax.value_and_grad(
        lambda x, w, b: sharded(x, w, b, cw, labels, ct), argnums=(0, 1, 2)))(x, w, b)
    err = _report(f"class_weights_parallel {reduction} {blocks}", got, want)
    assert err < 1e-5, err


def _check_negative_infinite_last_shard(mesh: Mesh) -> None:
    """The last shard's bias all -inf (padded vocabulary): finite, equal to the unsharded."""
    x, w, b, labels = _inputs()
    b = b.at[V - V // 8:].set(-jnp.inf)
    labels = jnp.where(labels >= V - V // 8, 0, labels)

    def loss(x, w, b, labels, axis_name=None):
        return linear_softmax_cross_entropy(x, w, labels, b, ignore_index=IGNORE,
                                            label_smoothing=0.0, axis_name=axis_name)

    want = jax.value_and_grad(loss, argnums=(0, 1))(x, w, b, labels)
    sharded = jax.shard_map(
        lambda x, w, b, y: loss(x, w, b, y, "vocab"), mesh=mesh,
        in_specs=(P(), P(None, "vocab"), P("vocab"), P()), out_specs=P())
    got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(x, w, b, labels)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(got)), got
    err = _report("-inf last shard is finite", got, want)
    assert err < 1e-5, err


def _check_plus_infinite_logit_in_one_shard(mesh: Mesh) -> None:
    """Token 5's logit of class 20 (shard 2) overflows to +inf in the product: its loss is
    NaN, as in the unfused loss, on every shard's merge; the other tokens as unsharded."""
    x, w, b, labels = _inputs()
    x = x.at[:, 0].set(0.0).at[5, 0].set(10.0)
    w = w.at[0, 20].set(1e38)

    def loss(x, w, b, axis_name=None):
        return linear_softmax_cross_entropy(x, w, labels, b, ignore_index=IGNORE,
                                            reduction="none", axis_name=axis_name)

    want = loss(x, w, b)
    sharded = jax.shard_map(lambda x, w, b: loss(x, w, b, "vocab"), mesh=mesh,
                            in_specs=(P(), P(None, "vocab"), P("vocab")), out_specs=P())
    got = np.asarray(jax.jit(sharded)(x, w, b))
    assert np.isnan(got[5]) and np.isnan(want[5]), (got[5], want[5])
    rest = np.arange(N) != 5
    assert np.isfinite(got[rest]).all(), got
    err = _report("+inf logit in one shard is nan", got[rest], np.asarray(want)[rest])
    assert err < 1e-6, err


def _check_sharded_w_without_axis_name_is_refused(mesh: Mesh) -> None:
    """w sharded along V but no axis_name: normalising over the local slice would be wrong
    (1.386 against 2.079 here), so the call raises and names axis_name."""
    x, w, b, labels = _inputs()
    f = jax.shard_map(
        lambda x, w, y: linear_softmax_cross_entropy(x, w, y, ignore_index=IGNORE),
        mesh=mesh, in_specs=(P(), P(None, "vocab"), P()), out_specs=P())
    try:
        jax.jit(f)(x, w, labels)
    except ValueError as e:
        assert "axis_name='vocab'" in str(e), e
    else:
        raise AssertionError("a vocabulary-sharded w without axis_name was accepted")




@functools.cache
def _mesh(name: str) -> Mesh:
    """``vocab``: the 8 devices along the vocabulary; ``grid``: 2 data x 4 vocabulary shards;
    ``batch``: the 8 devices along the batch."""
    devices = np.array(jax.devices())
    if name == "grid":
        return Mesh(devices.reshape(2, 4), ("data", "vocab"))
    return Mesh(devices, (name,))


SMALL = {"token_block": 8, "vocab_block": 4}
# 3 reductions x 3 option sets x 2 meshes, then several token blocks and two-pass vocabulary
# blocks on each shard.
VOCAB_PARALLEL = [
    *((mesh, reduction, opts, {}) for reduction in ("mean", "sum", "none")
      for opts in OPTIONS for mesh in ("vocab", "grid")),
    *((mesh, reduction, opts, SMALL) for reduction in ("mean", "none")
      for mesh, opts in (("grid", "all"), ("vocab", "smoothing"))),
]


@pytest.mark.parametrize(
    "mesh,reduction,options,blocks", VOCAB_PARALLEL,
    ids=[f"{m}-{r}-{o}{'-small_blocks' if b else ''}" for m, r, o, b in VOCAB_PARALLEL])
def test_vocab_parallel_matches_unsharded(mesh, reduction, options, blocks):
    # "smoothing" and "all" check that label smoothing is over the global vocabulary (a
    # division by the local vocabulary would differ).
    _check_vocab_parallel(_mesh(mesh), "data" if mesh == "grid" else None, OPTIONS[options],
                          reduction, blocks)


def test_per_token_values_sharded_over_data_and_vocabulary():
    _check_per_token_values(_mesh("grid"))


def test_out_of_range_label_is_nan_on_every_shard():
    _check_out_of_range_label(_mesh("vocab"))


@pytest.mark.parametrize("mesh", ["batch", "grid"])
def test_batch_sharded_jit_matches_unsharded(mesh):
    _check_batch_sharded_jit(_mesh(mesh))


def test_bf16_vocab_parallel_within_its_rounding_bound():
    _check_bf16(_mesh("vocab"))


@pytest.mark.parametrize("blocks", [{}, {"vocab_block": 4, "token_block": 4}],
                         ids=["one_block_per_shard", "several_blocks_per_shard"])
def test_argmax_ties_take_the_first_index_across_shards(blocks):
    _check_argmax_ties(_mesh("vocab"), blocks)


def test_unchecked_shard_map_is_refused():
    _check_unchecked_shard_map_is_refused(_mesh("vocab"))


DISTILLATION = [("vocab", 0.0, 0.0, "mean", {}), ("vocab", 0.5, 0.3, "mean", {}),
                ("vocab", 1.0, 0.0, "mean", {}), ("grid", 0.5, 0.3, "none", SMALL),
                ("grid", 0.0, 0.5, "sum", {})]


@pytest.mark.parametrize(
    "mesh,beta,hard_weight,reduction,blocks", DISTILLATION,
    ids=[f"{m}-beta{b}-hard{h}-{r}{'-small_blocks' if k else ''}"
         for m, b, h, r, k in DISTILLATION])
def test_distillation_vocab_parallel_matches_unsharded(mesh, beta, hard_weight, reduction,
                                                       blocks):
    _check_distillation(_mesh(mesh), "data" if mesh == "grid" else None, beta, hard_weight,
                        reduction, blocks)


@pytest.mark.parametrize("reduction,blocks", [("mean", {}), ("none", {}), ("mean", SMALL)],
                         ids=["mean", "none", "mean-small_blocks"])
def test_class_weights_vocab_parallel_match_unsharded(reduction, blocks):
    _check_class_weights(_mesh("vocab"), reduction, blocks)


def test_negative_infinite_last_shard_is_finite_and_matches_unsharded():
    _check_negative_infinite_last_shard(_mesh("vocab"))


def test_plus_infinite_logit_in_one_shard_is_nan():
    _check_plus_infinite_logit_in_one_shard(_mesh("vocab"))


def test_sharded_w_without_axis_name_is_refused():
    _check_sharded_w_without_axis_name_is_refused(_mesh("vocab"))


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_kl_of_far_apart_shards_merges_exactly(beta):
    """Four vocabulary shards whose logits sit near 1000, 990, 1003 and 996: each shard has
    its own maxima, and the merge must shift their sums exactly."""
    rng = np.random.default_rng(0)
    n, d, v = 16, 8, 400
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    b = jnp.asarray(np.repeat([1000.0, 990.0, 1003.0, 996.0], v // 4)
                    + rng.normal(size=v) * 1e-2, jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:4]), ("vocab",))

    def f(x, w, b, tw):
        return linear_softmax_distillation(x, w, x, tw, b=b, beta=beta, reduction="none",
                                           axis_name="vocab", vocab_block=40)

    g = jax.shard_map(f, mesh=mesh, in_specs=(P(), P(None, "vocab"), P("vocab"),
                                              P(None, "vocab")), out_specs=P())
    got = np.asarray(jax.jit(g)(x, w, b, w))
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    want = reference.np_distillation(f64(x) @ f64(w) + f64(b), f64(x) @ f64(w), 1.0, beta)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)
