"""What a run leaves behind: ``metrics.json`` and the figure of its loss and held-out recall."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from experiments.checkpoint import atomic_write_json
from experiments.plotting import _pyplot, _save
from experiments.retrieval.loop import RunResult

__all__ = ["FIGURE_NAME", "METRICS_NAME", "metrics_record", "plot_run", "write_outputs"]

METRICS_NAME = "metrics.json"
FIGURE_NAME = "curves.png"


def metrics_record(result: RunResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON record: the final held-out metrics at the top level (``recall@1``,
    ``recall@10``, ``random_recall@1``, ...), then the settings and the curves."""
    return {
        **result.final,
        "seconds": result.seconds,
        "config": dataclasses.asdict(result.config),
        **(extra or {}),
        "history": result.history,
        "evals": result.evals,
    }


def plot_run(result: RunResult, path: str | Path, title: str = "") -> None:
    """Training loss per step (left) and held-out recall@1/@10 against chance (right)."""
    plt = _pyplot()
    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    steps = [h["step"] for h in result.history]
    losses = np.array([h["loss"] for h in result.history])
    ax_loss.plot(steps, losses, color="C0", alpha=0.35, lw=0.8, label="per step")
    width = max(1, min(25, len(losses) // 10))
    if width > 1:
        smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
        ax_loss.plot(steps[width // 2 : width // 2 + len(smooth)], smooth, color="C0",
                     label=f"{width}-step moving average")
    ax_loss.set(xlabel="step", ylabel=f"{result.config.loss} loss", title="Training loss")
    at = [e["step"] for e in result.evals]
    for k, color in ((1, "C1"), (10, "C2")):
        ax_rec.plot(at, [e[f"recall@{k}"] for e in result.evals], "o-", ms=3, color=color,
                    label=f"recall@{k}")
        ax_rec.axhline(result.final[f"random_recall@{k}"], color=color, ls=":", lw=1,
                       label=f"chance @{k}")
    ax_rec.set(xlabel="step", ylabel="held-out recall",
               title=f"Held-out retrieval ({result.final['pool']} candidates)")
    ax_rec.set_ylim(0, 1)
    for ax in (ax_loss, ax_rec):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def write_outputs(result: RunResult, out: str | Path, extra: dict[str, Any] | None = None,
                  title: str = "") -> None:
    """Writes ``out/metrics.json`` (atomically) and ``out/curves.png``."""
    out = Path(out)
    atomic_write_json(out / METRICS_NAME, metrics_record(result, extra))
    plot_run(result, out / FIGURE_NAME, title)
