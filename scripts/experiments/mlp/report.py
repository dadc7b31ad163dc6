"""How a run is shown to people and plots: ``metrics.json``, metric arrays, the summary table.

``network2.SGD`` prints the accuracies each epoch and returns the lists; the loop here keeps
the same per-epoch numbers in :attr:`TrainState.history` and these functions format them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from experiments.data import Dataset
from experiments.mlp.config import TrainConfig
from experiments.mlp.state import TrainState

__all__ = ["format_summary", "history_array", "metrics_record"]


def metrics_record(config: TrainConfig, dataset: Dataset, state: TrainState) -> dict[str, Any]:
    """The contents of ``metrics.json``: configuration, dataset and per-epoch metrics."""
    return {
        "cost": config.cost,
        "dataset": dataset.name,
        "config": dataclasses.asdict(config) | {"hidden": list(config.hidden)},
        "epochs_completed": state.epoch,
        **state.history,
    }


def history_array(state: TrainState, key: str) -> np.ndarray:
    """One metric's per-epoch values as a numpy array (for plots and tests)."""
    return np.asarray(state.history[key], dtype=np.float64)


def format_summary(states: dict[str, TrainState]) -> str:
    """A table of runs by cost: test accuracy after epoch 1 and at the end, best, final loss.

    The first-epoch column is where the quadratic cost's slowdown shows. Every column is as
    wide as its widest entry, so a huge loss (a diverging run) cannot run into its neighbour.
    """
    rows = [["cost", "epochs", "acc@1", "final acc", "best acc", "train loss"]]
    for cost, state in states.items():
        h = state.history
        if h["test_accuracy"]:
            acc, loss = h["test_accuracy"], h["train_loss"][-1]
            rows.append([cost, str(state.epoch), f"{acc[0]:.4f}", f"{acc[-1]:.4f}",
                         f"{max(acc):.4f}", f"{loss:.4f}"])
        else:
            rows.append([cost, str(state.epoch), "-", "-", "-", "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )

    lines = [line(row) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
