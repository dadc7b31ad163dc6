"""Smoke tests of the command-line scripts, each ``main`` run in this process (the scripts'
fresh-interpreter start is checked by ``test_experiments_runs.py``) in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _scripts import run_main
from test_experiments_data import write_fake_mnist

from experiments.data import MNIST_FILES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_clean_exit(code: int, stderr: str, path: Path) -> None:
    """Non-zero exit status, one line on stderr that names ``path``, no traceback."""
    assert code != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert str(path) in lines[0]


def test_worked_example(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main("worked_example.py", capsys=capsys)
    assert code == 0, err
    assert "0.0900 0.2447 0.6652" in out
    assert "0.0900 -0.7553 0.6652" in out
    assert "1.4076" in out and "matches a - y" in out


def test_slowdown(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    code, stdout, err = run_main("slowdown.py", "--out", tmp_path / "s", "--epochs", "40",
                                 capsys=capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "s" / "slowdown.json").read_text())
    runs = data["runs"]
    assert [(r["cost"], r["w0"], r["b0"], r["eta"]) for r in runs] == [
        ("quadratic", 0.6, 0.9, 0.15),
        ("quadratic", 2.0, 2.0, 0.15),
        ("cross_entropy", 0.6, 0.9, 0.005),
        ("cross_entropy", 2.0, 2.0, 0.005),
    ]
    assert all(len(r["outputs"]) == len(r["costs"]) == 41 for r in runs)
    assert runs[1]["outputs"][0] == pytest.approx(0.982, abs=1e-3)
    assert (tmp_path / "s" / "slowdown.png").read_bytes()[:8] == PNG_MAGIC
    assert "a<0.5 at" in stdout and "cross_entropy" in stdout
    assert [(r["cost"], r["w0"], r["eta"]) for r in data["same_rate"]] == [
        ("quadratic", 2.0, 0.15), ("cross_entropy", 2.0, 0.15)]
    assert "The same rate, eta 0.15, from (2, 2):" in stdout


def test_train_then_resume(tmp_path: Path, trained_run_copy: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = trained_run_copy
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cost"] == "softmax_ce" and metrics["dataset"] == "digits"
    assert len(metrics["test_accuracy"]) == len(metrics["train_loss"]) == 2
    assert metrics["test_accuracy"][-1] >= 0.88  # 2 epochs of the default run on digits
    assert metrics["train_loss"][1] < metrics["train_loss"][0]
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "checkpoint.npz").is_file()

    code, second_out, second_err = run_main("train.py", "--epochs", "3", "--out", out,
                                            "--resume", "--no-progress", capsys=capsys)
    assert code == 0, second_err
    assert "resumed from" in second_out and "after epoch 2" in second_out
    assert "epoch   1/" not in second_out  # nothing is trained twice
    resumed = json.loads((out / "metrics.json").read_text())
    assert len(resumed["test_accuracy"]) == 3
    assert resumed["test_accuracy"][:2] == metrics["test_accuracy"]
    assert resumed["train_loss"][:2] == metrics["train_loss"]

    # Resuming past the end trains nothing, leaves the checkpoint alone, says so, and puts
    # back a metrics.json that agrees with the checkpoint (here a stale one is planted).
    (out / "metrics.json").write_text(json.dumps(metrics))
    checkpoint = (out / "checkpoint.npz").read_bytes()
    code, past_out, past_err = run_main("train.py", "--epochs", "2", "--out", out, "--resume",
                                        "--no-progress", capsys=capsys)
    assert code == 0, past_err
    assert "checkpoint.npz is unchanged at epoch 3" in past_out
    assert "curves.png and checkpoint.npz" not in past_out  # it wrote no checkpoint
    assert (out / "checkpoint.npz").read_bytes() == checkpoint
    assert json.loads((out / "metrics.json").read_text()) == resumed


def test_train_rejects_zero_epochs(tmp_path: Path, capsys) -> None:
    code, _, err = run_main("train.py", "--epochs", "0", "--out", tmp_path / "o", capsys=capsys)
    assert code == 2 and "--epochs must be at least 1, got 0" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_train_stops_at_divergence(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = tmp_path / "o"
    code, stdout, err = run_main("train.py", "--eta", "1e6", "--epochs", "3", "--out", out,
                                 "--no-progress", capsys=capsys)
    assert_clean_exit(code, err, out)
    assert "softmax_ce diverged in epoch 1: training loss" in err
    assert "nothing was saved" in err and "lower --eta (now 1e+06)" in err
    assert "epoch   1/3" not in stdout  # the diverged epoch is not reported as trained
    assert not (out / "checkpoint.npz").exists() and not (out / "metrics.json").exists()


def test_train_compare(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = tmp_path / "cmp"
    code, stdout, err = run_main("train.py", "--compare", "--epochs", "1", "--out", out,
                                 "--no-progress", capsys=capsys)
    assert code == 0, err
    first_epoch = {}
    for cost in ("softmax_ce", "sigmoid_ce", "quadratic"):
        metrics = json.loads((out / cost / "metrics.json").read_text())
        assert metrics["cost"] == cost
        first_epoch[cost] = metrics["test_accuracy"][0]
    # Same seed and eta; after one epoch the quadratic cost is far behind (the slowdown).
    best_ce = min(first_epoch["softmax_ce"], first_epoch["sigmoid_ce"])
    assert first_epoch["quadratic"] < best_ce - 0.3
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((out / "compare.json").read_text())
    assert set(summary["runs"]) == {"softmax_ce", "sigmoid_ce", "quadratic"}
    assert "acc@1" in stdout


def test_train_missing_data_dir(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-such-dir"
    code, _, err = run_main("train.py", "--dataset", "mnist", "--data-dir", missing,
                            capsys=capsys)
    assert_clean_exit(code, err, missing)
    assert "data directory not found" in err


def test_train_corrupt_idx(tmp_path: Path, capsys) -> None:
    data = tmp_path / "mnist"
    write_fake_mnist(data, gz=False)
    bad = data / MNIST_FILES["train_images"]
    bad.write_bytes(bad.read_bytes()[:-100])  # truncated download
    code, _, err = run_main("train.py", "--dataset", "mnist", "--data-dir", data, "--out",
                            tmp_path / "o", capsys=capsys)
    assert_clean_exit(code, err, bad)
    assert "truncated" in err


def test_train_mnist_and_corrupt_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")
    data = tmp_path / "mnist"
    write_fake_mnist(data, n_train=30, n_test=10)
    out = tmp_path / "o"
    code, _, err = run_main("train.py", "--dataset", "mnist", "--data-dir", data, "--epochs",
                            "1", "--out", out, "--no-progress", capsys=capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "mnist" and np.isfinite(metrics["train_loss"][0])

    (out / "checkpoint.npz").write_bytes(b"garbage")
    code, _, err = run_main("train.py", "--dataset", "mnist", "--data-dir", data, "--epochs",
                            "2", "--out", out, "--resume", "--no-progress", capsys=capsys)
    assert_clean_exit(code, err, out / "checkpoint.npz")


def test_train_rejects_bad_arguments(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main("train.py", "--batch-size", "0", capsys=capsys)
    assert code == 2 and "batch size must be >= 1" in err
    assert "Traceback" not in err
    code, _, err = run_main("train.py", "--dataset", "mnist", capsys=capsys)
    assert code == 2 and "--data-dir" in err
