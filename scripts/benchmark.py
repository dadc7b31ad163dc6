"""Forward + gradient time and compiled memory of softmax_jax against optax and jax.nn.

Each row compares one softmax_jax function with its anchor (the optax or jax.nn function with
the same meaning) on the same inputs, in the same process. Runs are interleaved (anchor,
candidate, anchor, candidate, ...) so that drift in machine load hits both alike. The core
suite repeats this in rounds (``--rounds``, the order flipped each round) and reports the
median of the per-round ratios with their range, so that a row's spread on a noisy machine is
in the table next to its figure. Ratios below 1 mean softmax_jax is faster or smaller.

Memory is XLA's own account of the compiled program (``memory_analysis()``): the temporary
buffers it allocates beyond arguments and outputs. The compile and timing helpers are
``experiments.timing``; the fused suite is ``scripts/bench_fused.py``.

    python scripts/benchmark.py                  # core table, N=4096, V=32000, f32
    python scripts/benchmark.py --suite all      # plus the fused large-vocabulary losses
    python scripts/benchmark.py --suite fused --quick   # the fused tables on small shapes
    python scripts/benchmark.py --suite contrastive     # CLIP/SigLIP (bench_contrastive.py)
    python scripts/benchmark.py --suite rl       # log-probs and entropies (bench_rl.py)
    python scripts/benchmark.py --hugepages      # the same with huge pages for large buffers
    python scripts/benchmark.py --suite all --write-docs   # regenerate docs/benchmarks.md

On Linux, every N x V gradient is a fresh allocation that glibc maps with ``mmap``; the first
write to each 4 KiB page then costs a page fault, about 0.13 s for 500 MiB on the project's
2-core machine, paid alike by every implementation. ``--hugepages`` re-runs the script with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35), which asks for transparent huge
pages on those mappings, so that the table shows the work the functions themselves do.

``--write-docs`` copies the tables into ``docs/benchmarks.md`` (``experiments.benchmark_docs``):
the core table under both allocators (the other one in a child process), and the contrastive
losses at N = 65536 too, with a header naming the date, machine, versions and commit.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import softmax_jax as sj
from experiments import benchmark_docs
from experiments.timing import compile_fn, interleaved_medians

HUGEPAGES = "glibc.malloc.hugetlb=1"
ROOT = Path(__file__).resolve().parent.parent
# The blocks of docs/benchmarks.md that --write-docs fills: block name -> (suite, a regular
# expression that the title line printed above its table matches).
DOC_TABLES = {
    "core-hugepages": ("core", r"^Core: .*, huge pages$"),
    "core-default": ("core", r"^Core: .*, default allocator$"),
    "fused-cross-entropy": ("fused", r"^Fused linear \+ softmax cross-entropy"),
    "fused-distillation": ("fused", r"^Fused distillation"),
    "fused-chunked": ("fused", r"^Against the two-level chunked anchor"),
    "fused-bf16": ("fused", r"^bfloat16 weights"),
    "contrastive-memory": ("contrastive", r"^Contrastive memory"),
    "contrastive-time": ("contrastive", r"^Contrastive time"),
    "contrastive-ring": ("contrastive", r"^Contrastive ring"),
    "contrastive-scale": ("contrastive", r"^Contrastive scale"),
    "rl-memory": ("rl", r"^Memory: one GRPO step"),
    "rl-speed": ("rl", r"^Speed: value and grads of x and w"),
}


@dataclass
class Case:
    name: str
    target: str  # e.g. "<= 0.9x"; empty when the row has no target
    anchor_name: str
    anchor: Callable[..., object]
    candidate: Callable[..., object]
    args: tuple


def value_and_grad_of_mean(loss: Callable[..., jax.Array]) -> Callable[..., object]:
    """Forward and gradient w.r.t. the first argument of ``loss(...).mean()``."""
    return jax.value_and_grad(lambda z, *rest: loss(z, *rest).mean())


def output_and_vjp(fn: Callable[[jax.Array], jax.Array]) -> Callable[..., object]:
    """``fn(z)`` and its vector-Jacobian product with cotangent ``c``: what a layer's forward
    and backward passes return (the output goes on to the next layer)."""
    def both(z: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
        out, vjp = jax.vjp(fn, z)
        return out, vjp(c)[0]
    return both


def core_cases(n: int, v: int, dtype: jnp.dtype) -> list[Case]:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    logits = (3.0 * jax.random.normal(k1, (n, v))).astype(dtype)
    int_labels = jax.random.randint(k2, (n,), 0, v)
    dense_labels = jax.nn.softmax(jax.random.normal(k3, (n, v)))
    cot = jax.random.normal(k3, (n, v)).astype(dtype)
    bce_labels = (jax.random.uniform(k3, (n, v)) < 0.5).astype(dtype)
    class_weights = jax.random.uniform(k2, (v,), minval=0.5, maxval=2.0)
    teacher = (3.0 * jax.random.normal(k2, (n, v))).astype(dtype)
    return [
        Case(
            "softmax_cross_entropy_with_integer_labels", "<= 0.9x",
            "optax.softmax_cross_entropy_with_integer_labels",
            value_and_grad_of_mean(optax.softmax_cross_entropy_with_integer_labels),
            value_and_grad_of_mean(sj.softmax_cross_entropy_with_integer_labels),
            (logits, int_labels),
        ),
        Case(
            "softmax_cross_entropy (dense labels)", "<= 0.6x",
            "optax.softmax_cross_entropy",
            value_and_grad_of_mean(optax.softmax_cross_entropy),
            value_and_grad_of_mean(sj.softmax_cross_entropy),
            (logits, dense_labels),
        ),
        Case(
            "softmax_cross_entropy_with_integer_labels, vmapped per example", "<= 1.0x",
            "the same optax function, vmapped",
            value_and_grad_of_mean(jax.vmap(optax.softmax_cross_entropy_with_integer_labels)),
            value_and_grad_of_mean(jax.vmap(sj.softmax_cross_entropy_with_integer_labels)),
            (logits, int_labels),
        ),
        Case(
            "softmax_cross_entropy (dense labels), vmapped per example", "<= 1.0x",
            "the same optax function, vmapped",
            value_and_grad_of_mean(jax.vmap(optax.softmax_cross_entropy)),
            value_and_grad_of_mean(jax.vmap(sj.softmax_cross_entropy)),
            (logits, dense_labels),
        ),
        Case(
            "softmax_cross_entropy_with_integer_labels, class weights", "<= 1.0x",
            "optax.softmax_cross_entropy_with_integer_labels times w[labels]",
            value_and_grad_of_mean(
                lambda z, y, w: w[y] * optax.softmax_cross_entropy_with_integer_labels(z, y)),
            value_and_grad_of_mean(
                lambda z, y, w: sj.softmax_cross_entropy_with_integer_labels(
                    z, y, class_weights=w)),
            (logits, int_labels, class_weights),
        ),
        Case(
            "distillation_loss (T=2, forward KL)", "<= 0.8x, temp <= 0.5x",
            "T**2 * optax.kl_divergence(log_softmax(s / T), softmax(t / T))",
            value_and_grad_of_mean(
                lambda s, t: 4.0 * optax.losses.kl_divergence(
                    jax.nn.log_softmax(s / 2.0), jax.nn.softmax(t / 2.0))),
            value_and_grad_of_mean(
                lambda s, t: sj.distillation_loss(s, t, temperature=2.0)),
            (logits, teacher),
        ),
        Case("softmax (forward)", "<= 1.0x", "jax.nn.softmax", jax.nn.softmax, sj.softmax,
             (logits,)),
        Case(
            "softmax (output + vjp)", "<= 1.0x", "jax.nn.softmax",
            output_and_vjp(jax.nn.softmax), output_and_vjp(sj.softmax), (logits, cot),
        ),
        Case(
            "log_softmax (output + vjp)", "<= 1.0x", "jax.nn.log_softmax",
            output_and_vjp(jax.nn.log_softmax), output_and_vjp(sj.log_softmax), (logits, cot),
        ),
        Case(
            "logsumexp (forward + grad)", "<= 1.0x", "jax.nn.logsumexp",
            value_and_grad_of_mean(functools.partial(jax.nn.logsumexp, axis=-1)),
            value_and_grad_of_mean(functools.partial(sj.logsumexp, axis=-1)),
            (logits,),
        ),
        Case(
            "sigmoid_binary_cross_entropy", "", "optax.sigmoid_binary_cross_entropy",
            value_and_grad_of_mean(optax.sigmoid_binary_cross_entropy),
            value_and_grad_of_mean(sj.sigmoid_binary_cross_entropy),
            (logits, bce_labels),
        ),
    ]


def timed_rounds(anchor, cand, args: tuple, repeats: int, rounds: int) -> list[tuple[float, float]]:
    """``(anchor, candidate)`` median seconds for each of ``rounds`` rounds of ``repeats``
    interleaved runs. The order alternates between rounds (anchor first, then candidate
    first), so that neither side always runs right after the other's allocations."""
    out = []
    for r in range(rounds):
        pair = [anchor, cand] if r % 2 == 0 else [cand, anchor]
        t = interleaved_medians(pair, args, repeats)
        out.append((t[0], t[1]) if r % 2 == 0 else (t[1], t[0]))
    return out


