"""Issue 15, core library: the probe's wrong numbers and optax drop-in gaps, each checked
against an independent reference (float64 plain formulas, optax, PyTorch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import softmax_jax as sj
from softmax_jax import reference

# --------------------------------------------------------------------------------------------
# 1. distillation: a -inf on one side against a probability that underflows on the other
# --------------------------------------------------------------------------------------------

S_MASKED = np.array([[0.5, 1.0, 2.0, -np.inf], [0.1, -0.4, 0.3, 1.1]])
T_TINY = np.array([[0.3, 1.2, 1.8, -1e9], [-0.2, 0.5, -1e9, 0.7]])


def _plain_kl(log_a, log_b):
    """float64 :math:`\\sum a (\\log a - \\log b)` with 0 log 0 = 0 (double where)."""
    pos = jnp.exp(log_a) > 0
    inner = jnp.where(pos, log_a, 0.0) - jnp.where(pos, log_b, 0.0)
    return jnp.sum(jnp.where(pos, jnp.exp(log_a) * inner, 0.0), axis=-1)


def _plain_log_softmax(x, temperature):
    """float64 log-softmax of ``x / T`` with a -inf logit left at -inf (and out of the
    temperature's derivative, which -inf / T would make NaN)."""
    fin = jnp.isfinite(x)
    log_a = jax.nn.log_softmax(jnp.where(fin, x, 0.0) / temperature, where=fin)
    return jnp.where(fin, log_a, -jnp.inf)


def _plain_distillation(s, t, temperature, beta, kind):
    log_q = _plain_log_softmax(s, temperature)
    log_p = _plain_log_softmax(t, temperature)
    if kind == "forward":
        d = _plain_kl(log_p, log_q)
    elif kind == "reverse":
        d = _plain_kl(log_q, log_p)
    else:
        log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
        d = beta * _plain_kl(log_p, log_m) + (1 - beta) * _plain_kl(log_q, log_m)
    return temperature**2 * d


@pytest.mark.parametrize("kind,beta", [("forward", 0.0), ("reverse", 1.0), ("jsd", 0.3)])
@pytest.mark.parametrize("swap", [False, True])
def test_distillation_minus_inf_against_an_underflowing_probability(x64, kind, beta, swap):
    s, t = (T_TINY, S_MASKED) if swap else (S_MASKED, T_TINY)
    temperature = 1.7

    def ours(s, t, temp, b):
        return sj.distillation_loss(s, t, temperature=temp, beta=b if kind == "jsd" else beta)

    def plain(s, t, temp, b):
        return _plain_distillation(s, t, temp, b, kind)

    args32 = (jnp.float32(temperature), jnp.float32(beta))
    s32, t32 = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    got = sj.distillation_loss(s32, t32, temperature=temperature, beta=beta)
    want = plain(jnp.asarray(s), jnp.asarray(t), temperature, beta)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    argnums = (0, 1, 2, 3) if kind == "jsd" else (0, 1, 2)
    g_got = jax.grad(lambda *a: ours(*a).sum(), argnums)(s32, t32, *args32)
    g_want = jax.grad(lambda *a: plain(*a).sum(), argnums)(
        jnp.asarray(s), jnp.asarray(t), jnp.float64(temperature), jnp.float64(beta))
    for a, b in zip(g_got, g_want, strict=True):
        assert np.isfinite(b).all()
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_distillation_issue_reproducer_matches_the_kl_divergence():
    s = jnp.array([[0.5, 1.0, 2.0, -jnp.inf]])
    t = jnp.array([[0.3, 1.2, 1.8, -150.0]])  # exp underflows in float32
    want = sj.kl_divergence(sj.log_softmax(s), sj.softmax(t))
    np.testing.assert_allclose(sj.distillation_loss(s, t), want, rtol=1e-6)
    np.testing.assert_allclose(sj.distillation_loss(s, t), 0.01618, rtol=1e-3)
    assert np.isfinite(sj.distillation_loss(t, s, beta=1.0)).all()


def test_kl_with_log_targets_underflowing_target_against_minus_inf():
    log_a = jnp.array([[-0.1, -2.5, -jnp.inf]])
    log_y = jnp.array([[-0.05, -3.0, -1e9]])  # exp(-1e9) == 0: adds 0, like a -inf target
    want = optax.losses.kl_divergence_with_log_targets(log_a[:, :2], log_y[:, :2])
    np.testing.assert_allclose(sj.kl_divergence_with_log_targets(log_a, log_y), want,
                               rtol=1e-6)
    g_a, g_y = jax.grad(lambda a, y: sj.kl_divergence_with_log_targets(a, y).sum(),
                        (0, 1))(log_a, log_y)
    assert np.isfinite(g_a).all() and np.isfinite(g_y).all()
    assert g_a[0, 2] == 0.0 and g_y[0, 2] == 0.0


# --------------------------------------------------------------------------------------------
# 3. unsigned labels never wrap onto a valid class or onto ignore_index
# --------------------------------------------------------------------------------------------


def test_uint64_labels_under_x64_are_invalid_not_wrapped(x64):
    z = jnp.zeros((3, 4), jnp.float32)
    labels = np.array([2**32 + 1, 1, 2**64 - 100], np.uint64)
    with pytest.raises(ValueError, match="outside the range of the uint64 labels"):
        sj.softmax_cross_entropy_with_integer_labels(z, labels, ignore_index=-100)
    got = sj.softmax_cross_entropy_with_integer_labels(z, labels)
    assert np.isnan(got[0]) and np.isnan(got[2])
    np.testing.assert_allclose(got[1], np.log(4.0), rtol=1e-6)
    got = sj.softmax_cross_entropy_with_integer_labels(z, jnp.asarray(labels))
    assert np.isnan(got[0]) and np.isnan(got[2])
    # the fused loss reads its labels through the same check
    x, w = jnp.eye(3, 2, dtype=jnp.float32), jnp.zeros((2, 4), jnp.float32)
    fused = sj.fused.linear_softmax_cross_entropy(x, w, labels, reduction="none")
    assert np.isnan(fused[0]) and np.isnan(fused[2]) and np.isfinite(fused[1])


def test_uint32_labels_never_wrap_onto_ignore_index():
    z = jnp.zeros((2, 4), jnp.float32)
    labels = np.array([2**32 - 100, 3], np.uint32)  # as int32: -100
    with pytest.raises(ValueError, match="outside the range of the uint32 labels"):
        sj.softmax_cross_entropy_with_integer_labels(z, labels, ignore_index=-100)
    got = sj.softmax_cross_entropy_with_integer_labels(z, labels)
    assert np.isnan(got[0])
    np.testing.assert_allclose(got[1], np.log(4.0), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# 7. large logits with label smoothing
# --------------------------------------------------------------------------------------------

BIG = np.array([[2e38, -2e38, 0.0, 0.0], [3e38, -1e38, 1.0, -3e38]], np.float32)
BIG_LABELS = np.array([0, 0])


def _torch_smoothed(logits, labels, eps):
    z = torch.tensor(logits.astype(np.float64), requires_grad=True)
    loss = torch.nn.functional.cross_entropy(z, torch.tensor(labels), label_smoothing=eps,
                                             reduction="none")
    loss.sum().backward()
    return loss.detach().numpy(), z.grad.numpy()


def test_smoothing_with_logits_near_the_float_range():
    want, want_grad = _torch_smoothed(BIG, BIG_LABELS, 0.1)
    np.testing.assert_allclose(want[0], 2e37, rtol=1e-6)
    onehot = np.eye(4, dtype=np.float32)[BIG_LABELS]
    for f, y in [(sj.softmax_cross_entropy_with_integer_labels, BIG_LABELS),
                 (sj.softmax_cross_entropy, onehot)]:
        loss = lambda z, e, f=f, y=y: f(z, y, label_smoothing=e)  # noqa: E731
        np.testing.assert_allclose(loss(BIG, 0.1), want, rtol=1e-6)
        dz = jax.grad(lambda z, loss=loss: loss(z, 0.1).sum())(BIG)
        np.testing.assert_allclose(dz, want_grad, rtol=1e-6, atol=1e-7)
        # d/d eps = uniform - nll per example, float64 by hand
        d_eps = jax.jacrev(lambda e, loss=loss: loss(BIG, e))(0.1)
        z64 = BIG.astype(np.float64)
        lse = z64.max(1)  # the other terms are far below the rounding of the maximum
        uniform = np.mean(lse[:, None] - z64, axis=1)
        np.testing.assert_allclose(d_eps, uniform - (lse - z64[:, 0]), rtol=1e-6)


def test_smoothing_with_large_logits_weighted_class_cotangent():
    w = np.array([1.0, 0.5, 1.0, 0.5], np.float32)
    f = lambda z, w: sj.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        z, BIG_LABELS, label_smoothing=0.1, class_weights=w).sum()
    z = torch.tensor(BIG.astype(np.float64))
    wt = torch.tensor(w.astype(np.float64))
    ref = torch.nn.functional.cross_entropy(z, torch.tensor(BIG_LABELS), weight=wt,
                                            label_smoothing=0.1, reduction="sum")
    np.testing.assert_allclose(f(BIG, w), ref.item(), rtol=1e-6)
    # the loss is linear in w: dw_c = sum_i 0.9 [y_i = c] nll_i + (0.1 / 4) (lse_i - z_ic)
    z64 = BIG.astype(np.float64)
    neg_log_a = z64.max(1, keepdims=True) - z64
    want = 0.1 / 4 * neg_log_a.sum(0)
    np.add.at(want, BIG_LABELS, 0.9 * neg_log_a[np.arange(2), BIG_LABELS])
    np.testing.assert_allclose(jax.grad(f, 1)(BIG, w), want, rtol=1e-6)


def test_fused_smoothing_with_logits_near_the_float_range():
    x = jnp.eye(2, dtype=jnp.float32)
    want, _ = _torch_smoothed(BIG, BIG_LABELS, 0.1)
    got = sj.fused.linear_softmax_cross_entropy(x, jnp.asarray(BIG), BIG_LABELS,
                                                reduction="none", label_smoothing=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# 8. per-example masks (optax's convention for the two cross-entropies)
# --------------------------------------------------------------------------------------------


def _logits(n, k, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, k), jnp.float32) * 2.0


@pytest.mark.parametrize("n,k", [(4, 4), (5, 3), (3, 6)])
def test_per_example_mask_matches_optax(n, k):
    z = _logits(n, k)
    labels = jnp.arange(n) % k
    rows = jnp.arange(n) % 3 != 1
    soft = jax.nn.softmax(_logits(n, k, seed=1))
    for ours, theirs, y in [
        (sj.softmax_cross_entropy_with_integer_labels,
         optax.softmax_cross_entropy_with_integer_labels, labels),
        (sj.softmax_cross_entropy, optax.softmax_cross_entropy, soft),
    ]:
        np.testing.assert_allclose(ours(z, y, where=rows), theirs(z, y, where=rows),
                                   rtol=1e-6, atol=1e-7)
        g = jax.grad(lambda z, f=ours, y=y: f(z, y, where=rows).sum())(z)
        g_ref = jax.grad(lambda z, f=theirs, y=y: f(z, y, where=rows).sum())(z)
        np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-7)
    # a mask of the logits' rank is per element (no label on a masked class here)
    full = jnp.ones((n, k), bool).at[:, -1].set(False).at[0].set(False)
    labels = jnp.arange(n) % (k - 1)
    np.testing.assert_allclose(
        sj.softmax_cross_entropy_with_integer_labels(z, labels, where=full),
        optax.softmax_cross_entropy_with_integer_labels(z, labels, where=full), rtol=1e-6,
        atol=1e-6)  # optax's lse - z_y cancels near 0


