"""Fused linear + softmax cross-entropy against the unfused optax formula: memory and time.

Both sides compute the value and the gradients for ``x`` and ``w`` of the mean loss over
``N`` tokens with a ``[D, V]`` output layer, in float32:

* anchor: ``optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()``, which
  materialises the ``N x V`` logits and their gradient;
* candidate: ``softmax_jax.fused.linear_softmax_cross_entropy(x, w, labels)``.

Memory is XLA's own account of each compiled program, ``memory_analysis()``'s
``temp_size_in_bytes``: the buffers allocated beyond arguments and outputs. Time is the median
wall time of interleaved runs (anchor, candidate, anchor, ...), so that drift in machine load
hits both alike. Ratios below 1 mean the fused loss is smaller or faster.

    python scripts/bench_fused.py                # the two target cases, 15 repeats
    python scripts/bench_fused.py --repeats 5
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import optax
from benchmark import compile_fn, interleaved_medians  # the same timing for every table

from softmax_jax.fused import linear_softmax_cross_entropy

# (N, D, V, temp-memory target as a fraction of the anchor, time target as a ratio or None)
CASES: list[tuple[int, int, int, float, float | None]] = [
    (4096, 256, 32000, 1 / 20, 0.9),
    (2048, 128, 131072, 1 / 16, None),
]


def _anchor(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()


def _fused(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
    return linear_softmax_cross_entropy(x, w, labels)


def _inputs(n: int, d: int, v: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (n, d), jnp.float32)
    w = jax.random.normal(kw, (d, v), jnp.float32) / jnp.sqrt(d)
    labels = jax.random.randint(ky, (n,), 0, v)
    return x, w, labels


def run_fused_benchmarks(repeats: int = 15) -> list[dict]:
    """Measures the issue's two target cases and prints a markdown table.

    Returns one dict per case with the sizes, both temp sizes (MiB), both median times (ms),
    the ratios, the targets and whether each was met (None where there is no target).
    """
    rows = []
    for n, d, v, mem_target, time_target in CASES:
        args = _inputs(n, d, v)
        anchor, anchor_temp = compile_fn(jax.value_and_grad(_anchor, argnums=(0, 1)), args)
        fused, fused_temp = compile_fn(jax.value_and_grad(_fused, argnums=(0, 1)), args)
        # Same numbers on both sides, or the comparison means nothing.
        (la, (dxa, dwa)), (lf, (dxf, dwf)) = anchor(*args), fused(*args)
        err = max(
            float(jnp.abs(la - lf)),
            float(jnp.max(jnp.abs(dxa - dxf)) / jnp.max(jnp.abs(dxa))),
            float(jnp.max(jnp.abs(dwa - dwf)) / jnp.max(jnp.abs(dwa))),
        )
        t_anchor, t_fused = interleaved_medians([anchor, fused], args, repeats, warmup=1)
        mem_ratio = fused_temp / anchor_temp
        time_ratio = t_fused / t_anchor
        rows.append(
            {
                "n": n,
                "d": d,
                "v": v,
                "anchor_temp_mib": anchor_temp / 2**20,
                "fused_temp_mib": fused_temp / 2**20,
                "mem_ratio": mem_ratio,
                "mem_target": mem_target,
                "mem_ok": mem_ratio <= mem_target,
                "anchor_ms": 1e3 * t_anchor,
                "fused_ms": 1e3 * t_fused,
                "time_ratio": time_ratio,
                "time_target": time_target,
                "time_ok": None if time_target is None else time_ratio <= time_target,
                "max_rel_err": err,
            }
        )
        print(f"  measured fused N={n} D={d} V={v}", file=sys.stderr, flush=True)
    print_table(rows, repeats)
    return rows


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else (" (met)" if ok else " (MISSED)")


def print_table(rows: list[dict], repeats: int) -> None:
    print(
        "\nFused linear + softmax cross-entropy, value_and_grad w.r.t. x and w, float32,"
        f" median of {repeats} interleaved runs; anchor: optax on x @ w\n"
    )
    print(
        "| N | D | V | anchor temp MiB | fused temp MiB | temp ratio (target) | anchor ms"
        " | fused ms | time ratio (target) |"
    )
    print("|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for r in rows:
        mem_t = f"1/{round(1 / r['mem_target'])}"
        time_t = "none" if r["time_target"] is None else f"<= {r['time_target']:g}x"
        print(
            f"| {r['n']} | {r['d']} | {r['v']} | {r['anchor_temp_mib']:.0f}"
            f" | {r['fused_temp_mib']:.1f} | 1/{1 / r['mem_ratio']:.0f} ({mem_t})"
            f"{_verdict(r['mem_ok'])} | {r['anchor_ms']:.0f} | {r['fused_ms']:.0f}"
            f" | {r['time_ratio']:.2f}x ({time_t}){_verdict(r['time_ok'])} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, backend {jax.default_backend()},"
        f" {jax.device_count()} device(s)"
    )
    run_fused_benchmarks(args.repeats)


if __name__ == "__main__":
    main()