def run_cases(cases: list[Case], repeats: int, rounds: int = 1) -> list[dict]:
    rows = []
    for case in cases:
        anchor, anchor_mem = compile_fn(case.anchor, case.args)
        cand, cand_mem = compile_fn(case.candidate, case.args)
        times = timed_rounds(anchor, cand, case.args, repeats, rounds)
        ratios = [c / a for a, c in times]
        rows.append(
            {
                "function": case.name,
                "anchor": case.anchor_name,
                "anchor_ms": 1e3 * statistics.median(a for a, _ in times),
                "ms": 1e3 * statistics.median(c for _, c in times),
                "time_ratio": statistics.median(ratios),
                "ratio_range": (min(ratios), max(ratios)),
                "target": case.target,
                "anchor_temp_mib": anchor_mem / 2**20,
                "temp_mib": cand_mem / 2**20,
            }
        )
        print(f"  measured {case.name}", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| function | anchor | anchor ms | softmax_jax ms | time ratio | ratio range | target"
        " | anchor temp MiB | softmax_jax temp MiB |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        low, high = r["ratio_range"]
        print(
            f"| {r['function']} | {r['anchor']} | {r['anchor_ms']:.1f} | {r['ms']:.1f}"
            f" | {r['time_ratio']:.2f}x | {low:.2f}-{high:.2f} | {r['target']}"
            f" | {r['anchor_temp_mib']:.0f} | {r['temp_mib']:.0f} |"
        )


def _allocator(env: Mapping[str, str]) -> str:
    return "huge pages" if HUGEPAGES in env.get("GLIBC_TUNABLES", "") else "default allocator"


def core_under_other_allocator(args: argparse.Namespace) -> str:
    """The core suite's output from a child process with the other allocator than this one."""
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t and t != HUGEPAGES]
    if _allocator(os.environ) == "default allocator":
        tunables.append(HUGEPAGES)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--suite", "core", "--n", str(args.n),
           "--v", str(args.v), "--repeats", str(args.repeats), "--rounds", str(args.rounds)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout


