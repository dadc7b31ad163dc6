"""The MLP trainer: costs and their gradients, the compiled step, training, checkpoint/resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import mlp
from experiments.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from experiments.data import Dataset, load_digits

SCORES = ("train_loss", "train_accuracy", "test_accuracy")


# Tests that only need *a* training run share this configuration and the `small` data set,
# so they share compiled programs too (the trainer caches them per hyper-parameters).
SMALL = mlp.TrainConfig(epochs=2, hidden=(8,), batch_size=16, l2=1.0)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    pytest.importorskip("sklearn")
    return load_digits()


@pytest.fixture(scope="module")
def small(digits: Dataset) -> Dataset:
    """The first 300 training digits: enough to learn something, fast to train."""
    return dataclasses.replace(digits, x_train=digits.x_train[:300], y_train=digits.y_train[:300])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# --------------------------------------------------------------------------------------------
# Model and costs
# --------------------------------------------------------------------------------------------


def test_init_params_shapes_and_scale() -> None:
    params = mlp.init_params(jax.random.key(0), (400, 300, 10))
    shapes = [(p["w"].shape, p["b"].shape) for p in params]
    assert shapes == [((400, 300), (300,)), ((300, 10), (10,))]
    # w ~ N(0, 1/n_in), b ~ N(0, 1)
    assert float(jnp.std(params[0]["w"])) == pytest.approx(1 / np.sqrt(400), rel=0.02)
    assert float(jnp.std(params[0]["b"])) == pytest.approx(1.0, rel=0.15)
    again = mlp.init_params(jax.random.key(0), (400, 300, 10))
    other = mlp.init_params(jax.random.key(1), (400, 300, 10))
    np.testing.assert_array_equal(again[1]["w"], params[1]["w"])
    assert not np.array_equal(other[1]["w"], params[1]["w"])


LOGITS = np.array([[2.0, 3.0, 4.0], [-1.0, 0.5, 0.0]], dtype=np.float32)
LABELS = np.array([1, 0], dtype=np.int32)
ONE_HOT = np.eye(3, dtype=np.float32)[LABELS]


def test_costs_match_the_formulas() -> None:
    z, y = jnp.asarray(LOGITS), jnp.asarray(LABELS)
    log_a = LOGITS - np.log(np.exp(LOGITS).sum(-1, keepdims=True))
    s = _sigmoid(LOGITS)
    expected = {
        "softmax_ce": -log_a[np.arange(2), LABELS],
        "sigmoid_ce": -(ONE_HOT * np.log(s) + (1 - ONE_HOT) * np.log(1 - s)).sum(-1),
        "quadratic": 0.5 * ((s - ONE_HOT) ** 2).sum(-1),
    }
    for cost, value in expected.items():
        np.testing.assert_allclose(mlp.per_example_cost(cost, z, y), value, rtol=1e-5)
    with pytest.raises(ValueError, match="cost must be one of"):
        mlp.per_example_cost("hinge", z, y)


def test_cost_gradients_show_the_slowdown_term() -> None:
    """dC/dz: a - y for both cross-entropies; (a - y) sigma'(z) for the quadratic cost."""
    y = jnp.asarray(LABELS)
    s = _sigmoid(LOGITS)
    softmax = np.exp(LOGITS) / np.exp(LOGITS).sum(-1, keepdims=True)
    expected = {
        "softmax_ce": softmax - ONE_HOT,
        "sigmoid_ce": s - ONE_HOT,
        "quadratic": (s - ONE_HOT) * s * (1 - s),
    }
    for cost, value in expected.items():
        grad = jax.grad(lambda z, c=cost: mlp.per_example_cost(c, z, y).sum())(jnp.asarray(LOGITS))
        np.testing.assert_allclose(grad, value, rtol=1e-5, atol=1e-7)


def test_l2_penalty_is_nielsens() -> None:
    params = [{"w": jnp.full((2, 3), 2.0), "b": jnp.full((3,), 100.0)}]
    # 0.5 * lambda / n * sum w^2 = 0.5 * 5 / 10 * 24; biases are not penalised.
    assert float(mlp.l2_penalty(params, 5.0, 10)) == pytest.approx(6.0)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="cost must be one of"):
        mlp.TrainConfig(cost="mse")
    with pytest.raises(ValueError, match="batch size"):
        mlp.TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="eta"):
        mlp.TrainConfig(eta=-1.0)
    assert "epochs" not in mlp.TrainConfig().identity()


# --------------------------------------------------------------------------------------------
# The compiled step
# --------------------------------------------------------------------------------------------


