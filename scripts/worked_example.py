"""Prints the notes' worked example: softmax of [2, 3, 4] and the cross-entropy gradient a - y.

    python scripts/worked_example.py
    python scripts/worked_example.py --logits 1 2 3 4 --label 0
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--logits", type=float, nargs="+", default=[2.0, 3.0, 4.0], help="default: 2 3 4"
    )
    parser.add_argument(
        "--label", type=int, default=1, help="index of the true class (default: 1, the second)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.label < len(args.logits):
        parser.error(f"--label must be in [0, {len(args.logits)}), got {args.label}")

    from experiments.worked_example import compute, report

    print(report(compute(tuple(args.logits), args.label)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
