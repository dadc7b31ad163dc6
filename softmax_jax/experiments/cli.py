"""Command-line flags shared by the language-model scripts (``scripts/train_lm.py`` and
``scripts/distill_lm.py``): one definition of the "run" group, so the two cannot drift."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_run_arguments(
    parser: argparse.ArgumentParser, *, eval_positions: int, final_eval_positions: int,
    out: Path,
) -> argparse._ArgumentGroup:
    """Adds the "run" group (devices, evaluation sizes, output folder, progress bar) with
    the given defaults and returns it, for a script to add its own run flags."""
    run = parser.add_argument_group("run")
    run.add_argument("--devices", type=int, default=None,
                     help="data-parallel devices (default: all); on CPU this many host"
                          " devices are simulated")
    run.add_argument("--eval-every", type=int, default=50,
                     help="held-out evaluation interval in steps (default 50)")
    run.add_argument("--eval-positions", type=int, default=eval_positions,
                     help=f"held-out positions per interval evaluation (default {eval_positions})")
    run.add_argument("--final-eval-positions", type=int, default=final_eval_positions,
                     help="held-out positions for the final perplexities"
                          f" (default {final_eval_positions})")
    run.add_argument("--out", type=Path, default=out, help=f"default {out}")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return run


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (``parser.error``) for the data and run flags both scripts share."""
    if args.devices is not None and args.devices < 1:
        parser.error(f"--devices must be positive, got {args.devices}")
    if args.max_files is not None and args.max_files < 2:
        parser.error(f"--max-files must be at least 2, got {args.max_files}")
    if args.heldout_every < 2:
        parser.error(f"--heldout-every must be at least 2, got {args.heldout_every}")
    if args.devices is not None and args.batch_size % args.devices:
        parser.error(
            f"--batch-size {args.batch_size} must be divisible by --devices {args.devices}"
        )
