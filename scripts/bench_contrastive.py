"""The contrastive losses (CLIP, SigLIP) against their materialised compositions.

Every row computes the value and the gradients for ``x``, ``y`` and the logit scale (and,
for SigLIP, the bias) of a mean loss over ``N`` pairs of ``D``-wide embeddings, float32:

* materialised CLIP: ``0.5 * (optax CE(z, arange) + optax CE(z.T, arange))`` with
  ``z = s * x @ y.T`` (the integer-label cross-entropy, averaged);
* two fused CE calls: ``linear_softmax_cross_entropy`` once per direction (rows of ``z``
  from ``s * x`` against ``y.T``, columns from ``s * y`` against ``x.T``);
* materialised SigLIP: ``optax.sigmoid_binary_cross_entropy(z + b, eye).sum(1).mean()``;
* softmax_jax: ``contrastive_loss`` and ``sigmoid_contrastive_loss``.

Memory is ``memory_analysis()``'s temporaries of the compiled ``value_and_grad`` (compiled
only, never run, so sizes the machine cannot hold still get a figure); time the median of
interleaved runs. ``--scale`` also runs the losses at ``N = 65536``; the ring table compiles
the losses inside ``jax.shard_map`` over 8 simulated CPU devices (a subprocess with
``--xla_force_host_platform_device_count=8``) and reports the temporaries per device.

    python scripts/benchmark.py --suite contrastive           # the target tables
    python scripts/bench_contrastive.py --quick               # small shapes (a smoke test)
    python scripts/bench_contrastive.py --scale --repeats 3   # plus N = 65536
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import softmax_jax as sj
from experiments.timing import compile_fn, interleaved_medians, max_rel_err, mib

MEMORY_TARGET = 1 / 20  # fused temporaries / materialised temporaries at N = 16384
TIME_TARGETS = {"clip_materialised": 1.2, "clip_two_ce": 0.7, "siglip_materialised": 1.0}
RING_DEVICES = 8
SCALE, BIAS = 10.0, -5.0


def _arange(n: int) -> jax.Array:
    return jnp.arange(n, dtype=jnp.int32)


def clip_materialised(x, y, s):
    z = s * x @ y.T
    lab = _arange(x.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(z, lab).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(z.T, lab).mean())


def clip_two_ce(x, y, s):
    lab = _arange(x.shape[0])
    rows = sj.linear_softmax_cross_entropy(s * x, y.T, lab)
    cols = sj.linear_softmax_cross_entropy(s * y, x.T, lab)
    return 0.5 * (rows + cols)


def clip_fused(x, y, s):
    return sj.contrastive_loss(x, y, logit_scale=s)


def siglip_materialised(x, y, s, b):
    z = s * x @ y.T + b
    return optax.sigmoid_binary_cross_entropy(z, jnp.eye(x.shape[0], dtype=z.dtype)
                                              ).sum(1).mean()


def siglip_fused(x, y, s, b):
    return sj.sigmoid_contrastive_loss(x, y, logit_scale=s, logit_bias=b)


def _vg(loss: Callable, nargs: int) -> Callable:
    return jax.value_and_grad(loss, argnums=tuple(range(nargs)))


def _inputs(n: int, d: int, abstract: bool = False) -> tuple:
    if abstract:
        spec = jax.ShapeDtypeStruct((n, d), jnp.float32)
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        return spec, spec, scalar, scalar
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (n, d))
    y = x + 0.5 * jax.random.normal(ky, (n, d))
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    y = y / jnp.linalg.norm(y, axis=1, keepdims=True)
    return x, y, jnp.float32(SCALE), jnp.float32(BIAS)


def memory_rows(n: int, d: int) -> list[dict]:
    """Temporaries of the compiled ``value_and_grad`` (compile only)."""
    args = _inputs(n, d, abstract=True)
    rows = []
    for name, anchor, fused, nargs in (("CLIP", clip_materialised, clip_fused, 3),
                                       ("SigLIP", siglip_materialised, siglip_fused, 4)):
        _, t_anchor = compile_fn(_vg(anchor, nargs), args[:nargs])
        _, t_fused = compile_fn(_vg(fused, nargs), args[:nargs])
        rows.append({"loss": name, "n": n, "d": d, "anchor_mib": mib(t_anchor),
                     "fused_mib": mib(t_fused), "ratio": t_fused / t_anchor})
    return rows


def time_rows(n: int, d: int, repeats: int) -> list[dict]:
    """Interleaved medians of ``value_and_grad``, with the largest relative error of the
    fused value and gradients against the materialised ones."""
    args = _inputs(n, d)
    groups = (("CLIP", 3, [("clip_materialised", clip_materialised),
                           ("clip_two_ce", clip_two_ce)], clip_fused),
              ("SigLIP", 4, [("siglip_materialised", siglip_materialised)], siglip_fused))
    rows = []
    for name, nargs, anchors, fused in groups:
        a = args[:nargs]
        fns = [compile_fn(_vg(f, nargs), a)[0] for _, f in anchors]
        fused_fn = compile_fn(_vg(fused, nargs), a)[0]
        err = max_rel_err(fused_fn(*a), fns[0](*a))
        times = interleaved_medians([*fns, fused_fn], a, repeats, warmup=1)
        for (key, _), t in zip(anchors, times[:-1], strict=True):
            rows.append({"loss": name, "anchor": key, "anchor_ms": 1e3 * t,
                         "fused_ms": 1e3 * times[-1], "ratio": times[-1] / t,
                         "target": TIME_TARGETS[key], "max_rel_err": err})
    return rows


def scale_rows(n: int, d: int) -> list[dict]:
    """One run (after a warm-up) of the fused losses at a size the materialised form cannot
    hold, with their temporaries."""
    import time  # noqa: PLC0415

    args = _inputs(n, d)
    rows = []
    for name, fused, nargs in (("CLIP", clip_fused, 3), ("SigLIP", siglip_fused, 4)):
        fn, temp = compile_fn(_vg(fused, nargs), args[:nargs])
        jax.block_until_ready(fn(*args[:nargs]))
        t0 = time.perf_counter()
        value, _ = jax.block_until_ready(fn(*args[:nargs]))
        rows.append({"loss": name, "n": n, "d": d, "s": time.perf_counter() - t0,
                     "fused_mib": mib(temp), "value": float(value)})
    return rows


def ring_temps(n: int, d: int) -> list[dict]:
    """Per-device temporaries inside ``jax.shard_map`` over the simulated devices (run in
    this process only when it has them; see :func:`ring_rows`)."""
    from jax.sharding import Mesh  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    mesh = Mesh(jax.devices()[:RING_DEVICES], ("d",))
    args = _inputs(n, d, abstract=True)
    rows = []
    for name, fused, nargs in (("CLIP", clip_fused, 3), ("SigLIP", siglip_fused, 4)):
        def sharded(*a, fused=fused, nargs=nargs):
            kw = {"logit_scale": a[2]} | ({"logit_bias": a[3]} if nargs == 4 else {})
            loss = sj.contrastive_loss if nargs == 3 else sj.sigmoid_contrastive_loss
            return jax.shard_map(lambda u, v: loss(u, v, axis_name="d", **kw), mesh=mesh,
                                 in_specs=(P("d"), P("d")), out_specs=P())(a[0], a[1])
        _, temp = compile_fn(_vg(sharded, nargs), args[:nargs])
        _, single = compile_fn(_vg(fused, nargs), args[:nargs])
        # An SPMD program's memory analysis is per device already.
        rows.append({"loss": name, "n": n, "d": d, "devices": RING_DEVICES,
                     "per_device_mib": mib(temp), "single_mib": mib(single)})
    return rows


def ring_rows(n: int, d: int) -> list[dict]:
    """:func:`ring_temps` in a subprocess with 8 simulated CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={RING_DEVICES}",
               JAX_PLATFORMS="cpu")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, __file__, "--ring-child", str(n), str(d)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print(title: str, header: str, lines: list[str]) -> None:
    print(f"\n{title}\n")
    cols = header.split("|")
    print("|" + "|".join(cols) + "|")
    print("|" + "|".join("---" for _ in cols) + "|")
    for line in lines:
        print(line)


