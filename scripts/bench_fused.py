"""Fused large-vocabulary losses against the unfused composition and the chunked anchor.

Every row computes the value and the gradients for ``x`` and ``w`` of a mean loss over ``N``
tokens with a ``[D, V]`` output layer, float32, three ways, on the same inputs:

* unfused: the loss applied to the materialised ``N x V`` logits, which reverse mode then
  keeps along with their gradient. Cross-entropy:
  ``optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()``; distillation
  (temperature ``T = 2``):
  ``T**2 * optax.losses.kl_divergence(jax.nn.log_softmax(x @ w / T),
  jax.nn.softmax(teacher_x @ teacher_w / T)).mean()``;
* chunked: the two-level chunked design (1024 tokens x 2048 classes, log-sum-exp only in
  the forward, logits recomputed in the backward), ``experiments.chunked``;
* fused: ``softmax_jax.linear_softmax_cross_entropy`` and
  ``softmax_jax.linear_softmax_distillation`` (rows skipped, with a message, where the
  installed softmax_jax lacks it).

Memory is XLA's own account of each compiled program, ``memory_analysis()``'s
``temp_size_in_bytes``: the buffers allocated beyond arguments and outputs. Time is the median
wall time of interleaved runs (unfused, chunked, fused, unfused, ...), so that drift in machine
load hits all alike. Ratios below 1 mean the fused loss is smaller or faster. A last table
compiles (without running) the fused losses for bfloat16 inputs at N=16384, D=1024, V=262144
and reports their temporary memory. The helpers are ``experiments.timing``.

    python scripts/bench_fused.py                # the target cases, 15 repeats
    python scripts/bench_fused.py --repeats 5
    python scripts/bench_fused.py --quick        # small shapes: checks the script, not speed
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import optax

import softmax_jax as sj
from experiments.chunked import (
    TOKEN_BLOCK,
    VOCAB_BLOCK,
    chunked_cross_entropy,
    chunked_distillation,
)
from experiments.timing import (
    compile_fn,
    interleaved_medians,
    max_rel_err,
    mib,
    temp_bytes,
)

TEMPERATURE = 2.0
ANCHOR_TIME_TARGET = 0.9  # fused time / chunked time, every loss and size
BF16_TEMP_TARGET_MIB = 256.0


@dataclass(frozen=True)
class Size:
    n: int
    d: int
    v: int
    mem_target: float  # fused temp / unfused temp, cross-entropy
    time_target: float | None  # fused time / unfused time, cross-entropy


# The cross-entropy targets of the first table are unchanged; distillation's are 1/20, 0.9x.
SIZES = [Size(4096, 256, 32000, 1 / 20, 0.9), Size(2048, 128, 131072, 1 / 16, None)]
KD_MEM_TARGET, KD_TIME_TARGET = 1 / 20, 0.9
BF16_SIZE = (16384, 1024, 262144)
# --quick: shapes that still give several chunked blocks (and padding) per axis.
QUICK_SIZES = [Size(96, 16, 300, 1 / 20, 0.9), Size(64, 8, 1000, 1 / 16, None)]
QUICK_BLOCKS = {"token_block": 32, "vocab_block": 128}
QUICK_BF16_SIZE = (256, 64, 4096)


def has_distillation() -> bool:
    return hasattr(sj, "linear_softmax_distillation")


DISTILLATION_MISSING = (
    "skipped: softmax_jax.linear_softmax_distillation does not exist in this checkout yet"
)


def _inputs(n: int, d: int, v: int) -> dict[str, jax.Array]:
    kx, kw, ky, ktx, ktw = jax.random.split(jax.random.PRNGKey(0), 5)
    return {
        "x": jax.random.normal(kx, (n, d), jnp.float32),
        "w": jax.random.normal(kw, (d, v), jnp.float32) / jnp.sqrt(d),
        "labels": jax.random.randint(ky, (n,), 0, v),
        "teacher_x": jax.random.normal(ktx, (n, d), jnp.float32),
        "teacher_w": 1.5 * jax.random.normal(ktw, (d, v), jnp.float32) / jnp.sqrt(d),
    }


def ce_functions(blocks: dict) -> dict[str, Callable[..., jax.Array]]:
    """The three cross-entropy implementations, each ``f(x, w, labels)``."""
    return {
        "unfused": lambda x, w, y: optax.softmax_cross_entropy_with_integer_labels(
            x @ w, y).mean(),
        "chunked": lambda x, w, y: chunked_cross_entropy(x, w, y, **blocks),
        "fused": lambda x, w, y: sj.linear_softmax_cross_entropy(x, w, y),
    }


def kd_functions(blocks: dict, t: float = TEMPERATURE) -> dict[str, Callable[..., jax.Array]]:
    """The three distillation implementations (forward KL, temperature ``t``), each
    ``f(x, w, teacher_x, teacher_w)``; no "fused" entry without the fused function."""
    fns: dict[str, Callable[..., jax.Array]] = {
        "unfused": lambda x, w, tx, tw: t**2 * optax.losses.kl_divergence(
            jax.nn.log_softmax(x @ w / t), jax.nn.softmax(tx @ tw / t)).mean(),
        "chunked": lambda x, w, tx, tw: chunked_distillation(
            x, w, tx, tw, temperature=t, **blocks),
    }
    if has_distillation():
        fused = sj.linear_softmax_distillation
        fns["fused"] = lambda x, w, tx, tw: fused(x, w, tx, tw, temperature=t, beta=0.0)
    return fns


@dataclass
class Measured:
    """One loss at one size: temp bytes, median seconds and error against "unfused"."""

    loss: str
    size: Size
    temp: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    err: dict[str, float] = field(default_factory=dict)


def measure(loss: str, size: Size, fns: dict[str, Callable[..., jax.Array]], args: tuple,
            repeats: int) -> Measured:
    """Compiles ``value_and_grad`` (w.r.t. the first two arguments) of each function, checks
    them against the unfused one, and times them interleaved."""
    out = Measured(loss, size)
    compiled = {}
    for name, fn in fns.items():
        compiled[name], out.temp[name] = compile_fn(jax.value_and_grad(fn, argnums=(0, 1)),
                                                    args)
    results = {name: c(*args) for name, c in compiled.items()}
    for name, result in results.items():
        out.err[name] = max_rel_err(result, results["unfused"])
    times = interleaved_medians(list(compiled.values()), args, repeats, warmup=1)
    out.seconds = dict(zip(compiled, times, strict=True))
    print(f"  measured {loss} N={size.n} D={size.d} V={size.v}", file=sys.stderr, flush=True)
    return out


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else (" (met)" if ok else " (MISSED)")


def _mem_cell(ratio: float, target: float) -> str:
    shown = f"1/{1 / ratio:.0f}" if ratio < 1 else f"{ratio:.1f}x"  # "1/0" says nothing
    return f"{shown} (1/{round(1 / target)}){_verdict(ratio <= target)}"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def _time_cell(ratio: float, target: float | None) -> str:
    if target is None:
        return f"{ratio:.2f}x (none)"
    return f"{ratio:.2f}x (<= {target:g}x){_verdict(ratio <= target)}"


def unfused_rows(results: list[Measured], targets: Callable[[Size], tuple]) -> list[dict]:
    """Rows of the fused-against-unfused tables (the fused tables of docs/benchmarks.md)."""
    rows = []
    for m in results:
        mem_target, time_target = targets(m.size)
        mem_ratio = _ratio(m.temp["fused"], m.temp["unfused"])
        time_ratio = _ratio(m.seconds["fused"], m.seconds["unfused"])
        rows.append({
            "n": m.size.n, "d": m.size.d, "v": m.size.v,
            "anchor_temp_mib": mib(m.temp["unfused"]), "fused_temp_mib": mib(m.temp["fused"]),
            "mem_ratio": mem_ratio, "mem_target": mem_target,
            "mem_ok": mem_ratio <= mem_target,
            "anchor_ms": 1e3 * m.seconds["unfused"], "fused_ms": 1e3 * m.seconds["fused"],
            "time_ratio": time_ratio, "time_target": time_target,
            "time_ok": None if time_target is None else time_ratio <= time_target,
            "max_rel_err": m.err["fused"],
        })
    return rows


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}\n")
    print(
        "| N | D | V | anchor temp MiB | fused temp MiB | temp ratio (target) | anchor ms"
        " | fused ms | time ratio (target) |"
    )
    print("|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['d']} | {r['v']} | {r['anchor_temp_mib']:.0f}"
            f" | {r['fused_temp_mib']:.1f} | {_mem_cell(r['mem_ratio'], r['mem_target'])}"
            f" | {r['anchor_ms']:.0f} | {r['fused_ms']:.0f}"
            f" | {_time_cell(r['time_ratio'], r['time_target'])} |"
        )


def chunked_rows(results: list[Measured]) -> list[dict]:
    rows = []
    for m in results:
        row = {"loss": m.loss, "n": m.size.n, "d": m.size.d, "v": m.size.v,
               "chunked_ms": 1e3 * m.seconds["chunked"],
               "chunked_temp_mib": mib(m.temp["chunked"]), "chunked_err": m.err["chunked"]}
        if "fused" in m.seconds:
            ratio = _ratio(m.seconds["fused"], m.seconds["chunked"])
            row.update(fused_ms=1e3 * m.seconds["fused"], fused_temp_mib=mib(m.temp["fused"]),
                       time_ratio=ratio, time_ok=ratio <= ANCHOR_TIME_TARGET,
                       fused_err=m.err["fused"])
        rows.append(row)
    return rows


def print_chunked_table(rows: list[dict], repeats: int) -> None:
    print(
        "\nAgainst the two-level chunked anchor (experiments.chunked), value_and_grad"
        f" w.r.t. x and w, float32, median of {repeats} interleaved runs; errors are the"
        " largest difference from the unfused composition, relative\n"
    )
    print(
        "| loss | N | D | V | chunked ms | fused ms | time ratio (target) | chunked temp MiB"
        " | fused temp MiB | chunked err | fused err |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        head = (f"| {r['loss']} | {r['n']} | {r['d']} | {r['v']} | {r['chunked_ms']:.0f}")
        if "fused_ms" not in r:
            print(f"{head} | {DISTILLATION_MISSING} | | {r['chunked_temp_mib']:.1f} | |"
                  f" {r['chunked_err']:.1e} | |")
            continue
        print(
            f"{head} | {r['fused_ms']:.0f} | {_time_cell(r['time_ratio'], ANCHOR_TIME_TARGET)}"
            f" | {r['chunked_temp_mib']:.1f} | {r['fused_temp_mib']:.1f}"
            f" | {r['chunked_err']:.1e} | {r['fused_err']:.1e} |"
        )


def bf16_rows(n: int, d: int, v: int, full_size: bool) -> list[dict]:
    """Temporary memory of the fused losses' value_and_grad for bfloat16 weights, compiled
    for abstract arguments (nothing of that size is allocated or run): bfloat16 ``x``, then
    float32 ``x`` (mixed precision, whose float32 ``dx`` keeps float32 accuracy)."""
    bf16 = jnp.bfloat16
    w, labels = jax.ShapeDtypeStruct((d, v), bf16), jax.ShapeDtypeStruct((n,), jnp.int32)
    ce = jax.value_and_grad(lambda x, w, y: sj.linear_softmax_cross_entropy(x, w, y),
                            argnums=(0, 1))
    kd = kd_functions({}).get("fused")
    kd_grad = None if kd is None else jax.value_and_grad(kd, argnums=(0, 1))
    cases: list[tuple[str, Callable | None, tuple]] = []
    for x_dtype, note in ((bf16, ""), (jnp.float32, ", float32 x")):
        x = jax.ShapeDtypeStruct((n, d), x_dtype)
        cases += [(f"cross-entropy{note}", ce, (x, w, labels)),
                  (f"distillation (T=2, beta=0){note}", kd_grad, (x, w, x, w))]
    rows = []
    for name, fn, args in cases:
        row: dict = {"loss": name, "n": n, "d": d, "v": v, "full_size": full_size}
        if fn is not None:
            row["temp_mib"] = mib(temp_bytes(fn, args))
            row["ok"] = row["temp_mib"] <= BF16_TEMP_TARGET_MIB if full_size else None
        rows.append(row)
        print(f"  compiled bf16 {name} N={n} D={d} V={v}", file=sys.stderr, flush=True)
    return rows


def print_bf16_table(rows: list[dict]) -> None:
    print(
        "\nbfloat16 weights (and bfloat16 x unless noted), value_and_grad w.r.t. x and w,"
        " compiled only (not run): memory_analysis() temporaries\n"
    )
    print("| loss | N | D | V | fused temp MiB | target |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        head = f"| {r['loss']} | {r['n']} | {r['d']} | {r['v']}"
        if "temp_mib" not in r:
            print(f"{head} | {DISTILLATION_MISSING} | |")
            continue
        target = (f"<= {BF16_TEMP_TARGET_MIB:.0f} MiB{_verdict(r['ok'])}" if r["full_size"]
                  else "none at this size")
        print(f"{head} | {r['temp_mib']:.1f} | {target} |")


def run_fused_benchmarks(repeats: int = 15, quick: bool = False) -> dict[str, list[dict]]:
    """Measures every row, prints the four tables and returns their rows by table name:
    ``"ce"``, ``"distillation"`` (empty without the fused distillation), ``"chunked"`` and
    ``"bf16"``."""
    sizes = QUICK_SIZES if quick else SIZES
    blocks = QUICK_BLOCKS if quick else {"token_block": TOKEN_BLOCK,
                                         "vocab_block": VOCAB_BLOCK}
    ce, kd = [], []
    for size in sizes:
        inp = _inputs(size.n, size.d, size.v)
        ce.append(measure("cross-entropy", size, ce_functions(blocks),
                          (inp["x"], inp["w"], inp["labels"]), repeats))
        kd.append(measure(f"distillation (T={TEMPERATURE:g}, beta=0)", size,
                          kd_functions(blocks),
                          (inp["x"], inp["w"], inp["teacher_x"], inp["teacher_w"]), repeats))
    tables = {
        "ce": unfused_rows(ce, lambda s: (s.mem_target, s.time_target)),
        "distillation": unfused_rows(kd, lambda s: (KD_MEM_TARGET, KD_TIME_TARGET))
        if has_distillation() else [],
        "chunked": chunked_rows([m for pair in zip(ce, kd, strict=True) for m in pair]),
        "bf16": bf16_rows(*(QUICK_BF16_SIZE if quick else BF16_SIZE), full_size=not quick),
    }
    if quick:
        print("\n--quick: small shapes, to check the script; the targets are for the full sizes")
    print_table(tables["ce"],
                "Fused linear + softmax cross-entropy, value_and_grad w.r.t. x and w, float32,"
                f" median of {repeats} interleaved runs; anchor: optax on x @ w")
    title = (f"Fused distillation, T={TEMPERATURE:g}, beta=0 (forward KL), value_and_grad"
             f" w.r.t. x and w, float32, median of {repeats} interleaved runs; anchor:"
             " T**2 * optax.losses.kl_divergence(jax.nn.log_softmax(x @ w / T),"
             " jax.nn.softmax(teacher_x @ teacher_w / T)).mean()")
    if tables["distillation"]:
        print_table(tables["distillation"], title)
    else:
        print(f"\n{title}\n\n{DISTILLATION_MISSING}")
    print_chunked_table(tables["chunked"], repeats)
    print_bf16_table(tables["bf16"])
    return tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true",
                        help="small shapes: a smoke test of the tables, not a measurement")
    args = parser.parse_args(argv)
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, backend {jax.default_backend()},"
        f" {jax.device_count()} device(s)"
    )
    run_fused_benchmarks(args.repeats, quick=args.quick)


if __name__ == "__main__":
    main()