def _docs_writes(suite: str) -> list[str]:
    return [name for name, (s, _) in DOC_TABLES.items() if suite in (s, "all")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=["core", "fused", "contrastive", "rl", "all"],
                        default="core")
    parser.add_argument("--n", type=int, default=4096, help="examples (rows)")
    parser.add_argument("--v", type=int, default=32000, help="classes (vocabulary)")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved runs per round")
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="core suite: rounds of --repeats runs; the table gives the median ratio and the"
             " range over rounds",
    )
    parser.add_argument(
        "--only", action="append", default=[], metavar="TEXT",
        help="core suite: run only the rows whose function name contains TEXT (repeatable)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="fused suite on small shapes (a smoke test of the tables, not a measurement)",
    )
    parser.add_argument(
        "--hugepages", action="store_true",
        help=f"run with GLIBC_TUNABLES={HUGEPAGES} (transparent huge pages for large buffers)",
    )
    parser.add_argument(
        "--write-docs", action="store_true",
        help="copy this run's tables and a header (date, machine, versions, commit) into"
             " docs/benchmarks.md; a single suite is accepted only where the page's header"
             " names the same machine, versions and commit",
    )
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="the page that --write-docs rewrites (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.write_docs and args.only:
        parser.error("--write-docs copies whole tables; drop --only")
    if args.write_docs and args.quick and args.docs == parser.get_default("docs"):
        parser.error("--quick runs are checks, not measurements: give --docs PATH to write one")
    if args.hugepages and HUGEPAGES not in os.environ.get("GLIBC_TUNABLES", ""):
        # glibc reads its tunables at start-up, so the setting needs a fresh process.
        tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), HUGEPAGES) if t)
        script = str(Path(__file__).resolve())
        rest = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, script, *rest],
                  {**os.environ, "GLIBC_TUNABLES": tunables})

    page_header, output = None, None
    if args.write_docs:
        try:
            page_header = benchmark_docs.check_page(
                args.docs, _docs_writes(args.suite), benchmark_docs.run_header(ROOT))
        except ValueError as err:
            parser.error(str(err))
        output = benchmark_docs.capture_stdout()
    malloc = os.environ.get("GLIBC_TUNABLES") or "default"
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, backend {jax.default_backend()},"
        f" {jax.device_count()} device(s), glibc tunables: {malloc}"
    )
    if args.suite in ("core", "all"):
        print(f"\nCore: forward + gradient, float32, N={args.n}, V={args.v},"
              f" {args.rounds} round(s) of {args.repeats} interleaved runs (medians),"
              f" {_allocator(os.environ)}\n")
        cases = [c for c in core_cases(args.n, args.v, jnp.float32)
                 if not args.only or any(t in c.name for t in args.only)]
        print_table(run_cases(cases, args.repeats, args.rounds))
        if args.write_docs:
            print(core_under_other_allocator(args))
    if args.suite in ("fused", "all"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_fused import run_fused_benchmarks  # noqa: PLC0415  (optional, heavy)

        run_fused_benchmarks(args.repeats, quick=args.quick)
    if args.suite in ("contrastive", "all"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_contrastive import run_contrastive_benchmarks  # noqa: PLC0415

        run_contrastive_benchmarks(min(args.repeats, 5), quick=args.quick,
                                   scale=args.write_docs)
    if args.suite in ("rl", "all"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_rl import run_rl_benchmarks  # noqa: PLC0415

        run_rl_benchmarks(args.repeats, quick=args.quick)
    if page_header is not None and output is not None:
        write_docs(args.docs, output.getvalue(), _docs_writes(args.suite), page_header)


def write_docs(path: Path, output: str, writes: list[str], header: dict[str, str]) -> None:
    """Copies the tables named ``writes`` from the printed ``output`` into ``path``."""
    tables = benchmark_docs.tables_in(output, {n: DOC_TABLES[n][1] for n in writes})
    missing = [n for n in writes if n not in tables]
    if missing:
        sys.exit(f"error: no table for {missing} in the output; {path} is unchanged")
    benchmark_docs.write_page(path, tables, header)
    print(f"\nwrote {len(tables)} tables and the header into {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
