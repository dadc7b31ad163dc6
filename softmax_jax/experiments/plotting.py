"""Figures for the training scripts (matplotlib, headless ``Agg`` backend).

matplotlib is an optional extra, so it is imported inside the functions; selecting ``Agg``
first means the scripts run the same on a laptop, over SSH and in CI, with no display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_compare", "plot_curves", "plot_slowdown"]

PathLike = str | os.PathLike[str]

# One colour per cost, shared by every figure, so a reader learns it once.
COST_COLORS = {"softmax_ce": "C0", "sigmoid_ce": "C2", "quadratic": "C3", "cross_entropy": "C0"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: PathLike) -> None:
    # Write-then-rename, like every other output: a viewer never opens half a PNG.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def plot_curves(
    histories: Mapping[str, Mapping[str, Sequence[float]]],
    path: PathLike,
    title: str | None = None,
) -> None:
    """Test accuracy and training loss against epoch, one line per run.

    Args:
      histories: run label (a cost name) -> per-epoch metrics with ``test_accuracy`` and
        ``train_loss``.
      path: the PNG to write.
      title: an optional figure title (e.g. the hyper-parameters).
    """
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for label, h in histories.items():
        epochs = range(1, len(h["test_accuracy"]) + 1)
        color = COST_COLORS.get(label)
        ax_acc.plot(epochs, h["test_accuracy"], marker=".", color=color, label=label)
        ax_loss.plot(epochs, h["train_loss"], marker=".", color=color, label=label)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss (own cost)", title="Training loss")
    ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def plot_compare(
    histories: Mapping[str, Mapping[str, Sequence[float]]],
    path: PathLike,
    title: str | None = None,
) -> None:
    """The ``--compare`` figure: the three costs' curves on shared axes.

    Losses of different costs are not on a common scale, so the left panel (test accuracy)
    is the comparison; the right one shows each cost's own descent.
    """
    plot_curves(histories, path, title)


def plot_slowdown(runs: Sequence[Mapping[str, Any]], path: PathLike) -> None:
    """Cost (left) and output (right) against epoch for the single-neuron runs.

    Args:
      runs: dicts with ``cost``, ``w0``, ``b0``, ``eta``, ``costs`` and ``outputs``, as in
        ``slowdown.json``.
      path: the PNG to write.
    """
    plt = _pyplot()
    fig, (ax_cost, ax_out) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    # Colour tells the cost, line style the starting point.
    starts = list(dict.fromkeys((run["w0"], run["b0"]) for run in runs))
    for run in runs:
        label = f"{run['cost']}, (w, b) = ({run['w0']:g}, {run['b0']:g}), eta {run['eta']:g}"
        style = ("--", "-", ":", "-.")[starts.index((run["w0"], run["b0"])) % 4]
        color = COST_COLORS.get(run["cost"])
        ax_cost.plot(run["costs"], style, color=color, label=label)
        ax_out.plot(run["outputs"], style, color=color, label=label)
    ax_cost.set(xlabel="epoch", ylabel="cost C", title="Cost of the single neuron")
    ax_out.set(xlabel="epoch", ylabel="output a (target 0)", title="Output of the single neuron")
    ax_out.set_ylim(0, 1)
    for ax in (ax_cost, ax_out):
        ax.grid(alpha=0.3)
    ax_cost.legend(fontsize="small")
    _save(fig, path)
    plt.close(fig)
