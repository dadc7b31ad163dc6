"""Per-token log-probabilities and entropies for RL post-training: the fused head against the
materialised composition.

Speed rows (float32, value and the gradients of ``x`` and ``w`` of ``sum(c * logp + e * H)``
with fixed random per-token weights ``c``, ``e``, N=2048, D=128, V=32768):

* fused with the entropy: ``softmax_jax.linear_log_probs(x, w, y, return_entropy=True)``;
* fused without it: ``softmax_jax.linear_log_probs(x, w, y)`` (the ``e`` term dropped);
* materialised: ``jax.nn.log_softmax(x @ w)``, a gather of ``y`` and ``-sum(p log p)``.

Targets: with the entropy at most 1.25x without it, and at most 0.5x the materialised
composition. Times are medians of interleaved runs (``experiments.timing``); each row also
gives the compiled program's temporaries (``memory_analysis()``).

Memory row: one GRPO step's value and gradients (``experiments.grpo.objective``: clipped
ratio, group advantages, k3 KL to a reference, entropy bonus) at N=8192 (256 sequences x 32
tokens), D=256, V=65536, compiled without running: XLA's ``temp_size_in_bytes``, fused
against the materialised composition. Target: at most 1/20.

    python scripts/bench_rl.py                 # both tables
    python scripts/bench_rl.py --memory-only   # compile only (no timing)
    python scripts/bench_rl.py --quick         # tiny shapes: checks the script, not speed
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp

import softmax_jax as sj
from experiments.grpo.objective import Batch, Weights, loss_from_log_probs
from experiments.timing import compile_fn, interleaved_medians, max_rel_err, mib, temp_bytes

SPEED_SIZE = (2048, 128, 32768)
MEMORY_SIZE = (256, 32, 256, 65536)  # sequences, tokens per sequence, D, V
QUICK_SPEED_SIZE = (64, 16, 500)
QUICK_MEMORY_SIZE = (8, 8, 16, 1000)
ENTROPY_TIME_TARGET = 1.25
MATERIALISED_TIME_TARGET = 0.5
MEMORY_TARGET = 1 / 20
# N x D x V matrix products per value-and-gradient: the composition keeps its logits
# (x @ w, then dz @ w.T and x.T @ dz); the fused head recomputes each block's logits in the
# backward pass, because a token's cotangent is only known there.
PRODUCTS = {"materialised": 3, "fused, no entropy": 4, "fused": 4}


def materialised_log_probs(x, w, y):
    """``(logp, entropy)`` from the full logits: ``log_softmax``, a gather, the entropy."""
    log_p = jax.nn.log_softmax(x @ w)
    logp = jnp.take_along_axis(log_p, y[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def speed_functions() -> dict[str, Callable[..., object]]:
    """Each ``f(x, w, y, c, e) -> (value, (dx, dw))``."""
    def objective(log_probs, entropy=True):
        def f(x, w, y, c, e):
            logp, ent = log_probs(x, w, y)
            return jnp.sum(c * logp) + (jnp.sum(e * ent) if entropy else 0.0)
        return jax.value_and_grad(f, argnums=(0, 1))

    def fused(x, w, y):
        return sj.linear_log_probs(x, w, y, return_entropy=True)

    def fused_logp(x, w, y):
        return sj.linear_log_probs(x, w, y), None

    return {"materialised": objective(materialised_log_probs),
            "fused, no entropy": objective(fused_logp, entropy=False),
            "fused": objective(fused)}


def speed_inputs(n: int, d: int, v: int) -> tuple:
    kx, kw, ky, kc, ke = jax.random.split(jax.random.PRNGKey(0), 5)
    return (jax.random.normal(kx, (n, d)), jax.random.normal(kw, (d, v)) / jnp.sqrt(d),
            jax.random.randint(ky, (n,), 0, v), jax.random.normal(kc, (n,)),
            jax.random.normal(ke, (n,)))


def run_speed(repeats: int, quick: bool) -> None:
    n, d, v = QUICK_SPEED_SIZE if quick else SPEED_SIZE
    args = speed_inputs(n, d, v)
    fns = speed_functions()
    built = {name: compile_fn(fn, args) for name, fn in fns.items()}
    compiled = {name: exe for name, (exe, _) in built.items()}
    mat = compiled["materialised"](*args)
    err = max_rel_err(compiled["fused"](*args), mat)
    times = dict(zip(compiled, interleaved_medians(list(compiled.values()), args, repeats),
                     strict=True))
    print(f"\nSpeed: value and grads of x and w, float32, N={n}, D={d}, V={v},"
          f" {repeats} interleaved runs (medians); fused vs materialised max rel err {err:.1e}\n")
    print("| function | ms | vs materialised | matrix products | their GFLOP/s | temp MiB"
          " | target |")
    print("|---|---|---|---|---|---|---|")
    base = times["materialised"]
    flops = 2 * n * d * v  # one N x D x V product
    for name, t in times.items():
        target = ""
        if name == "fused":
            target = (f"<= {MATERIALISED_TIME_TARGET}x; <= {ENTROPY_TIME_TARGET}x of no entropy"
                      f" ({t / times['fused, no entropy']:.2f}x)")
        products = PRODUCTS[name]
        print(f"| {name} | {1e3 * t:.1f} | {t / base:.2f}x | {products} |"
              f" {products * flops / t / 1e9:.0f} | {mib(built[name][1]):.1f} | {target} |")
    need = PRODUCTS["fused"] * flops / (MATERIALISED_TIME_TARGET * base) / 1e9
    print(f"\n{MATERIALISED_TIME_TARGET}x of the materialised composition leaves"
          f" {1e3 * MATERIALISED_TIME_TARGET * base:.0f} ms: the fused program's"
          f" {PRODUCTS['fused']} products alone would have to run at {need:.0f} GFLOP/s.")


def grpo_step_functions() -> dict[str, Callable[..., object]]:
    """One GRPO step's value and gradients of ``x`` and ``w``, ``f(x, w, y, batch)``."""
    def step(log_probs):
        def loss(x, w, y, batch):
            logp, ent = log_probs(x, w, y)
            return loss_from_log_probs(logp, ent, batch, Weights())[0]
        return jax.value_and_grad(loss, argnums=(0, 1))

    def fused(x, w, y):
        return sj.linear_log_probs(x, w, y, return_entropy=True)

    return {"materialised": step(materialised_log_probs), "fused": step(fused)}


