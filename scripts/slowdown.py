"""The learning-slowdown experiment: one sigmoid neuron, quadratic cost against cross-entropy.

Input 1, target 0, starting at (w, b) = (0.6, 0.9) and (2, 2); the book's learning rates
(0.15 for the quadratic cost, 0.005 for the cross-entropy) and 300 epochs of plain gradient
descent, with gradients from jax.grad through softmax_jax's losses. The book's rates differ
30x, so both costs are also run from (2, 2) at one rate, the quadratic cost's. Writes
DIR/slowdown.json and DIR/slowdown.png and prints a table of each.

    python scripts/slowdown.py --out runs/slowdown
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.cli import require_extras


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/slowdown"), help="output folder")
    parser.add_argument("--epochs", type=int, default=300, help="gradient steps (default 300)")
    parser.add_argument("--eta-quadratic", type=float, default=0.15, help="default 0.15")
    parser.add_argument("--eta-ce", type=float, default=0.005, help="default 0.005")
    args = parser.parse_args(argv)
    if args.epochs < 0:
        parser.error(f"--epochs must be >= 0, got {args.epochs}")
    if not (args.eta_quadratic > 0 and args.eta_ce > 0):
        parser.error("learning rates must be positive")

    require_extras("slowdown.py", ["matplotlib"])
    from experiments.slowdown import format_table, run_slowdown, write_outputs

    settings = [
        (cost, w0, b0, args.eta_quadratic if cost == "quadratic" else args.eta_ce)
        for cost in ("quadratic", "cross_entropy")
        for w0, b0 in ((0.6, 0.9), (2.0, 2.0))
    ]
    runs = run_slowdown(args.epochs, settings)
    same_rate = run_slowdown(args.epochs, [(cost, 2.0, 2.0, args.eta_quadratic)
                                           for cost in ("quadratic", "cross_entropy")])
    try:
        json_path, png_path = write_outputs(runs, args.out, same_rate)
    except OSError as exc:
        print(f"slowdown.py: error: cannot write to {args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    print("The book's rates (they differ, so compare the shapes):")
    print(format_table(runs))
    print(f"\nThe same rate, eta {args.eta_quadratic:g}, from (2, 2):")
    print(format_table(same_rate))
    print(f"\nwrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