def test_per_example_mask_with_tuple_axes_matches_optax():
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 4, 5))
    labels = jnp.arange(8).reshape(2, 4) % 15
    rows = jnp.array([[True, False, True, True], [False, True, True, False]])
    got = sj.softmax_cross_entropy_with_integer_labels(z, labels, axis=(1, 3), where=rows)
    want = optax.softmax_cross_entropy_with_integer_labels(z, labels, axis=(1, 3), where=rows)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    soft = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(4), z.shape), axis=(1, 3))
    np.testing.assert_allclose(sj.softmax_cross_entropy(z, soft, axis=(1, 3), where=rows),
                               optax.softmax_cross_entropy(z, soft, axis=(1, 3), where=rows),
                               rtol=1e-5)


def test_mask_of_another_rank_raises_naming_both_spellings():
    z = _logits(4, 5)
    with pytest.raises(ValueError, match=r"where.shape=\(5,\)"):
        sj.softmax_cross_entropy_with_integer_labels(z, jnp.zeros(4, int), where=jnp.ones(5, bool))
    with pytest.raises(ValueError, match="where"):
        sj.softmax_cross_entropy(z[None], jnp.zeros((1, 4, 5)), where=jnp.ones(5, bool))


def test_softmax_keeps_jax_nn_broadcasting_for_square_masks():
    z = _logits(4, 4)
    mask = jnp.array([True, True, False, True])
    np.testing.assert_allclose(sj.softmax(z, where=mask), jax.nn.softmax(z, where=mask),
                               rtol=1e-6)


