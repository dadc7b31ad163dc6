"""The single-neuron slowdown experiment: its gradients and the slowdown it must show."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.slowdown import (
    BOOK_RUNS,
    SAME_RATE_RUNS,
    NeuronRun,
    format_table,
    neuron_cost,
    run_neuron,
    run_slowdown,
    write_outputs,
)


@pytest.fixture(scope="module")
def runs() -> dict[tuple[str, float], NeuronRun]:
    """The book's four runs, keyed by (cost, w0)."""
    return {(r.cost, r.w0): r for r in run_slowdown(300)}


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize("w, b", [(0.6, 0.9), (2.0, 2.0), (-1.0, 0.3)])
def test_gradients_are_the_textbook_ones(w: float, b: float) -> None:
    """Quadratic: (a - y) sigma'(z) x.  Cross-entropy: (a - y) x, no sigma'(z)."""
    x, y = jnp.array([1.0]), jnp.array([0.0])
    a = _sigmoid(w + b)
    grad = jax.grad(neuron_cost, argnums=(1, 2))
    gw, gb = grad("quadratic", jnp.float32(w), jnp.float32(b), x, y)
    np.testing.assert_allclose([gw, gb], [a * a * (1 - a)] * 2, rtol=1e-5)
    gw, gb = grad("cross_entropy", jnp.float32(w), jnp.float32(b), x, y)
    np.testing.assert_allclose([gw, gb], [a] * 2, rtol=1e-5)


def test_starting_outputs(runs) -> None:
    for cost in ("quadratic", "cross_entropy"):
        assert runs[(cost, 0.6)].outputs[0] == pytest.approx(0.82, abs=0.005)
        assert runs[(cost, 2.0)].outputs[0] == pytest.approx(0.98, abs=0.005)
    assert runs[("quadratic", 2.0)].costs[0] == pytest.approx(0.5 * _sigmoid(4.0) ** 2, rel=1e-6)
    assert runs[("cross_entropy", 2.0)].costs[0] == pytest.approx(-np.log(1 - _sigmoid(4.0)))


def test_records_every_epoch(runs) -> None:
    assert len(runs) == 4
    for run in runs.values():
        assert run.outputs.shape == run.costs.shape == (301,)
        assert np.all(np.diff(run.outputs) < 0)  # always moving towards the target 0
    assert [(r.cost, r.w0, r.b0, r.eta) for r in runs.values()] == list(BOOK_RUNS)


def test_quadratic_slows_down_when_badly_wrong(runs) -> None:
    good, bad = runs[("quadratic", 0.6)], runs[("quadratic", 2.0)]
    # Same cost and rate: from the worse start the first epoch gains 50x less.
    assert bad.costs[0] - bad.costs[1] < 0.05 * (good.costs[0] - good.costs[1])
    # A plateau, then a speed-up as sigma'(z) grows: the drop per epoch increases.
    drop = -np.diff(bad.costs)
    assert drop[100] > 3 * drop[0] and drop[200] > 10 * drop[0]
    assert bad.outputs[100] > 0.96  # a hundred epochs in, still almost as wrong as at the start
    assert good.outputs[50] < 0.4


def test_cross_entropy_learns_fastest_when_most_wrong(runs) -> None:
    good, bad = runs[("cross_entropy", 0.6)], runs[("cross_entropy", 2.0)]
    # The worse start gains more in the first epoch, and the drop per epoch only shrinks.
    assert bad.costs[0] - bad.costs[1] > good.costs[0] - good.costs[1]
    drop = -np.diff(bad.costs)
    assert drop[0] == drop.max() and drop[100] < drop[0]


def test_cross_entropy_beats_quadratic_early_from_the_bad_start(runs) -> None:
    """From (2, 2), cross-entropy (at a 30x smaller rate) cuts its cost faster early on."""
    ce, quad = runs[("cross_entropy", 2.0)], runs[("quadratic", 2.0)]
    for epochs in (10, 50):
        ce_share = 1 - ce.costs[epochs] / ce.costs[0]
        quad_share = 1 - quad.costs[epochs] / quad.costs[0]
        assert ce_share > 5 * quad_share


def test_zero_epochs_and_bad_arguments() -> None:
    run = run_neuron("quadratic", 0.6, 0.9, 0.15, epochs=0)
    assert run.outputs.shape == (1,)
    with pytest.raises(ValueError, match="cost must be one of"):
        run_neuron("hinge", 0.6, 0.9, 0.15)


def test_write_outputs_and_table(tmp_path: Path) -> None:
    runs = run_slowdown(20)
    json_path, png_path = write_outputs(runs, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert [r["cost"] for r in data["runs"]] == ["quadratic"] * 2 + ["cross_entropy"] * 2
    first = data["runs"][0]
    assert set(first) == {"cost", "w0", "b0", "eta", "outputs", "costs"}
    assert len(first["outputs"]) == 21 and first["outputs"][0] == pytest.approx(0.8176, abs=1e-4)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(runs)
    assert "a(20)" in table and len(table.splitlines()) == 6


def _numpy_first_below_half(cost: str, w: float, b: float, eta: float, epochs: int) -> int:
    """Plain float64 gradient descent from the textbook gradients, independent of JAX."""
    for epoch in range(epochs + 1):
        a = 1.0 / (1.0 + np.exp(-(w + b)))
        if a < 0.5:
            return epoch
        delta = a * (a * (1 - a) if cost == "quadratic" else 1.0)  # (a - y) [sigma'(z)], y = 0
        w, b = w - eta * delta, b - eta * delta
    raise AssertionError("never crossed")


def test_same_rate_comparison_shows_the_slowdown(tmp_path: Path) -> None:
    # At one rate, 0.15, from (2, 2): cross-entropy crosses 0.5 at epoch 17, quadratic at 232.
    same = run_slowdown(300, SAME_RATE_RUNS)
    crossings = {run.cost: run.first_below_half() for run in same}
    assert crossings == {"quadratic": 232, "cross_entropy": 17}
    assert crossings == {
        cost: _numpy_first_below_half(cost, w, b, eta, 300) for cost, w, b, eta in SAME_RATE_RUNS
    }
    json_path, _ = write_outputs(run_slowdown(300), tmp_path, same)
    data = json.loads(json_path.read_text())
    assert len(data["runs"]) == 4
    assert [(r["cost"], r["eta"], r["first_below_half"]) for r in data["same_rate"]] == [
        ("quadratic", 0.15, 232), ("cross_entropy", 0.15, 17)]
