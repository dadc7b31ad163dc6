"""Plots of the next-token experiments: one run's losses, and the distillation comparison."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from softmax_jax.experiments.lm.loop import TrainResult

__all__ = ["plot_distillation", "plot_losses"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _train_curve(ax: Any, result: TrainResult, color: str, label: str) -> None:
    """Per-step training loss, faint, and its moving average when there are enough steps."""
    steps = [h["step"] for h in result.history]
    losses = np.array([h["train_loss"] for h in result.history])
    if not len(losses):
        return
    ax.plot(steps, losses, color=color, alpha=0.3, lw=0.8, label=f"{label} (per step)")
    width = max(1, min(25, len(losses) // 10))
    if width > 1:
        smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
        centre = np.asarray(steps[width // 2 : width // 2 + len(smooth)])
        ax.plot(centre, smooth, color=color, lw=1.5,
                label=f"{label} ({width}-step moving average)")


def _heldout_curve(ax: Any, result: TrainResult, color: str, label: str,
                   skip_start: bool = False) -> None:
    evals = [e for e in result.evals if not (skip_start and e["step"] == 0)]
    ax.plot([e["step"] for e in evals], [e["heldout_loss"] for e in evals],
            "o-", color=color, ms=3, label=label)


def plot_losses(result: TrainResult, path: str | Path, title: str = "") -> None:
    """Training loss per step (raw and smoothed) and held-out loss, in nats, as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _train_curve(ax, result, "tab:blue", "train")
    _heldout_curve(ax, result, "tab:orange", "held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ppl = result.final["perplexity"]
    ax.set_title(title or f"stdlib next-token model, held-out perplexity {ppl:.1f}")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_distillation(
    students: Mapping[str, TrainResult],
    teacher_loss: float,
    path: str | Path,
    title: str = "",
) -> None:
    """Left: each student's training objective per step (the two objectives differ, so only
    their shapes compare). Right: held-out cross-entropy of each student against the
    teacher's final value, which is the comparison that counts."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = ("tab:blue", "tab:green", "tab:red", "tab:purple")
    for (name, result), color in zip(students.items(), colors, strict=False):
        _train_curve(left, result, color, name)
        ppl = result.final["perplexity"]
        # Step 0 (log V for the zero head) would flatten the gap between the students.
        _heldout_curve(right, result, color, f"{name} (final perplexity {ppl:.1f})",
                       skip_start=True)
    right.axhline(teacher_loss, color="black", ls="--", lw=1,
                  label=f"teacher (perplexity {np.exp(teacher_loss):.1f})")
    left.set_title("training objective")
    right.set_title("held-out cross-entropy (after step 0)")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.set_ylabel("nats per token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)