# --------------------------------------------------------------------------------------------
# 9. dense labels that broadcast, integer one-hot labels
# --------------------------------------------------------------------------------------------


def test_dense_labels_broadcast_and_integer_one_hot_match_optax():
    z = _logits(4, 5)
    y = jax.nn.softmax(jnp.arange(5.0))
    np.testing.assert_allclose(sj.softmax_cross_entropy(z, y),
                               optax.softmax_cross_entropy(z, y), rtol=1e-6)
    g = jax.grad(lambda z, y: sj.softmax_cross_entropy(z, y).sum(), (0, 1))(z, y)
    g_ref = jax.grad(lambda z, y: optax.softmax_cross_entropy(z, y).sum(), (0, 1))(z, y)
    assert g[1].shape == (5,)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    onehot = jnp.eye(5, dtype=jnp.int32)[jnp.array([0, 3, 1, 4])]
    np.testing.assert_allclose(sj.softmax_cross_entropy(z, onehot),
                               optax.softmax_cross_entropy(z, onehot), rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda z: sj.softmax_cross_entropy(z, onehot).sum())(z),
        jax.grad(lambda z: optax.softmax_cross_entropy(z, onehot).sum())(z), rtol=1e-6,
        atol=1e-7)
    with pytest.raises(ValueError, match="softmax_cross_entropy_with_integer_labels"):
        sj.softmax_cross_entropy(z, jnp.array([0, 3, 1, 4]))  # class indices


