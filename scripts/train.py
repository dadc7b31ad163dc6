"""Trains a multilayer perceptron with softmax_jax's costs and optax (the notes' network2.py).

Examples:

    python scripts/train.py                                  # digits, softmax_ce, 30 epochs
    python scripts/train.py --cost quadratic --epochs 10
    python scripts/train.py --compare --out runs/compare     # all three costs, same seed
    python scripts/train.py --dataset mnist --data-dir ~/data/mnist --hidden 100 --l2 5
    python scripts/train.py --epochs 60 --resume             # continue runs/train to epoch 60
    python scripts/train.py --epochs 5 --overwrite           # start runs/train over

Writes DIR/metrics.json, DIR/curves.png and DIR/checkpoint.npz (rewritten after every
epoch); with --compare one such folder per cost plus DIR/compare.png and DIR/compare.json.
A folder that already holds a run is refused unless --resume or --overwrite says what to do
with it. A run whose training loss stops being finite, or grows past 10 times the starting
loss, stops there with an error and keeps the checkpoint of its last good epoch.
The L2 term is Nielsen's 0.5 * l2 / n * sum(w^2) over the weights, added to the loss.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments import cli

COSTS = ("softmax_ce", "sigmoid_ce", "quadratic")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.script_parser("train.py", __doc__)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=("digits", "mnist"), default="digits",
                      help="digits: scikit-learn's 8x8 digits, offline (default); mnist: IDX files")
    data.add_argument("--data-dir", type=Path,
                      help="folder with the four MNIST IDX files (plain or .gz)")
    model = parser.add_argument_group("model and training")
    model.add_argument("--cost", choices=COSTS, default="softmax_ce", help="default softmax_ce")
    model.add_argument("--hidden", type=int, nargs="*", default=[30], metavar="N",
                       help="hidden layer sizes, e.g. --hidden 100 30 (default 30; none: linear)")
    model.add_argument("--epochs", type=int, default=30, help="total epochs (default 30)")
    model.add_argument("--batch-size", type=int, default=10, help="default 10")
    model.add_argument("--eta", type=float, default=0.5, help="learning rate (default 0.5)")
    model.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="default sgd")
    model.add_argument("--l2", type=float, default=0.0, help="L2 strength lambda (default 0)")
    model.add_argument("--seed", type=int, default=0, help="default 0")
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path,
                     help="output folder (default runs/train, or runs/compare with --compare)")
    run.add_argument("--compare", action="store_true",
                     help="train all three costs with the same seed and plot them together")
    cli.add_resume_arguments(run, "--epochs")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.dataset == "mnist" and args.data_dir is None:
        parser.error("--dataset mnist needs --data-dir DIR")
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.out is None:
        args.out = Path("runs/compare" if args.compare else "runs/train")
    run_files = ["checkpoint.npz", "metrics.json"]
    if args.compare:
        run_files = ["compare.json", *(f"{cost}/{name}" for cost in COSTS for name in run_files)]

    from experiments.mlp import TrainConfig

    try:
        args.config = TrainConfig(
            cost=args.cost,
            hidden=tuple(args.hidden),
            epochs=args.epochs,
            batch_size=args.batch_size,
            eta=args.eta,
            optimizer=args.optimizer,
            l2=args.l2,
            seed=args.seed,
        )
        cli.claim_run_folder(args.out, run_files, resume=args.resume, overwrite=args.overwrite)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def run(args: argparse.Namespace) -> None:
    """Loads the data, trains, writes the outputs. Raises DatasetError / CheckpointError."""
    from experiments import mlp
    from experiments.checkpoint import atomic_write_json
    from experiments.data import load_dataset
    from experiments.plotting import plot_compare, plot_curves

    progress, log = cli.progress_log(args.no_progress)
    dataset = load_dataset(args.dataset, args.data_dir)
    log(
        f"{dataset.name}: {len(dataset.y_train)} training and {len(dataset.y_test)} test images"
        f" of {dataset.num_features} pixels"
    )
    config = args.config
    hidden = "-".join(map(str, config.hidden)) or "none"
    title = (
        f"{dataset.name}: hidden {hidden}, batch {config.batch_size}, {config.optimizer}"
        f" eta {config.eta:g}, l2 {config.l2:g}, seed {config.seed}"
    )
    common = {"resume": args.resume, "progress": progress, "log": log}
    if args.compare:
        states = mlp.run_compare(config, dataset, args.out, **common)
        histories = {cost: state.history for cost, state in states.items()}
        plot_compare(histories, args.out / "compare.png", title)
        for cost, state in states.items():
            plot_curves({cost: state.history}, args.out / cost / "curves.png", title)
        atomic_write_json(
            args.out / "compare.json",
            {
                "dataset": dataset.name,
                "config": {k: v for k, v in config.identity().items() if k != "cost"}
                | {"epochs": config.epochs},
                "runs": histories,
            },
        )
        print()
        print(mlp.format_summary(states))
        print(f"\nwrote {args.out}/compare.png, compare.json and one folder per cost")
    else:
        state = mlp.train(config, dataset, out_dir=args.out, **common)
        plot_curves({config.cost: state.history}, args.out / "curves.png", title)
        print()
        print(mlp.format_summary({config.cost: state}))
        if state.epochs_run:
            print(f"\nwrote {args.out}/metrics.json, curves.png and checkpoint.npz")
        else:
            print(f"\nnothing trained: {args.out}/checkpoint.npz is unchanged at epoch"
                  f" {state.epoch}; rewrote metrics.json and curves.png from it")


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    extras = ["matplotlib", "tqdm"] + (["sklearn"] if args.dataset == "digits" else [])
    cli.require_extras("train.py", extras)
    from experiments.checkpoint import CheckpointError
    from experiments.data import DatasetError
    from experiments.mlp import DivergenceError

    try:
        run(args)
    except DivergenceError as exc:
        return cli.fail("train.py", f"{exc}; lower --eta (now {args.eta:g})", 1)
    except (DatasetError, CheckpointError) as exc:
        # Expected failures (bad data, unusable checkpoint): one line, no traceback.
        return cli.fail("train.py", exc, 1)
    except OSError as exc:
        return cli.output_error("train.py", exc, args.out)
    except KeyboardInterrupt:
        print(
            f"\ntrain.py: interrupted; the last finished epoch is saved in {args.out},"
            " continue with --resume",
            file=sys.stderr,
        )
        return 130
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
