"""Distillation on the stdlib next-token model: the head, the experiment, scripts/distill_lm.py."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _scripts import load_script, run_main
from _subprocess import repo_env

from experiments import lm
from experiments.checkpoint import CheckpointError
from experiments.lm import distill as distill_module
from experiments.lm.distill import (
    DistillConfig,
    DistillResult,
    distillation_head_loss,
    run_distillation,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "distill_lm.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
V = 200
SMALL = {"max_files": 8, "heldout_every": 4}


def _unfused(x, w, teacher_x, teacher_w, *, labels=None, b=None, teacher_b=None,
             temperature=1.0, beta=0.0, hard_weight=0.0, token_block=None, **unused):
    """The per-token formula written out, materialising both logit arrays (beta = 0 only):
    the reference the fused head is checked against."""
    assert beta == 0.0 and not unused
    s = x @ w + b
    t = jax.lax.stop_gradient(teacher_x @ teacher_w + teacher_b)
    kl = optax.losses.kl_divergence(jax.nn.log_softmax(s / temperature),
                                    jax.nn.softmax(t / temperature))
    ce = optax.softmax_cross_entropy_with_integer_labels(s, labels)
    return (hard_weight * ce + (1 - hard_weight) * temperature**2 * kl).mean()


@pytest.fixture(scope="module")
def corpus() -> lm.Corpus:
    return lm.load_corpus(vocab_size=V, **SMALL)


def small_config(**overrides) -> lm.LMConfig:
    base = {"vocab_size": V, "context": 4, "embed_dim": 16, "hidden": 32, "batch_size": 64,
            "steps": 12, "learning_rate": 1e-2, "eval_every": 6, "eval_positions": 256,
            "final_eval_positions": 512}
    return lm.LMConfig(**(base | overrides))


# --- the head ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,hard_weight", [(1.0, 0.0), (2.0, 0.5)])
def test_head_loss_and_gradients_match_the_formula(temperature, hard_weight):
    keys = jax.random.split(jax.random.key(0), 7)
    n, d, dt = 24, 8, 12
    x, tx = jax.random.normal(keys[0], (n, d)), jax.random.normal(keys[1], (n, dt))
    w, tw = jax.random.normal(keys[2], (d, V)), jax.random.normal(keys[3], (dt, V))
    b, tb = 0.5 * jax.random.normal(keys[4], (V,)), 0.5 * jax.random.normal(keys[5], (V,))
    labels = jax.random.randint(keys[6], (n,), 0, V)
    dcfg = DistillConfig(temperature=temperature, hard_weight=hard_weight)

    def fused(x, w, b, tx, tw, tb):
        return distillation_head_loss(x, w, b, tx, tw, tb, labels, dcfg, token_block=8)

    def formula(x, w, b):
        return _unfused(x, w, tx, tw, labels=labels, b=b, teacher_b=tb,
                        temperature=temperature, hard_weight=hard_weight)

    got, grads = jax.value_and_grad(fused, argnums=tuple(range(6)))(x, w, b, tx, tw, tb)
    want, want_grads = jax.value_and_grad(formula, argnums=(0, 1, 2))(x, w, b)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(got) > 0
    for g, h, name in zip(grads[:3], want_grads, ("x", "w", "b"), strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6, err_msg=name)
    for g, name in zip(grads[3:], ("teacher_x", "teacher_w", "teacher_b"), strict=True):
        np.testing.assert_array_equal(g, np.zeros_like(g), err_msg=name)


def test_distill_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0.0)
    with pytest.raises(ValueError, match="hard_weight"):
        DistillConfig(hard_weight=1.5)
    with pytest.raises(ValueError, match="beta"):
        DistillConfig(beta=-0.1)


# --- the experiment ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distilled(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    result = run_distillation(small_config(hidden=64, steps=20), small_config(hidden=16),
                              DistillConfig(temperature=2.0, hard_weight=0.3), corpus,
                              lm.make_mesh(1), out_dir=out, log=lambda _: None)
    return result, out


def test_both_students_learn_and_are_measured_alike(distilled):
    result, out = distilled
    assert set(result.students) == {"hard", "distilled"}
    assert result.teacher_source == "trained" and result.teacher_steps == 20
    assert (out / "teacher" / lm.CHECKPOINT_NAME).is_file()
    for name, student in result.students.items():
        ppl = student.final["perplexity"]
        assert math.isfinite(ppl) and 1.0 < ppl < V, name
        assert [e["step"] for e in student.evals] == [0, 6, 12], name
        assert student.evals[0]["heldout_loss"] == pytest.approx(math.log(V), rel=1e-5)
        assert student.final["positions"] == result.teacher_final["positions"]
    teacher_ppl = result.teacher_final["perplexity"]
    assert math.isfinite(teacher_ppl) and 1.0 < teacher_ppl < V
    losses = [h["train_loss"] for h in result.students["distilled"].history]
    assert len(losses) == 12 and all(map(math.isfinite, losses))
    assert np.mean(losses[-3:]) < losses[0] - 0.3  # the distilled objective decreases
    # Same initial parameters and batches: the first step sees the same zero head, so the
    # hard student's first loss is log V and the distilled one's mixes in the KL to the teacher.
    assert result.students["hard"].history[0]["train_loss"] == pytest.approx(math.log(V))


def test_summary_is_json_with_both_perplexities(distilled):
    result, _ = distilled
    summary = json.loads(json.dumps(result.summary()))
    ppl = summary["heldout_perplexity"]
    assert set(ppl) == {"hard", "distilled"}
    assert summary["better"] == min(ppl, key=ppl.get)
    assert summary["distillation"] == {"temperature": 2.0, "hard_weight": 0.3, "beta": 0.0}
    assert summary["teacher"]["config"]["hidden"] == 64
    assert summary["students"]["distilled"]["config"]["hidden"] == 16
    assert summary["students"]["hard"]["final_heldout"]["perplexity"] == ppl["hard"]


def test_teacher_from_a_checkpoint(distilled, corpus):
    _, out = distilled
    path = out / "teacher" / lm.CHECKPOINT_NAME
    student = small_config(hidden=16, steps=2, eval_every=2)
    result = run_distillation(small_config(hidden=999), student, DistillConfig(), corpus,
                              lm.make_mesh(1), teacher_checkpoint=path, log=lambda _: None)
    assert result.teacher_source == str(path) and result.teacher_config.hidden == 64
    assert result.teacher_steps == 20
    assert result.teacher_final == distilled[0].teacher_final
    with pytest.raises(ValueError, match="context 4 over 200 tokens, the student context 3"):
        run_distillation(small_config(), dataclasses.replace(student, context=3),
                         DistillConfig(), corpus, lm.make_mesh(1), teacher_checkpoint=path)


def test_resume_goes_phase_by_phase(distilled, corpus):
    result, out = distilled
    for phase in ("teacher", "hard", "distilled"):
        assert (out / phase / lm.CHECKPOINT_NAME).is_file(), phase
    lines = []
    again = run_distillation(small_config(hidden=64, steps=20), small_config(hidden=16),
                             DistillConfig(temperature=2.0, hard_weight=0.3), corpus,
                             lm.make_mesh(1), out_dir=out, resume=True, log=lines.append)
    # Every phase finished: each is loaded, none retrained, and the numbers are the same.
    assert sum("nothing to train" in line for line in lines) == 3, lines
    assert again.summary()["heldout_perplexity"] == result.summary()["heldout_perplexity"]
    assert again.teacher_final == result.teacher_final
    with pytest.raises(CheckpointError, match=r"temperature 2\.0 \(now 1\.0\); drop --resume"):
        run_distillation(small_config(hidden=64, steps=20), small_config(hidden=16),
                         DistillConfig(hard_weight=0.3), corpus, lm.make_mesh(1), out_dir=out,
                         resume=True, log=lambda _: None)


def test_a_tie_is_reported_as_a_tie(distilled):
    result, _ = distilled
    hard = result.students["hard"]
    tie = DistillResult(result.teacher_config, "trained", 20, result.teacher_final,
                        {"hard": hard, "distilled": hard}, result.distill, 0.0)
    summary = tie.summary()
    assert summary["better"] == "tie"
    line = load_script("distill_lm.py")._report(summary, 100.0)
    assert line.endswith("the two students tie exactly") and "lower by" not in line


# --- the script -------------------------------------------------------------------------------


SCRIPT_ARGS = ("--vocab", str(V), "--max-files", "8", "--heldout-every", "4", "--context", "4",
               "--batch-size", "64", "--steps", "6", "--teacher-steps", "8", "--teacher-embed",
               "16", "--teacher-hidden", "48", "--embed", "8", "--hidden", "16",
               "--eval-every", "3", "--eval-positions", "256", "--final-eval-positions", "512",
               "--lr", "1e-2", "--no-progress")


def test_script_writes_metrics_and_plot(tmp_path, capsys):
    script = load_script("distill_lm.py")
    out = tmp_path / "run"
    assert script.main([*SCRIPT_ARGS, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "hard-label student" in stdout and "distilled student" in stdout
    assert "student is lower by" in stdout
    assert (out / "distill.png").read_bytes().startswith(PNG_MAGIC)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"teacher", "students", "heldout_perplexity", "better", "distillation", "corpus",
            "unigram_heldout_perplexity", "backend", "devices", "seconds"} <= set(metrics)
    for name in ("hard", "distilled"):
        assert 1.0 < metrics["heldout_perplexity"][name] < V
        assert len(metrics["students"][name]["history"]) == 6
    assert metrics["corpus"]["vocab_size"] == V and metrics["devices"] >= 1
    assert metrics["distillation"] == {"temperature": 1.0, "hard_weight": 0.5, "beta": 0.0}

    # The teacher checkpoint it wrote is a train_lm checkpoint, reusable as a teacher.
    again = tmp_path / "again"
    teacher = out / "teacher" / "checkpoint.npz"
    assert script.main([*SCRIPT_ARGS, "--out", str(again), "--teacher-checkpoint",
                        str(teacher)]) == 0
    reused = json.loads((again / "metrics.json").read_text())
    assert reused["teacher"]["source"] == str(teacher)
    assert reused["teacher"]["final_heldout"] == metrics["teacher"]["final_heldout"]
    assert reused["heldout_perplexity"] == metrics["heldout_perplexity"]


def test_script_interrupted_then_resumed(tmp_path, capsys, monkeypatch):
    script = load_script("distill_lm.py")
    out = tmp_path / "run"
    args = [*SCRIPT_ARGS, "--out", str(out)]
    real_train = distill_module.train

    def interrupted(*a, **kw):
        if kw.get("desc") == "distilled student":
            raise KeyboardInterrupt
        return real_train(*a, **kw)

    monkeypatch.setattr(distill_module, "train", interrupted)
    assert script.main(args) == 130
    err = capsys.readouterr().err
    assert f"saved in {out}: teacher at step 8, hard-label student at step 6;" in err
    assert "continue with: python scripts/distill_lm.py" in err and err.rstrip().endswith(
        "--no-progress --out " + str(out) + " --resume")
    monkeypatch.setattr(distill_module, "train", real_train)
    assert script.main([*args, "--resume"]) == 0
    stdout = capsys.readouterr().out
    assert "teacher: nothing to train" in stdout
    assert "hard-label student: nothing to train" in stdout
    resumed = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in resumed["students"]["distilled"]["history"]] == [1, 2, 3, 4, 5, 6]
    # Bit-for-bit the run the interruption cut short: the same as an uninterrupted one.
    whole = tmp_path / "whole"
    assert script.main([*SCRIPT_ARGS, "--out", str(whole)]) == 0
    assert resumed["heldout_perplexity"] == json.loads(
        (whole / "metrics.json").read_text())["heldout_perplexity"]


def test_script_reports_a_teacher_of_another_corpus_in_one_line(distilled, tmp_path, capsys):
    script = load_script("distill_lm.py")
    teacher = distilled[1] / "teacher" / lm.CHECKPOINT_NAME  # trained with heldout_every=4
    args = [*SCRIPT_ARGS, "--heldout-every", "3", "--out", str(tmp_path / "x"),
            "--teacher-checkpoint", str(teacher)]
    assert script.main(args) == 1
    err = capsys.readouterr().err
    assert "another corpus" in err and "--heldout-every" in err
    assert len(err.strip().splitlines()) == 1


def test_script_is_data_parallel_over_simulated_devices(tmp_path, capsys, monkeypatch):
    # Under the SPMD partitioner the fused distillation head sees batch-sharded rows; sharding
    # must not change the numbers.
    # One device in this process; two need a fresh JAX (--devices sets the host device count
    # before JAX starts), so that run is a subprocess.
    env = repo_env(JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    env.pop("XLA_FLAGS", None)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # --devices sets it; restored afterwards
    runs = {}
    for devices in ("1", "2"):
        out = tmp_path / devices
        args = [*SCRIPT_ARGS, "--steps", "4", "--teacher-steps", "4", "--devices", devices,
                "--out", str(out)]
        if devices == "1":
            code, _, err = run_main("distill_lm.py", *args, capsys=capsys)
            assert code == 0, err
        else:
            proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
        runs[devices] = json.loads((out / "metrics.json").read_text())
    assert (runs["1"]["devices"], runs["2"]["devices"]) == (1, 2)
    for name in ("hard", "distilled"):
        one, two = (
            [h["train_loss"] for h in runs[d]["students"][name]["history"]] for d in ("1", "2"))
        np.testing.assert_allclose(one, two, rtol=1e-4, err_msg=name)
        assert runs["2"]["heldout_perplexity"][name] == pytest.approx(
            runs["1"]["heldout_perplexity"][name], rel=1e-4)


@pytest.mark.parametrize(
    "args,message",
    [
        (("--temperature", "0"), "temperature must be a positive number"),
        (("--hard-weight", "2"), "hard_weight must lie in [0, 1]"),
        (("--devices", "3", "--batch-size", "64"), "must be divisible by --devices 3"),
        # Reported before the corpus is read (the whole stdlib, seconds).
        (("--teacher-checkpoint", "/nonexistent.npz"),
         "--teacher-checkpoint /nonexistent.npz: no such file"),
    ],
)
def test_script_rejects_bad_flags(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # --devices sets it; restored afterwards
    code, out, err = run_main("distill_lm.py", *args, capsys=capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert "stdlib corpus" not in out


def test_unfused_reference_matches_a_materialised_kl():
    # The reference itself, checked on numbers worked by hand: with T = 1 and identical
    # logits the KL term vanishes and only the weighted cross-entropy remains.
    x = jnp.eye(2, 3)
    w = jnp.arange(12.0).reshape(3, 4) / 10
    b = jnp.zeros(4)
    labels = jnp.array([1, 3])
    loss = _unfused(x, w, x, w, labels=labels, b=b, teacher_b=b, hard_weight=0.25)
    ce = optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()
    np.testing.assert_allclose(loss, 0.25 * ce, rtol=1e-6)