# --------------------------------------------------------------------------------------------
# 10. a label on a masked class: +inf from both losses, the same gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps,weighted", [(0.0, False), (0.2, False), (0.2, True)])
def test_label_on_a_masked_class_is_infinite_in_both_losses(eps, weighted):
    z = _logits(3, 5)
    labels = jnp.array([4, 1, 2])
    mask = jnp.ones((3, 5), bool).at[0, 4].set(False).at[1, 0].set(False)
    w = jnp.array([1.0, 0.5, 2.0, 1.5, 0.7]) if weighted else None
    kw = dict(where=mask, label_smoothing=eps, class_weights=w)

    def integer(z, e):
        return sj.softmax_cross_entropy_with_integer_labels(z, labels, **kw | {
            "label_smoothing": e})

    def dense(z, e):
        return sj.softmax_cross_entropy(z, jax.nn.one_hot(labels, 5), **kw | {
            "label_smoothing": e})

    a, b = integer(z, eps), dense(z, eps)
    assert np.isposinf(a[0])
    # the dense loss's where slices the labels too (as optax's): the masked mass is dropped
    kept = jnp.where(mask, jax.nn.one_hot(labels, 5), 0.0)
    np.testing.assert_allclose(b, sj.softmax_cross_entropy(z, kept, **kw), rtol=1e-6)
    np.testing.assert_allclose(a[1:], b[1:], rtol=1e-6)
    # the rows whose label is not masked: torch on the unmasked classes
    zt = torch.tensor(np.where(np.asarray(mask), np.asarray(z), -np.inf)[1:], dtype=torch.float64)
    ref = torch.nn.functional.cross_entropy(
        zt, torch.tensor(np.asarray(labels[1:])).long(), reduction="none",
        weight=None if w is None else torch.tensor(np.asarray(w), dtype=torch.float64))
    if eps == 0.0:
        np.testing.assert_allclose(a[1:], ref.numpy(), rtol=1e-6)
    argnums = (0, 1) if eps else (0,)
    ga = jax.grad(lambda *x: integer(*x).sum(), argnums)(z, eps)
    gb = jax.grad(lambda *x: dense(*x).sum(), argnums)(z, eps)
    np.testing.assert_allclose(ga[0][1:], gb[0][1:], rtol=1e-5, atol=1e-6)
    # the logits' gradient of the infinite row: c a - eps w / K over the unmasked classes
    wv = jnp.ones(5) if w is None else w
    c = (1 - eps) * wv[4] + eps * jnp.sum(wv[:4]) / 4
    a = jax.nn.softmax(z[0], where=mask[0])
    want = jnp.where(mask[0], c * a - eps * wv / 4, 0.0)
    np.testing.assert_allclose(ga[0][0], want, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# 12, 13. argument errors
# --------------------------------------------------------------------------------------------


def test_infinite_temperature_raises_and_traced_gives_nan():
    s, t = _logits(2, 3), _logits(2, 3, seed=1)
    with pytest.raises(ValueError, match="temperature"):
        sj.distillation_loss(s, t, temperature=float("inf"))
    with pytest.raises(ValueError, match="temperature"):
        sj.distillation_loss(s, t, temperature=jnp.inf)
    traced = jax.jit(lambda temp: sj.distillation_loss(s, t, temperature=temp))
    assert np.isnan(traced(jnp.inf)).all()
    assert np.isnan(jax.grad(lambda temp: traced(temp).sum())(jnp.inf))


def test_ignore_index_beyond_the_label_dtype_names_ignore_index():
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="ignore_index"):
        sj.softmax_cross_entropy_with_integer_labels(z, jnp.array([0, 1]), ignore_index=2**40)


