"""Plots of the next-token experiments: one run's losses, and the distillation comparison."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from experiments.lm.loop import TrainResult

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


def _heldout_curve(ax: Any, result: TrainResult, color: str, label: str) -> None:
    ax.plot([e["step"] for e in result.evals], [e["heldout_loss"] for e in result.evals],
            "o-", color=color, ms=3, label=label)


def plot_losses(result: TrainResult, path: str | Path, title: str = "",
                unigram_perplexity: float | None = None) -> None:
    """Training loss per step (raw and smoothed) and held-out loss, in nats, as a PNG; with
    ``unigram_perplexity``, the unigram baseline's held-out loss (its logarithm) as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _train_curve(ax, result, "tab:blue", "train")
    _heldout_curve(ax, result, "tab:orange", "held-out")
    if unigram_perplexity is not None:
        ax.axhline(np.log(unigram_perplexity), color="gray", ls="--", lw=1,
                   label=f"unigram baseline, held-out (perplexity {unigram_perplexity:.1f})")
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
    """Both students measured alike: held-out cross-entropy of the corpus labels, whatever
    objective trained them.

    Left: the interval evaluations (``eval_positions`` each, from the first step after 0,
    where both students still share their initial parameters), each run's final evaluation
    (``final_eval_positions``, the number in the legend) as a star, and the teacher's final
    value. Right: the distilled student's held-out cross-entropy minus the hard-label
    student's at each evaluation (below 0: distillation is ahead).
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = ("tab:blue", "tab:green", "tab:red", "tab:purple")
    curves = {}
    for (name, result), color in zip(students.items(), colors, strict=False):
        evals = [e for e in result.evals if e["step"] > 0]
        curves[name] = {e["step"]: e["heldout_loss"] for e in evals}
        positions = result.config.eval_positions
        left.plot(list(curves[name]), list(curves[name].values()), "o-", color=color, ms=3,
                  label=f"{name}, every {result.config.eval_every} steps ({positions} positions)")
        final = result.final
        left.plot([result.history[-1]["step"] if result.history else 0], [final["loss"]], "*",
                  color=color, ms=12, label=f"{name}, final: {final['loss']:.3f} nats, perplexity"
                  f" {final['perplexity']:.1f} ({final['positions']} positions)")
    left.axhline(teacher_loss, color="black", ls="--", lw=1,
                 label=f"teacher, final: {teacher_loss:.3f} nats, perplexity"
                       f" {np.exp(teacher_loss):.1f}")
    left.set_title("held-out cross-entropy of the labels")
    left.set_ylabel("nats per token")
    names = list(curves)
    if len(names) == 2:
        a, b = (curves[n] for n in names)
        steps = sorted(set(a) & set(b))
        right.plot(steps, [b[s] - a[s] for s in steps], "o-", color="tab:gray", ms=3)
        right.axhline(0.0, color="black", lw=0.8)
        right.set_title(f"{names[1]} minus {names[0]}, held-out")
        right.set_ylabel("difference, nats per token")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    left.legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)