def run_contrastive_benchmarks(repeats: int = 5, quick: bool = False,
                               scale: bool = False) -> dict[str, list[dict]]:
    d = 32 if quick else 256
    n_mem, n_time, n_scale = (512, 256, 1024) if quick else (16384, 8192, 65536)
    out: dict[str, list[dict]] = {"memory": memory_rows(n_mem, d)}
    _print(f"Contrastive memory: value_and_grad temporaries, N = M = {n_mem}, D = {d}, f32"
           f" (compile only)", " loss | materialised MiB | softmax_jax MiB | ratio | target ",
           [f"| {r['loss']} | {r['anchor_mib']:.0f} | {r['fused_mib']:.1f} |"
            f" {r['ratio']:.3f} | <= {MEMORY_TARGET:.2f} "
            f"{'met' if r['ratio'] <= MEMORY_TARGET else 'MISSED'} |" for r in out["memory"]])
    out["time"] = time_rows(n_time, d, repeats)
    _print(f"Contrastive time: value_and_grad, N = M = {n_time}, D = {d}, f32, median of"
           f" {repeats} interleaved runs",
           " loss | anchor | anchor ms | softmax_jax ms | ratio | target | max rel err ",
           [f"| {r['loss']} | {r['anchor']} | {r['anchor_ms']:.0f} | {r['fused_ms']:.0f} |"
            f" {r['ratio']:.2f}x | <= {r['target']}x "
            f"{'met' if r['ratio'] <= r['target'] else 'MISSED'} | {r['max_rel_err']:.1e} |"
            for r in out["time"]])
    out["ring"] = ring_rows(n_mem, d)
    _print(f"Contrastive ring: temporaries per device, {RING_DEVICES} simulated devices,"
           f" global N = {n_mem}, D = {d} (compile only)",
           " loss | one device MiB | per device MiB (ring) ",
           [f"| {r['loss']} | {r['single_mib']:.1f} | {r['per_device_mib']:.1f} |"
            for r in out["ring"]])
    if scale:
        out["scale"] = scale_rows(n_scale, d)
        _print(f"Contrastive scale: value_and_grad at N = M = {n_scale}, D = {d}, f32",
               " loss | time s | temporaries MiB ",
               [f"| {r['loss']} | {r['s']:.1f} | {r['fused_mib']:.1f} |"
                for r in out["scale"]])
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--ring-child":
        print(json.dumps(ring_temps(int(argv[1]), int(argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    parser.add_argument("--scale", action="store_true", help="also N = 65536")
    a = parser.parse_args(argv)
    if a.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {a.repeats}")
    run_contrastive_benchmarks(a.repeats, a.quick, a.scale)


if __name__ == "__main__":
    main()