# --------------------------------------------------------------------------------------------
# Smoothing where -log a_y (or the uniform term) overflows but the loss does not
# --------------------------------------------------------------------------------------------

# Row 0: nll = 4e38 overflows, (1 - eps) nll + eps uniform = 2e38 + 1e38 does not. Row 1:
# uniform = 4.5e38 overflows, eps uniform = 2.25e38 does not (nll = 0).
HUGE = np.array([[2e38, -2e38, 0.0, 0.0], [3e38, -3e38, -3e38, -3e38]], np.float32)
HUGE_LABELS = np.array([1, 0])
HUGE_W = np.array([1.0, 0.5, 1.0, 0.5], np.float32)


def _torch_huge(eps, weight):
    z = torch.tensor(HUGE.astype(np.float64), requires_grad=True)
    wt = torch.tensor(weight.astype(np.float64))
    loss = torch.nn.functional.cross_entropy(z, torch.tensor(HUGE_LABELS), weight=wt,
                                             label_smoothing=eps, reduction="none")
    loss.sum().backward()
    return loss.detach().numpy(), z.grad.numpy()


def _plain_huge(z, eps, w):
    """float64 plain formula with class weights: (1 - eps) w_y nll + (eps / K) sum w_c nll_c."""
    neg = -reference.log_softmax(z)
    hard = jnp.take_along_axis(neg, jnp.asarray(HUGE_LABELS)[:, None], axis=1)[:, 0]
    return (1 - eps) * w[HUGE_LABELS] * hard + eps * jnp.mean(w * neg, axis=1)


@pytest.mark.parametrize("weighted", [False, True])
def test_smoothing_where_the_hard_term_overflows_but_the_loss_does_not(weighted):
    # Failed before: the integer-label and fused losses gave inf for row 0 (nll = 4e38
    # overflowed before being halved) and every loss inf for row 1 (the uniform term).
    w = HUGE_W if weighted else np.ones(4, np.float32)
    want, want_dz = _torch_huge(0.5, w)
    assert np.all(want < np.finfo(np.float32).max)
    cw = {"class_weights": w} if weighted else {}
    onehot = np.eye(4, dtype=np.float32)[HUGE_LABELS]
    cases = {
        "integer": lambda z, e: sj.softmax_cross_entropy_with_integer_labels(
            z, HUGE_LABELS, label_smoothing=e, **cw),
        "dense": lambda z, e: sj.softmax_cross_entropy(z, onehot, label_smoothing=e, **cw),
        "fused": lambda z, e: sj.fused.linear_softmax_cross_entropy(
            jnp.eye(2), z, HUGE_LABELS, reduction="none", label_smoothing=e, **cw),
    }
    with jax.enable_x64(True):
        z64, w64 = jnp.asarray(HUGE, jnp.float64), jnp.asarray(w, jnp.float64)
        d_eps_want = np.asarray(jax.jacrev(_plain_huge, 1)(z64, 0.5, w64))
        want_dw = np.asarray(jax.grad(lambda w: _plain_huge(z64, 0.5, w).sum())(w64))
    # d/d eps = uniform - w_y nll: row 1's unweighted 4.5e38 lies beyond float32 (inf)
    d_eps_want = np.where(np.abs(d_eps_want) < np.finfo(np.float32).max, d_eps_want, np.inf)
    for name, f in cases.items():
        np.testing.assert_allclose(f(HUGE, 0.5), want, rtol=1e-6, err_msg=name)
        dz = jax.grad(lambda z, f=f: f(z, 0.5).sum())(HUGE)
        np.testing.assert_allclose(dz, want_dz, rtol=1e-6, atol=1e-7, err_msg=name)
        d_eps = jax.jacrev(lambda e, f=f: f(HUGE, e))(jnp.float32(0.5))
        np.testing.assert_allclose(d_eps, d_eps_want, rtol=1e-6, err_msg=name)
    if weighted:
        for name in ("integer", "dense"):
            f = {"integer": sj.softmax_cross_entropy_with_integer_labels,
                 "dense": sj.softmax_cross_entropy}[name]
            y = HUGE_LABELS if name == "integer" else onehot
            dw = jax.grad(lambda w, f=f, y=y: f(HUGE, y, label_smoothing=0.5,
                                                 class_weights=w).sum())(w)
            np.testing.assert_allclose(dw, want_dw, rtol=1e-6, err_msg=name)


