"""Trains a two-tower code search on Python's standard library with a contrastive loss.

The (docstring summary, function code) pairs that ast finds in the interpreter's own standard
library (nothing to download), split by file into training and held-out sets. Each tower is
token embeddings, mean pooling, a small MLP and L2 normalisation; a learned logit scale (and
bias for SigLIP) sets the temperature. The loss is softmax_jax.contrastive_loss (--loss clip)
or softmax_jax.sigmoid_contrastive_loss (--loss siglip), which never materialise the batch x
batch similarity matrix; with --devices the batch is sharded over that many devices
(simulated on CPU) and the loss runs its ring across them inside jax.shard_map.

Examples:

    python scripts/train_retrieval.py                           # CLIP, batch 256
    python scripts/train_retrieval.py --loss siglip --batch-size 4096 --steps 200
    python scripts/train_retrieval.py --devices 8 --out runs/retrieval_ring
    python scripts/train_retrieval.py --max-files 200 --steps 50 --out runs/retrieval_small

Writes DIR/metrics.json (the final held-out recall@1/5/10, their chance values over the same
pool, the mean reciprocal rank, the settings, the data statistics, per-step loss and the
held-out evaluations) and DIR/curves.png (loss and held-out recall over the steps).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments import cli

PROG = "train_retrieval.py"
EXTRAS = ("matplotlib", "tqdm")
#: What a run writes into --out (retrieval.METRICS_NAME and FIGURE_NAME, named here so that
#: the start-up check needs no JAX).
RUN_FILES = ("metrics.json", "curves.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.script_parser(PROG, __doc__)
    data = parser.add_argument_group("data")
    data.add_argument("--vocab", type=int, default=16000,
                      help="most sub-word tokens kept, <unk> included (default 16000)")
    data.add_argument("--source", type=Path, default=None, metavar="DIR",
                      help="read the .py files under DIR instead of the standard library")
    cli.add_split_arguments(data, heldout_every=10)
    data.add_argument("--min-count", type=int, default=3,
                      help="rarer training sub-words become <unk> (default 3)")
    data.add_argument("--max-query-tokens", type=int, default=32, help="default 32")
    data.add_argument("--max-code-tokens", type=int, default=128, help="default 128")
    model = parser.add_argument_group("model and training")
    model.add_argument("--loss", choices=("clip", "siglip"), default="clip", help="default clip")
    model.add_argument("--batch-size", type=int, default=256,
                       help="pairs per step, at most the training pairs (default 256)")
    model.add_argument("--steps", type=int, default=500, help="default 500")
    model.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    model.add_argument("--embed", type=int, default=64,
                       help="token embedding and output width (default 64)")
    model.add_argument("--hidden", type=int, default=128, help="MLP hidden width (default 128)")
    model.add_argument("--seed", type=int, default=0, help="default 0")
    run = cli.add_run_arguments(
        parser, out=Path("runs/retrieval"),
        devices="shard each batch over this many devices and run the loss's ring (on CPU,"
                " simulated); default: one device, no ring")
    cli.add_resume_arguments(run, None)  # no --resume: the trainer keeps no checkpoint
    return parser.parse_args(argv)


def config(args: argparse.Namespace) -> Any:
    """The RetrievalConfig of the flags, then the claim of ``--out``; raises ValueError naming
    the bad setting (:class:`cli.UsageError` for a run already there)."""
    from experiments.retrieval import RetrievalConfig, check_data_settings, make_mesh

    check_data_settings(args.vocab, args.max_files, args.heldout_every, args.max_query_tokens,
                        args.max_code_tokens, args.min_count)
    cfg = RetrievalConfig(
        loss=args.loss, batch_size=args.batch_size, steps=args.steps, learning_rate=args.lr,
        embed_dim=args.embed, hidden=args.hidden,
        eval_every=args.eval_every, seed=args.seed, devices=args.devices,
    )
    if cfg.devices is not None:
        make_mesh(cfg.devices)  # fewer devices than asked for (a GPU, say) is a usage error
    # Last, so that a typo keeps the old run. No --resume: the trainer keeps no checkpoint.
    cli.claim_run_folder(args.out, RUN_FILES, overwrite=args.overwrite)
    return cfg


def run(args: argparse.Namespace, cfg: Any, progress: bool,
        log: Callable[[str], object]) -> str:
    """Loads the pairs, trains, writes the outputs; returns the closing line."""
    import jax

    from experiments import retrieval

    start = time.perf_counter()
    split = retrieval.load_pairs(args.vocab, args.max_files, args.heldout_every,
                                 args.max_query_tokens, args.max_code_tokens, args.source,
                                 args.min_count)
    stats = split.describe()
    load_seconds = time.perf_counter() - start
    log(f"pairs: {stats['train_pairs']:,} training from {stats['train_files']} files,"
        f" {stats['heldout_pairs']:,} held-out from {stats['heldout_files']} files;"
        f" vocabulary {stats['vocab_size']:,} ({load_seconds:.1f} s)")
    if cfg.batch_size > stats["train_pairs"]:
        raise cli.UsageError(f"--batch-size {cfg.batch_size} is more than the"
                         f" {stats['train_pairs']} training pairs")
    devices = cfg.devices or 1
    log(f"{cfg.loss}: batch {cfg.batch_size} on {devices} {jax.default_backend()} device(s)"
        + (" (ring)" if cfg.devices is not None else ""))
    result = retrieval.train(cfg, split, progress=progress, log=log)
    extra = {"data": stats, "backend": jax.default_backend(), "load_seconds": load_seconds}
    retrieval.write_outputs(result, args.out, extra,
                            title=f"{cfg.loss}, batch {cfg.batch_size}, {cfg.steps} steps")
    f = result.final
    return (f"held-out recall@1 {f['recall@1']:.3f} (chance {f['random_recall@1']:.4f}),"
            f" recall@10 {f['recall@10']:.3f} (chance {f['random_recall@10']:.4f})")


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    cli.start_devices(PROG, EXTRAS, args.devices)
    from experiments.lm import CorpusError

    try:
        cfg = config(args)
    except ValueError as exc:
        return cli.fail(PROG, exc, 2)
    progress, log = cli.progress_log(args.no_progress)
    try:
        report = run(args, cfg, progress, log)
    except cli.UsageError as exc:
        return cli.fail(PROG, exc, 2)
    except CorpusError as exc:
        return cli.fail(PROG, exc, 1)
    except OSError as exc:
        return cli.output_error(PROG, exc, args.out)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; nothing written to {args.out}", file=sys.stderr)
        return 130
    print(report)
    print(f"wrote {args.out}/metrics.json and curves.png; done in"
          f" {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