def grpo_step_memory(quick: bool) -> dict[str, float]:
    """Compiled temporaries (MiB) of one GRPO step, fused and materialised."""
    b, t, d, v = QUICK_MEMORY_SIZE if quick else MEMORY_SIZE
    f32 = jnp.float32
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    batch = Batch(None, tokens, jax.ShapeDtypeStruct((b, t), bool),
                  jax.ShapeDtypeStruct((b, t), f32), jax.ShapeDtypeStruct((b, t), f32),
                  jax.ShapeDtypeStruct((b,), f32))
    args = (jax.ShapeDtypeStruct((b, t, d), f32), jax.ShapeDtypeStruct((d, v), f32), tokens,
            batch)
    return {name: mib(temp_bytes(fn, args)) for name, fn in grpo_step_functions().items()}


def run_memory(quick: bool) -> None:
    b, t, d, v = QUICK_MEMORY_SIZE if quick else MEMORY_SIZE
    mem = grpo_step_memory(quick)
    ratio = mem["fused"] / mem["materialised"]
    print(f"\nMemory: one GRPO step (value and grads of x and w), float32, N={b * t}"
          f" ({b} x {t}), D={d}, V={v}, compiled only\n")
    print("| materialised temp MiB | fused temp MiB | ratio | target |")
    print("|---|---|---|---|")
    print(f"| {mem['materialised']:.1f} | {mem['fused']:.1f} | 1/{1 / ratio:.0f} |"
          f" <= 1/{1 / MEMORY_TARGET:.0f} |")


def run_rl_benchmarks(repeats: int, quick: bool = False, memory_only: bool = False) -> None:
    print(f"\nRL post-training: per-token log-probabilities and entropies"
          f" ({jax.default_backend()}, {jax.devices()[0].device_kind})")
    run_memory(quick)
    if not memory_only:
        run_speed(repeats, quick)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved runs (default 15)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--memory-only", action="store_true",
                        help="the compiled-memory table alone (nothing is timed)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    run_rl_benchmarks(args.repeats, quick=args.quick, memory_only=args.memory_only)


if __name__ == "__main__":
    main()