def test_without_smoothing_an_overflowing_nll_stays_infinite():
    # The true -log a_y = 4e38 lies beyond float32: inf, not a clipped plausible number.
    for got in (sj.softmax_cross_entropy_with_integer_labels(HUGE[:1], HUGE_LABELS[:1]),
                sj.fused.linear_softmax_cross_entropy(jnp.eye(1), HUGE[:1], HUGE_LABELS[:1],
                                                      reduction="none")):
        assert np.isposinf(got).all()


def test_fused_distillation_hard_term_shares_the_halved_nll():
    # hard_weight = 1: the loss is the smoothed cross-entropy alone (2e38 + 1e38 = 3e38).
    want, _ = _torch_huge(0.5, np.ones(4, np.float32))
    x = jnp.eye(2)
    got = sj.fused.linear_softmax_distillation(
        x, jnp.asarray(HUGE), x, jnp.zeros((2, 4)), labels=HUGE_LABELS, hard_weight=1.0,
        label_smoothing=0.5, reduction="none")
    np.testing.assert_allclose(got, want, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# An infinite z_loss is out of range: a concrete one raises, a traced one gives NaN
# --------------------------------------------------------------------------------------------


def _z_loss_cases():
    z, labels = _logits(3, 4), jnp.array([0, 2, 1])
    onehot = jax.nn.one_hot(labels, 4)
    return {
        "integer": lambda z, lam: sj.softmax_cross_entropy_with_integer_labels(
            z, labels, z_loss=lam),
        "dense": lambda z, lam: sj.softmax_cross_entropy(z, onehot, z_loss=lam),
        "fused": lambda z, lam: sj.fused.linear_softmax_cross_entropy(
            jnp.eye(3), z, labels, reduction="none", z_loss=lam),
    }, z


@pytest.mark.parametrize("bad", [float("inf"), np.float32(np.inf), jnp.array(np.inf)],
                         ids=["float", "numpy", "jax"])
def test_concrete_infinite_z_loss_raises_naming_it(bad):
    # Failed before: accepted, the loss was inf for every example.
    cases, z = _z_loss_cases()
    for f in cases.values():
        with pytest.raises(ValueError, match="z_loss"):
            f(z, bad)


def test_traced_infinite_z_loss_gives_nan_value_and_derivatives():
    cases, z = _z_loss_cases()
    for name, f in cases.items():
        val = jax.jit(f)(z, jnp.float32(np.inf))
        d_z, d_lam = jax.jit(jax.grad(lambda z, lam, f=f: f(z, lam).sum(), (0, 1)))(
            z, jnp.float32(np.inf))
        assert np.isnan(val).all() and np.isnan(d_lam), name
        assert np.isnan(d_z).all(), name
        # a finite traced value is left alone: d/d lambda = sum lse^2 (float64 plain)
        d_lam = jax.jit(jax.grad(lambda lam, f=f: f(z, lam).sum()))(jnp.float32(0.1))
        lse = np.log(np.exp(np.asarray(z, np.float64)).sum(1))
        np.testing.assert_allclose(d_lam, np.sum(lse**2), rtol=1e-5, err_msg=name)
