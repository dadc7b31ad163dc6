"""How a run is shown to people and plots: ``metrics.json``, metric arrays, the summary table.

``network2.SGD`` prints the accuracies each epoch and returns the lists; the loop here keeps
the same per-epoch numbers in :attr:`TrainState.history` and these functions format them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from softmax_jax.experiments.data import Dataset
from softmax_jax.experiments.mlp.config import TrainConfig
from softmax_jax.experiments.mlp.state import TrainState

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

    The first-epoch column is where the quadratic cost's slowdown shows.
    """
    head = (
        f"{'cost':<12}{'epochs':>7}{'acc@1':>9}{'final acc':>11}{'best acc':>10}"
        f"{'train loss':>12}"
    )
    lines = [head, "-" * len(head)]
    for cost, state in states.items():
        h = state.history
        if not h["test_accuracy"]:
            lines.append(f"{cost:<12}{state.epoch:>7}{'-':>9}{'-':>11}{'-':>10}{'-':>12}")
            continue
        lines.append(
            f"{cost:<12}{state.epoch:>7}{h['test_accuracy'][0]:>9.4f}"
            f"{h['test_accuracy'][-1]:>11.4f}{max(h['test_accuracy']):>10.4f}"
            f"{h['train_loss'][-1]:>12.4f}"
        )
    return "\n".join(lines)
