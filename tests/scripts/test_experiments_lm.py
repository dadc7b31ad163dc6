"""The stdlib next-token model: corpus, tokens, model, training, and scripts/train_lm.py."""

from __future__ import annotations

import collections
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

import softmax_jax as sj
from experiments import lm

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_lm.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = {"max_files": 8, "heldout_every": 4}


@pytest.fixture(scope="module")
def corpus() -> lm.Corpus:
    return lm.load_corpus(vocab_size=300, **SMALL)


def small_config(**overrides) -> lm.LMConfig:
    base = {"vocab_size": 300, "context": 4, "embed_dim": 16, "hidden": 32, "batch_size": 64,
            "steps": 25, "learning_rate": 1e-2, "eval_every": 10, "eval_positions": 512,
            "final_eval_positions": 1024}
    return lm.LMConfig(**(base | overrides))


# --- tokens and corpus ------------------------------------------------------------------------


def test_tokenize_splits_words_numbers_newlines_and_symbols():
    assert lm.tokenize("x_1 = foo(42)  # hi\n\tif a>=b:") == [
        "x_1", "=", "foo", "(", "42", ")", "#", "hi", "\n", "if", "a", ">", "=", "b", ":"]


def test_build_vocab_is_frequency_ranked_with_unk_first():
    counts = collections.Counter({"b": 3, "a": 3, "c": 5, "d": 1})
    assert lm.build_vocab(counts, 4) == [lm.UNK, "c", "a", "b"]
    with pytest.raises(ValueError, match="vocab_size must be at least 2"):
        lm.build_vocab(counts, 1)


def test_windows_are_the_tokens_before_each_position():
    tokens = np.arange(10, 30)
    contexts, targets = lm.windows(tokens, np.array([3, 7]), 3)
    np.testing.assert_array_equal(contexts, [[10, 11, 12], [14, 15, 16]])
    np.testing.assert_array_equal(targets, [13, 17])


def test_stdlib_corpus_splits_files_and_encodes(corpus):
    stats = corpus.describe()
    assert stats["vocab_size"] == 300 and corpus.vocab[0] == lm.UNK
    assert stats["train_files"] == 6 and stats["heldout_files"] == 2
    assert stats["train_tokens"] > 1000 and stats["heldout_tokens"] > 100
    for ids in (corpus.train, corpus.heldout):
        assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 300
    assert corpus.train_counts.sum() == len(corpus.train)
    assert 1.0 < lm.unigram_perplexity(corpus) < 300


def test_corpus_from_a_folder_is_deterministic(tmp_path):
    for i in range(4):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * (i + 1))
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "skip.py").write_text("never seen\n")
    a = lm.load_corpus(vocab_size=8, root=tmp_path, heldout_every=4)
    b = lm.load_corpus(vocab_size=8, root=tmp_path, heldout_every=4)
    assert a.vocab == b.vocab and np.array_equal(a.train, b.train)
    assert (a.train_files, a.heldout_files) == (3, 1)
    assert "never" not in a.vocab
    assert a.vocab[:3] == [lm.UNK, "\n", "x"]


def test_missing_or_empty_corpus_folder_is_a_clear_error(tmp_path):
    with pytest.raises(lm.CorpusError, match="not found"):
        lm.load_corpus(root=tmp_path / "nope")
    with pytest.raises(lm.CorpusError, match="no .py files"):
        lm.load_corpus(root=tmp_path)


# --- model ------------------------------------------------------------------------------------


