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


def _neuron_outputs(ax: Any, runs: Sequence[Mapping[str, Any]], styles: Mapping[Any, str],
                    **legend: Any) -> None:
    """Output against epoch, colour by cost, line style by starting point, rate in the label."""
    for run in runs:
        label = f"{run['cost']}, eta {run['eta']:g}, from (w, b) = ({run['w0']:g}, {run['b0']:g})"
        style = styles.get((run["w0"], run["b0"]), "-.")
        ax.plot(run["outputs"], style, color=COST_COLORS.get(run["cost"]), label=label)
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set(xlabel="epoch", ylabel="output a (target 0)", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", **legend)


def plot_slowdown(
    runs: Sequence[Mapping[str, Any]],
    path: PathLike,
    same_rate: Sequence[Mapping[str, Any]] = (),
) -> None:
    """The single neuron's output (the quantity the argument is about) against epoch.

    Left: ``runs``, the book's settings, whose rates differ (stated in the title and the
    legend). Right, when given: ``same_rate``, the costs at one rate, each run's first epoch
    below 0.5 marked.

    Args:
      runs: dicts with ``cost``, ``w0``, ``b0``, ``eta`` and ``outputs``, as in
        ``slowdown.json``.
      path: the PNG to write.
      same_rate: runs at one shared rate, with ``first_below_half`` (an epoch or ``None``).
    """
    plt = _pyplot()
    panels = 2 if same_rate else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), layout="constrained",
                             squeeze=False)
    rates = ", ".join(dict.fromkeys(f"{r['cost']} {r['eta']:g}" for r in runs))
    # One line style per starting point, the same in both panels.
    starts = dict.fromkeys((r["w0"], r["b0"]) for r in (*runs, *same_rate))
    styles = dict(zip(starts, ("--", "-", ":"), strict=False))
    _neuron_outputs(axes[0, 0], runs, styles, loc="lower left")
    axes[0, 0].set_title(f"The book's rates differ: {rates}", fontsize="medium")
    if same_rate:
        ax = axes[0, 1]
        # Between the quadratic plateau and the crossing marks.
        _neuron_outputs(ax, same_rate, styles, loc="upper left", bbox_to_anchor=(0.1, 0.9))
        last = len(same_rate[0]["outputs"]) - 1
        for run in same_rate:
            epoch = run["first_below_half"]
            if epoch is not None:
                # Labels of late crossings go to the left of their point, inside the axes.
                late = epoch > last / 2
                ax.plot([epoch], [run["outputs"][epoch]], "o", color=COST_COLORS.get(run["cost"]))
                ax.annotate(f"{run['cost']}: a < 0.5 at epoch {epoch}",
                            (epoch, run["outputs"][epoch]), xytext=(-8, 8) if late else (8, -14),
                            textcoords="offset points", ha="right" if late else "left",
                            fontsize="small")
        shared = ", ".join(dict.fromkeys(f"{r['eta']:g}" for r in same_rate))
        ax.set_title(f"The same rate, eta {shared}", fontsize="medium")
    fig.suptitle("One sigmoid neuron, input 1, target 0: output against epoch")
    _save(fig, path)
    plt.close(fig)