def test_padded_last_batch_is_the_mean_over_its_real_examples() -> None:
    """7 examples in batches of 5: the second batch has 2 real examples and 3 padding."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((7, 4), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 3, 7).astype(np.int32))
    config = mlp.TrainConfig(hidden=(5,), batch_size=5, eta=0.3, l2=0.7)
    state = mlp.init_state(config, 4, 3)
    order = jnp.asarray([3, 0, 6, 1, 5, 2, 4, 0, 0, 0], dtype=jnp.int32)
    step = mlp.make_train_step(config, n_train=7)
    params, _ = step(state.params, state.opt_state, x, y, order, 1)

    def objective(p):
        costs = mlp.per_example_cost("softmax_ce", mlp.forward(p, x[2:5:2]), y[2:5:2])
        return costs.mean() + mlp.l2_penalty(p, 0.7, 7)

    grads = jax.jit(jax.grad(objective))(state.params)
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.3 * g, state.params, grads)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, expected
    )


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def test_same_seed_same_run_different_seed_different_run(small: Dataset) -> None:
    a = mlp.train(SMALL, small)
    b = mlp.train(SMALL, small)
    c = mlp.train(dataclasses.replace(SMALL, seed=1), small)
    for key in SCORES:
        assert a.history[key] == b.history[key]
    assert a.history["train_loss"] != c.history["train_loss"]


@pytest.mark.parametrize("optimizer, eta", [("adam", 0.01), ("sgd", 0.5)])
def test_resume_matches_an_uninterrupted_run(
    small: Dataset, tmp_path: Path, optimizer: str, eta: float
) -> None:
    config = dataclasses.replace(SMALL, epochs=3, optimizer=optimizer, eta=eta)
    whole = mlp.train(config, small, out_dir=tmp_path / "whole")

    lines: list[str] = []
    mlp.train(dataclasses.replace(config, epochs=2), small, out_dir=tmp_path / "split")
    resumed = mlp.train(config, small, out_dir=tmp_path / "split", resume=True, log=lines.append)

    assert "resumed from" in lines[0] and "after epoch 2" in lines[0]
    assert len(lines) == 2  # the resume notice and epoch 3 only
    assert resumed.epoch == whole.epoch == 3
    for key in SCORES:
        assert resumed.history[key] == whole.history[key]
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.params, whole.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.opt_state, whole.opt_state)
    on_disk = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert on_disk["test_accuracy"] == whole.history["test_accuracy"]
    assert on_disk["epochs_completed"] == 3 and on_disk["cost"] == "softmax_ce"
    # Atomic writes leave nothing but the two files behind.
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == [
        "checkpoint.npz",
        "metrics.json",
    ]


def test_resume_past_the_end_trains_nothing(small: Dataset, tmp_path: Path) -> None:
    done = mlp.train(SMALL, small, out_dir=tmp_path)
    again = mlp.train(dataclasses.replace(SMALL, epochs=1), small, out_dir=tmp_path, resume=True)
    assert again.epoch == 2 and again.history["test_accuracy"] == done.history["test_accuracy"]


def test_resume_without_checkpoint_starts_fresh(small: Dataset, tmp_path: Path) -> None:
    lines: list[str] = []
    state = mlp.train(SMALL, small, out_dir=tmp_path, resume=True, log=lines.append)
    assert state.epoch == 2 and lines[0].startswith("no checkpoint at")


def test_resume_refuses_another_run(small: Dataset, tmp_path: Path) -> None:
    mlp.train(SMALL, small, out_dir=tmp_path)
    with pytest.raises(CheckpointError, match="eta 0.5 \\(now 0.1\\)"):
        mlp.train(dataclasses.replace(SMALL, eta=0.1), small, out_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="a different model"):
        mlp.train(dataclasses.replace(SMALL, hidden=(5,)), small, out_dir=tmp_path, resume=True)
    other = dataclasses.replace(small, name="mnist")
    with pytest.raises(CheckpointError, match="written for dataset 'digits'"):
        mlp.train(SMALL, other, out_dir=tmp_path, resume=True)


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_errors(tmp_path: Path) -> None:
    tree = {"a": np.arange(3, dtype=np.float32), "b": [np.int32(7), np.ones((2, 2))]}
    path = tmp_path / "ck.npz"
    save_checkpoint(path, tree, {"epoch": 4, "note": "x"})
    back, meta = load_checkpoint(path, tree)
    assert meta == {"epoch": 4, "note": "x"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, tree)

    with pytest.raises(CheckpointError, match="array 0 is float32\\[3\\]"):
        load_checkpoint(path, {"a": np.zeros(4, np.float32), "b": tree["b"]})
    with pytest.raises(CheckpointError, match="holds 3 arrays, the model has 2"):
        load_checkpoint(path, {"a": tree["a"], "b": tree["b"][:1]})

    path.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as info:
        load_checkpoint(path, tree)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.npz", tree)


def test_summary_columns_stay_apart_for_a_huge_loss(small: Dataset) -> None:
    state = mlp.init_state(mlp.TrainConfig(), small.num_features, small.num_classes)
    state.epoch = 1
    state.history.update(train_loss=[3424003.5], train_accuracy=[0.1], test_accuracy=[0.15],
                         epoch_seconds=[0.1])
    head, rule, row = mlp.format_summary({"softmax_ce": state}).splitlines()
    assert row.split() == ["softmax_ce", "1", "0.1500", "0.1500", "0.1500", "3424003.5000"]
    assert len(head) == len(rule) == len(row)