def test_loss_matches_the_unfused_head(corpus):
    cfg = small_config(label_smoothing=0.1, z_loss=1e-3)
    params = lm.init_params(jax.random.key(1), cfg)
    # A non-zero head, so that the comparison is not trivial.
    params["head_w"] = 0.3 * jax.random.normal(jax.random.key(2), params["head_w"].shape)
    params["head_b"] = 0.1 * jax.random.normal(jax.random.key(3), params["head_b"].shape)
    positions = np.arange(cfg.context, cfg.context + 50)
    contexts, targets = lm.windows(corpus.train, positions, cfg.context)

    def unfused(p):
        z = lm.features(p, contexts) @ p["head_w"] + p["head_b"]
        return sj.softmax_cross_entropy_with_integer_labels(
            z, targets, label_smoothing=0.1, z_loss=1e-3).mean()

    got, g_got = jax.value_and_grad(lm.loss_fn)(params, contexts, targets, cfg)
    want, g_want = jax.value_and_grad(unfused)(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(g_got[name], g_want[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_initial_loss_is_log_vocab(corpus):
    cfg = small_config()
    params = lm.init_params(jax.random.key(0), cfg)
    contexts, targets = lm.windows(corpus.train, np.arange(4, 100), cfg.context)
    assert float(lm.loss_fn(params, contexts, targets, cfg)) == pytest.approx(math.log(300))


def test_evaluation_pads_the_last_batch_with_ignored_labels(corpus):
    cfg = small_config(batch_size=64)
    mesh = lm.make_mesh(1)
    params = lm.init_params(jax.random.key(0), cfg)
    params["head_w"] = 0.3 * jax.random.normal(jax.random.key(2), params["head_w"].shape)
    tokens = corpus.heldout[:150]  # 146 positions: two full batches and one of 18
    m = lm.evaluate(params, tokens, cfg, mesh, max_positions=10_000)
    contexts, targets = lm.windows(tokens, np.arange(4, 150), cfg.context)
    z = lm.features(params, contexts) @ params["head_w"] + params["head_b"]
    want = float(optax.softmax_cross_entropy_with_integer_labels(z, jnp.asarray(targets)).mean())
    assert m["positions"] == 146
    assert m["loss"] == pytest.approx(want, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)


def test_training_lowers_the_held_out_loss(corpus):
    cfg = small_config()
    result = lm.train(cfg, corpus, lm.make_mesh(1), log=lambda _: None)
    assert len(result.history) == cfg.steps
    assert [e["step"] for e in result.evals] == [0, 10, 20, 25]
    assert result.evals[0]["heldout_loss"] == pytest.approx(math.log(300), rel=1e-5)
    assert result.evals[-1]["heldout_loss"] < result.evals[0]["heldout_loss"] - 0.5
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] - 0.5
    assert math.isfinite(result.final["perplexity"]) and result.final["perplexity"] < 300
    summary = result.summary()
    assert summary["config"]["vocab_size"] == 300 and summary["devices"] == 1
    json.dumps(summary)  # serialisable


def test_config_and_train_reject_bad_settings(corpus):
    with pytest.raises(ValueError, match="batch_size must be positive"):
        small_config(batch_size=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        small_config(label_smoothing=2.0)
    for lr in (0.0, math.inf, math.nan):  # an infinite step would make every weight NaN
        with pytest.raises(ValueError, match="learning_rate must be a positive number"):
            small_config(learning_rate=lr)
    with pytest.raises(ValueError, match="corpus vocabulary has 300"):
        lm.train(small_config(vocab_size=500), corpus, lm.make_mesh(1))
    with pytest.raises(ValueError, match="asked for 64 devices"):
        lm.make_mesh(64)


def test_plot_losses_writes_a_png(corpus, tmp_path):
    result = lm.train(small_config(steps=3), corpus, lm.make_mesh(1), log=lambda _: None)
    lm.plot_losses(result, tmp_path / "sub" / "loss.png",
                   unigram_perplexity=lm.unigram_perplexity(corpus))
    assert (tmp_path / "sub" / "loss.png").read_bytes().startswith(PNG_MAGIC)


# --- checkpoints and resuming ----------------------------------------------------------------


def _quiet(_line: str) -> None:
    pass


def test_resumed_training_is_bit_for_bit_an_uninterrupted_run(corpus, tmp_path):
    mesh = lm.make_mesh(1)
    straight = lm.train(small_config(steps=10, eval_every=4), corpus, mesh, log=_quiet)
    lines: list[str] = []
    first = lm.train(small_config(steps=6, eval_every=4), corpus, mesh, out_dir=tmp_path,
                     log=_quiet)
    assert (tmp_path / lm.CHECKPOINT_NAME).is_file() and first.resumed_from == 0
    resumed = lm.train(small_config(steps=10, eval_every=4), corpus, mesh, out_dir=tmp_path,
                       resume=True, log=lines.append)
    assert resumed.resumed_from == 6 and "resumed from" in lines[0] and "step 6" in lines[0]
    for name in straight.params:
        np.testing.assert_array_equal(resumed.params[name], straight.params[name], err_msg=name)
    assert resumed.history == straight.history  # every step's loss, exactly
    assert resumed.final == straight.final
    # The interrupted run's last evaluation (step 6) stays in the record.
    assert [e["step"] for e in resumed.evals] == [0, 4, 6, 8, 10]
    assert resumed.summary()["resumed_from_step"] == 6


def test_resume_without_a_checkpoint_starts_at_step_zero(corpus, tmp_path):
    lines: list[str] = []
    result = lm.train(small_config(steps=2), corpus, lm.make_mesh(1), out_dir=tmp_path,
                      resume=True, log=lines.append)
    assert "starting from step 0" in lines[0] and result.resumed_from == 0
    with pytest.raises(ValueError, match="resume needs an output directory"):
        lm.train(small_config(steps=2), corpus, lm.make_mesh(1), resume=True)


def test_resume_refuses_another_model_or_corpus(corpus, tmp_path):
    from experiments.checkpoint import CheckpointError

    mesh = lm.make_mesh(1)
    lm.train(small_config(steps=2), corpus, mesh, out_dir=tmp_path, log=_quiet)
    with pytest.raises(CheckpointError, match=r"hidden 32 \(now 48\); drop --resume"):
        lm.train(small_config(steps=4, hidden=48), corpus, mesh, out_dir=tmp_path, resume=True)
    other = lm.load_corpus(vocab_size=300, max_files=8, heldout_every=3)
    with pytest.raises(CheckpointError, match="another corpus"):
        lm.train(small_config(steps=4), other, mesh, out_dir=tmp_path, resume=True)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        lm.load_params(tmp_path / "junk.npz", corpus)


def test_load_params_reads_the_model_widths_from_the_checkpoint(corpus, tmp_path):
    cfg = small_config(steps=3, hidden=40, embed_dim=8)
    result = lm.train(cfg, corpus, lm.make_mesh(1), out_dir=tmp_path, log=_quiet)
    params, loaded_cfg, step = lm.load_params(tmp_path / lm.CHECKPOINT_NAME, corpus)
    assert loaded_cfg == cfg and step == 3
    for name in params:
        np.testing.assert_array_equal(params[name], result.params[name], err_msg=name)


# --- the script, data-parallel on simulated devices ------------------------------------------


def run_script(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = repo_env(JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


SCRIPT_ARGS = ("--steps", "6", "--vocab", "300", "--max-files", "8", "--heldout-every", "4",
               "--batch-size", "64", "--context", "4", "--embed", "16", "--hidden", "32",
               "--eval-every", "3", "--eval-positions", "256", "--final-eval-positions", "512")


def test_script_is_data_parallel_over_simulated_devices(tmp_path, capsys, monkeypatch):
    # One device in this process; four need a fresh JAX (--devices sets the host device
    # count before JAX starts), so that run is a subprocess.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # --devices sets it; restored afterwards
    results = {}
    for devices in ("1", "4"):
        out = tmp_path / f"d{devices}"
        if devices == "1":
            code, stdout, err = run_main("train_lm.py", *SCRIPT_ARGS, "--devices", devices,
                                         "--out", out, capsys=capsys)
        else:
            proc = run_script(*SCRIPT_ARGS, "--devices", devices, "--out", out, cwd=tmp_path)
            code, stdout, err = proc.returncode, proc.stdout, proc.stderr
        assert code == 0, err
        assert f"{devices} cpu device(s)" in stdout
        assert "held-out perplexity" in stdout
        assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC)
        results[devices] = json.loads((out / "metrics.json").read_text())
    one, four = results["1"], results["4"]
    assert (one["devices"], four["devices"]) == (1, 4)
    assert four["corpus"]["vocab_size"] == 300 and four["unigram_heldout_perplexity"] > 1
    # Same seed and batches: sharding the batch must not change the numbers.
    a = [h["train_loss"] for h in one["history"]]
    b = [h["train_loss"] for h in four["history"]]
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert four["final_heldout"]["perplexity"] == pytest.approx(
        one["final_heldout"]["perplexity"], rel=1e-4)


@pytest.mark.parametrize(
    "args,message",
    [
        (("--devices", "0"), "--devices must be positive"),
        (("--devices", "4", "--batch-size", "30"), "must be divisible by --devices 4"),
        (("--max-files", "1"), "--max-files must be at least 2"),
        (("--vocab", "1"), "vocab_size must be at least 2, got 1"),
    ],
)
def test_script_rejects_bad_flags(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # --devices sets it; restored afterwards
    code, _, err = run_main("train_lm.py", *args, capsys=capsys)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_script_resumes_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # --devices sets it; restored afterwards
    out = tmp_path / "run"
    common = (*SCRIPT_ARGS, "--devices", "1", "--out", out)
    code, _, err = run_main("train_lm.py", *common, "--steps", "3", capsys=capsys)
    assert code == 0, err
    assert (out / "checkpoint.npz").is_file()
    code, again, err = run_main("train_lm.py", *common, "--steps", "6", "--resume",
                                capsys=capsys)
    assert code == 0, err
    assert "resumed from" in again and "at step 3" in again
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 3
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3, 4, 5, 6]
    code, _, err = run_main("train_lm.py", *common, "--steps", "9", "--hidden", "40",
                            "--resume", capsys=capsys)
    assert code == 1 and "Traceback" not in err
    assert "hidden 32 (now 40)" in err


def test_script_interrupt_names_the_saved_step(tmp_path, capsys, monkeypatch):
    from experiments.lm import loop

    script = load_script("train_lm.py")
    real_save = loop.save_state

    def save_then_interrupt(*a, **kw):
        real_save(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", save_then_interrupt)
    out = tmp_path / "run"
    assert script.main([*SCRIPT_ARGS, "--no-progress", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"step 3 is saved in {out / 'checkpoint.npz'}; continue with: python" in err
    assert err.rstrip().endswith(f"--out {out} --resume")


def test_script_reports_unwritable_output_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_main("train_lm.py", *SCRIPT_ARGS, "--steps", "1", "--out",
                            blocker / "out", capsys=capsys)
    assert code == 1
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and str(blocker) in err
