r"""The single-neuron learning-slowdown experiment (Nielsen, *Neural Networks and Deep
Learning*, chapter 3).

One sigmoid neuron :math:`a = \sigma(wx + b)` learns to map the input :math:`x = 1` to the
target :math:`y = 0` by plain gradient descent. With the quadratic cost
:math:`C = \tfrac12 (a - y)^2`,

.. math::
    \frac{\partial C}{\partial w} = (a - y)\,\sigma'(z)\,x ,

and when the neuron starts badly wrong (:math:`a \approx 1`) :math:`\sigma'(z)` is tiny, so it
barely moves for many epochs: the slowdown. With the cross-entropy
:math:`C = -[y \ln a + (1 - y)\ln(1 - a)]` the :math:`\sigma'` cancels,

.. math::
    \frac{\partial C}{\partial w} = (a - y)\,x ,

so the worse the neuron, the faster it learns. The gradients here come from ``jax.grad``
through :func:`softmax_jax.quadratic_cost` (of :func:`softmax_jax.sigmoid`) and
:func:`softmax_jax.sigmoid_binary_cross_entropy`, i.e. from the library's ``custom_vjp`` rules.

The book's settings are the defaults: starts :math:`(w, b) = (0.6, 0.9)` (output about 0.82)
and :math:`(2, 2)` (about 0.98), learning rate 0.15 for the quadratic cost and 0.005 for the
cross-entropy, 300 epochs. The rates differ 30x, so those runs compare only in *shape* (how
early each curve starts to fall): at its small rate the cross-entropy neuron from (2, 2) is
still at 0.78 after 300 epochs. :data:`SAME_RATE_RUNS` adds the comparison at one rate, 0.15,
from (2, 2), where the notes' point shows in the raw speed: the output falls below 0.5 at
epoch 17 with the cross-entropy and at epoch 232 with the quadratic cost.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import softmax_jax as sj
from experiments.checkpoint import atomic_write_json

__all__ = [
    "BOOK_RUNS",
    "NEURON_COSTS",
    "SAME_RATE_RUNS",
    "NeuronRun",
    "format_table",
    "neuron_cost",
    "run_neuron",
    "run_slowdown",
    "write_outputs",
]

NEURON_COSTS = ("quadratic", "cross_entropy")

#: ``(cost, w0, b0, eta)`` of the book's four runs.
BOOK_RUNS: tuple[tuple[str, float, float, float], ...] = (
    ("quadratic", 0.6, 0.9, 0.15),
    ("quadratic", 2.0, 2.0, 0.15),
    ("cross_entropy", 0.6, 0.9, 0.005),
    ("cross_entropy", 2.0, 2.0, 0.005),
)

#: ``(cost, w0, b0, eta)``: both costs from the bad start (2, 2) at the quadratic cost's rate.
SAME_RATE_RUNS: tuple[tuple[str, float, float, float], ...] = (
    ("quadratic", 2.0, 2.0, 0.15),
    ("cross_entropy", 2.0, 2.0, 0.15),
)

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class NeuronRun:
    """One gradient-descent run of the single neuron.

    Attributes:
      cost: ``"quadratic"`` or ``"cross_entropy"``.
      w0, b0: starting weight and bias.
      eta: learning rate.
      outputs: the output :math:`a` at epochs ``0..E`` (``E + 1`` values; epoch 0 is the start).
      costs: the cost at the same epochs.
    """

    cost: str
    w0: float
    b0: float
    eta: float
    outputs: np.ndarray
    costs: np.ndarray

    def first_below_half(self) -> int | None:
        """The first epoch with :math:`a < 0.5` (the neuron on the right side), or ``None``."""
        below = np.flatnonzero(self.outputs < 0.5)
        return int(below[0]) if below.size else None

    def to_json(self) -> dict[str, Any]:
        return {
            "cost": self.cost,
            "w0": self.w0,
            "b0": self.b0,
            "eta": self.eta,
            "outputs": [float(v) for v in self.outputs],
            "costs": [float(v) for v in self.costs],
        }


def neuron_cost(cost: str, w: jax.Array, b: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """The neuron's cost for input ``x`` and target ``y`` (both shape ``(1,)``), a scalar."""
    z = w * x + b
    if cost == "quadratic":
        # quadratic_cost sums over the last axis: the neuron's single output.
        return sj.quadratic_cost(sj.sigmoid(z), y)
    if cost == "cross_entropy":
        return jnp.sum(sj.sigmoid_binary_cross_entropy(z, y))
    raise ValueError(f"cost must be one of {', '.join(NEURON_COSTS)}; got {cost!r}")


