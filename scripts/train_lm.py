"""Trains a small next-token model on Python's standard library with the fused 32k-vocab head.

Word-level tokens of the interpreter's own .py files (nothing to download), Bengio's neural
language model (context embeddings -> GELU layer -> softmax over the vocabulary), and
softmax_jax's linear_softmax_cross_entropy as the output layer, so the batch x vocab logits
are never materialised. Batches are sharded over the local devices with NamedSharding under
jax.jit (data parallel).

Examples:

    python scripts/train_lm.py                          # 32k vocab, 300 steps, all devices
    python scripts/train_lm.py --devices 8              # 8 simulated CPU devices
    python scripts/train_lm.py --steps 50 --vocab 8000 --max-files 200 --out runs/lm_small
    python scripts/train_lm.py --steps 600 --resume     # continue runs/lm to step 600
    python scripts/train_lm.py --overwrite              # start runs/lm over

Writes DIR/metrics.json (settings, corpus statistics, per-step loss, held-out evaluations,
final held-out perplexity and the unigram baseline), DIR/loss.png and DIR/checkpoint.npz
(parameters, Adam state and batch generator, rewritten atomically at every evaluation; a
resumed run continues bit-for-bit, and distill_lm.py can take it as its teacher). A folder
that already holds a run is refused unless --resume or --overwrite says what to do with it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments import cli

RUN_FILES = ("checkpoint.npz", "metrics.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.script_parser("train_lm.py", __doc__)
    data = parser.add_argument_group("data")
    data.add_argument("--vocab", type=int, default=32000,
                      help="vocabulary size including <unk> (default 32000)")
    cli.add_split_arguments(data, heldout_every=20)
    model = parser.add_argument_group("model and training")
    model.add_argument("--context", type=int, default=8, help="previous tokens seen (default 8)")
    model.add_argument("--embed", type=int, default=64, help="embedding width (default 64)")
    model.add_argument("--hidden", type=int, default=256,
                       help="width of the state fed to the head (default 256)")
    model.add_argument("--batch-size", type=int, default=1024,
                       help="tokens per step, split over the devices (default 1024)")
    model.add_argument("--steps", type=int, default=300, help="default 300")
    model.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    model.add_argument("--label-smoothing", type=float, default=0.0, help="default 0")
    model.add_argument("--z-loss", type=float, default=0.0, help="default 0")
    model.add_argument("--seed", type=int, default=0, help="default 0")
    run = cli.add_run_arguments(parser, eval_positions=8192, final_eval_positions=65536,
                            out=Path("runs/lm"))
    cli.add_resume_arguments(run, "--steps")
    args = parser.parse_args(argv)
    cli.check_common_arguments(parser, args)
    return args


def _settings(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(LMConfig, Mesh)`` from the flags, then the claim of ``--out``; raises ValueError for
    settings that cannot run (:class:`cli.UsageError` for a run already there)."""
    from experiments import lm

    cfg = lm.LMConfig(
        vocab_size=args.vocab,
        context=args.context,
        embed_dim=args.embed,
        hidden=args.hidden,
        batch_size=args.batch_size,
        steps=args.steps,
        learning_rate=args.lr,
        label_smoothing=args.label_smoothing,
        z_loss=args.z_loss,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_positions=args.eval_positions,
        final_eval_positions=args.final_eval_positions,
    )
    mesh = cli.data_mesh(args.devices, cfg.batch_size)
    cli.claim_run_folder(args.out, RUN_FILES, resume=args.resume, overwrite=args.overwrite)
    return cfg, mesh


def _corpus(args: argparse.Namespace, log: Callable[[str], object]) -> Any:
    """The encoded corpus; raises CorpusError when it is missing or too small for --vocab."""
    from experiments import lm

    corpus = lm.load_corpus(args.vocab, args.max_files, args.heldout_every)
    stats = corpus.describe()
    if stats["vocab_size"] < args.vocab:
        raise lm.CorpusError(
            f"the training text has only {stats['vocab_size'] - 1} distinct tokens, fewer"
            f" than --vocab {args.vocab} - 1; lower --vocab"
        )
    log(
        f"stdlib corpus: {stats['train_tokens']:,} training tokens from {stats['train_files']}"
        f" files, {stats['heldout_tokens']:,} held-out tokens from {stats['heldout_files']}"
        f" files; vocabulary {stats['vocab_size']:,} (held-out <unk> rate"
        f" {stats['heldout_unk_rate']:.1%})"
    )
    return corpus


def run(args: argparse.Namespace, cfg: Any, mesh: Any, progress: bool,
        log: Callable[[str], object]) -> str:
    """Loads the corpus, trains (or resumes), writes the outputs; returns the closing line."""
    import jax

    from experiments import lm
    from experiments.checkpoint import atomic_write_json

    corpus = _corpus(args, log)
    log(
        f"{mesh.size} {jax.default_backend()} device(s), batch {cfg.batch_size}"
        f" ({cfg.batch_size // mesh.size} per device), head {cfg.hidden} x {cfg.vocab_size}"
    )
    unigram = lm.unigram_perplexity(corpus)
    result = lm.train(cfg, corpus, mesh, out_dir=args.out, resume=args.resume,
                      progress=progress, log=log)
    summary = result.summary() | {
        "corpus": corpus.describe(),
        "unigram_heldout_perplexity": unigram,
        "backend": jax.default_backend(),
    }
    atomic_write_json(args.out / "metrics.json", summary)
    lm.plot_losses(result, args.out / "loss.png", unigram_perplexity=unigram)
    return (
        f"held-out perplexity {result.final['perplexity']:.2f}"
        f" (unigram baseline {unigram:.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    cli.start_devices("train_lm.py", ["matplotlib", "tqdm"], args.devices)
    from experiments import lm
    from experiments.checkpoint import CheckpointError

    try:
        cfg, mesh = _settings(args)
    except ValueError as exc:
        return cli.fail("train_lm.py", exc, 2)
    progress, log = cli.progress_log(args.no_progress)
    try:
        report = run(args, cfg, mesh, progress, log)
    except (lm.CorpusError, CheckpointError) as exc:
        return cli.fail("train_lm.py", exc, 1)
    except OSError as exc:
        return cli.output_error("train_lm.py", exc, args.out)
    except KeyboardInterrupt:
        step = lm.saved_step(args.out / lm.CHECKPOINT_NAME)
        saved = (f"step {step} is saved in {args.out / lm.CHECKPOINT_NAME}" if step is not None
                 else "nothing was saved (no evaluation finished)")
        print(f"\ntrain_lm.py: interrupted; {saved}; continue with:"
              f" {cli.resume_command('train_lm.py', argv)}", file=sys.stderr)
        return 130
    print(report)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.out}/metrics.json, loss.png and checkpoint.npz; done in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