@functools.partial(jax.jit, static_argnames=("cost", "epochs"))
def _descend(
    w0: jax.Array,
    b0: jax.Array,
    eta: jax.Array,
    x: jax.Array,
    y: jax.Array,
    *,
    cost: str,
    epochs: int,
) -> tuple[jax.Array, jax.Array]:
    """``epochs`` steps of gradient descent, as one compiled ``lax.scan``; returns the output
    and cost at epochs ``0..epochs``."""
    value_and_grad = jax.value_and_grad(neuron_cost, argnums=(1, 2))

    def epoch(carry: tuple[jax.Array, jax.Array], _: None):
        w, b = carry
        c, (gw, gb) = value_and_grad(cost, w, b, x, y)
        a = sj.sigmoid(w * x + b)[0]
        return (w - eta * gw, b - eta * gb), (a, c)

    (w, b), (outputs, costs) = jax.lax.scan(epoch, (w0, b0), None, length=epochs)
    last_a = sj.sigmoid(w * x + b)
    last_c = neuron_cost(cost, w, b, x, y)
    return jnp.append(outputs, last_a), jnp.append(costs, last_c)


def run_neuron(
    cost: str,
    w0: float,
    b0: float,
    eta: float,
    epochs: int = 300,
    x: float = 1.0,
    y: float = 0.0,
) -> NeuronRun:
    """Trains the single neuron with plain gradient descent and records every epoch.

    Args:
      cost: ``"quadratic"`` or ``"cross_entropy"``.
      w0, b0: starting weight and bias.
      eta: learning rate.
      epochs: number of gradient steps (one example, so one step per epoch).
      x, y: the training input and target.
    """
    if cost not in NEURON_COSTS:
        raise ValueError(f"cost must be one of {', '.join(NEURON_COSTS)}; got {cost!r}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    f32 = jnp.float32
    outputs, costs = _descend(
        jnp.asarray(w0, f32),
        jnp.asarray(b0, f32),
        jnp.asarray(eta, f32),
        jnp.full((1,), x, f32),
        jnp.full((1,), y, f32),
        cost=cost,
        epochs=epochs,
    )
    return NeuronRun(cost, float(w0), float(b0), float(eta), np.asarray(outputs), np.asarray(costs))


def run_slowdown(
    epochs: int = 300, runs: Sequence[tuple[str, float, float, float]] = BOOK_RUNS
) -> list[NeuronRun]:
    """Runs ``(cost, w0, b0, eta)`` settings, by default the book's four."""
    return [run_neuron(cost, w0, b0, eta, epochs) for cost, w0, b0, eta in runs]


def format_table(runs: Sequence[NeuronRun]) -> str:
    """A plain-text table of the runs.

    Columns: the output after 0, 50, 100, ... epochs, the final cost, the first epoch's cost
    decrease ``C(0) - C(1)`` (how fast the neuron starts learning) and the first epoch with
    :math:`a < 0.5` (the neuron has crossed to the right side). For a fixed cost and rate, the
    first-epoch decrease shows the slowdown: the quadratic neuron starts far slower from the
    worse start, the cross-entropy neuron faster.
    """
    epochs = len(runs[0].outputs) - 1 if runs else 0
    marks = list(dict.fromkeys(e for e in (0, 50, 100, 200, epochs) if e <= epochs))
    head = f"{'cost':<14}{'w0':>5}{'b0':>5}{'eta':>7}" + "".join(f"{f'a({e})':>9}" for e in marks)
    head += f"{f'C({epochs})':>9}{'C(0)-C(1)':>11}{'a<0.5 at':>10}"
    lines = [head, "-" * len(head)]
    for run in runs:
        epoch = run.first_below_half()
        crossed = "never" if epoch is None else str(epoch)
        first_drop = f"{run.costs[0] - run.costs[1]:>11.5f}" if len(run.costs) > 1 else f"{'-':>11}"
        lines.append(
            f"{run.cost:<14}{run.w0:>5g}{run.b0:>5g}{run.eta:>7g}"
            + "".join(f"{run.outputs[e]:>9.4f}" for e in marks)
            + f"{run.costs[-1]:>9.4f}{first_drop}{crossed:>10}"
        )
    return "\n".join(lines)


def write_outputs(
    runs: Sequence[NeuronRun], out_dir: PathLike, same_rate: Sequence[NeuronRun] = ()
) -> tuple[Path, Path]:
    """Writes ``slowdown.json`` and ``slowdown.png`` into ``out_dir``; returns their paths.

    ``runs`` are the book's (different rates), ``same_rate`` the comparison at one rate;
    the JSON keeps them apart, and the figure gives each its own panel.
    """
    from experiments.plotting import plot_slowdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [run.to_json() for run in runs]
    same = [run.to_json() | {"first_below_half": run.first_below_half()} for run in same_rate]
    json_path, png_path = out / "slowdown.json", out / "slowdown.png"
    atomic_write_json(json_path, {"input": 1.0, "target": 0.0, "runs": records,
                                  "same_rate": same})
    plot_slowdown(records, png_path, same)
    return json_path, png_path
