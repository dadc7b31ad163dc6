"""The code-search experiment (experiments.retrieval, scripts/train_retrieval.py) at
tiny settings: the split, the metrics, a short training run, the ring against one device and
the script's outputs and errors."""

from __future__ import annotations

import ast
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from _scripts import load_script

from experiments import retrieval as R

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_retrieval.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A vocabulary for synthetic modules whose docstrings name what the code does, so that a
# small model can learn to match them in a few steps.
_NOUNS = ("count", "name", "path", "size", "owner", "color", "weight", "label", "price", "speed")
_VERBS = ("get", "set", "reset", "check", "update", "print")


def write_source(root: Path, files: int = 6) -> Path:
    """``files`` small modules of 10 documented functions each (one verb-noun pair per
    function), plus one undocumented function, one documented stub and one repeat of the
    first module's first function (which the loader must drop)."""
    combos = list(itertools.product(_VERBS, _NOUNS))
    rng = np.random.default_rng(0)
    rng.shuffle(combos)
    for f in range(files):
        parts = []
        for verb, noun in combos[10 * f : 10 * f + 10]:
            parts.append(f'''
                def {verb}_{noun}(self, value=None):
                    """{verb.capitalize()} the {noun} of this object.

                    A second paragraph that the query leaves out.
                    """
                    self.{noun}_log.append("{verb}")
                    return self._{noun}
                ''')
        parts.append("\ndef helper(x):\n    return x + 1\n")
        parts.append('\ndef stub():\n    """Only a docstring."""\n')
        if f == files - 1:
            verb, noun = combos[0]
            parts.append(f'\ndef again():\n    """{verb.capitalize()} the {noun} of this'
                         f' object."""\n    return 0\n')
        (root / f"mod{f}.py").write_text("".join(textwrap.dedent(p) for p in parts))
    return root


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def test_subword_tokens() -> None:
    assert R.subword_tokens("def getHTTPResponse(self, max_len=10):") == [
        "def", "get", "http", "response", "self", "max", "len", "10"]


def test_extract_pairs_strips_every_docstring() -> None:
    source = textwrap.dedent('''
        def outer(a):
            """Add one to a.

            More text.
            """
            def inner(b):
                """Secret inner docstring."""
                return b
            return inner(a) + 1

        def stub():
            """Nothing after me."""

        def plain():
            return 2
        ''')
    pairs = R.extract_pairs(source, "m.py")
    assert [p.query for p in pairs] == ["Add one to a.", "Secret inner docstring."]
    outer = pairs[0]
    assert "Secret" not in outer.code and "Add one" not in outer.code
    assert outer.code.startswith("def outer(a):") and "return inner(a) + 1" in outer.code
    ast.parse(outer.code)  # valid code
    assert R.extract_pairs("def broken(:\n", "x.py") == []


def test_split_has_no_file_in_both(tmp_path: Path) -> None:
    split = R.load_pairs(vocab_size=100, heldout_every=3, root=write_source(tmp_path))
    train, held = split.files("train"), split.files("heldout")
    assert train and held and not train & held
    assert held == {"mod2.py", "mod5.py"}  # every 3rd file in sorted order
    assert len(split.train) == 40 and len(split.heldout) == 20  # "again" repeats a query
    queries = [p.query for p in split.train + split.heldout]
    assert len(set(queries)) == len(queries)
    assert split.heldout_query.tokens.shape == (20, 32)
    # The encoded rows spell the texts' sub-words with the training vocabulary.
    first = split.heldout[0]
    ids = split.heldout_query.tokens[0, : split.heldout_query.lengths[0]]
    known = set(split.vocab)
    assert [split.vocab[i] for i in ids] == [
        t if t in known else "<unk>" for t in R.subword_tokens(first.query)]


@pytest.mark.parametrize("every, held", [(3, {"mod2.py", "mod5.py"}), (10, {"mod5.py"})])
def test_both_experiments_hold_out_the_same_files(tmp_path: Path, every: int,
                                                  held: set[str]) -> None:
    # Every k-th file in sorted order, or the last one when there are fewer than k.
    from experiments import lm

    write_source(tmp_path)
    split = R.load_pairs(vocab_size=100, heldout_every=every, root=tmp_path)
    assert split.files("heldout") == held and len(split.files("train")) == 6 - len(held)
    corpus = lm.load_corpus(vocab_size=50, heldout_every=every, root=tmp_path)
    assert (corpus.train_files, corpus.heldout_files) == (6 - len(held), len(held))
    # The held-out text is the held-out files' own.
    vocab = {tok: i for i, tok in enumerate(corpus.vocab)}
    text = "".join((tmp_path / name).read_text() for name in sorted(held))
    assert corpus.heldout.tolist() == [vocab.get(t, 0) for t in lm.tokenize(text)]


def test_split_of_the_standard_library() -> None:
    split = R.load_pairs(vocab_size=2000, max_files=40, heldout_every=4)
    assert split.train and split.heldout
    assert not split.files("train") & split.files("heldout")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def test_recall_on_a_hand_built_matrix() -> None:
    s = np.array([
        [0.9, 0.1, 0.2, 0.3],  # answer first: rank 0
        [0.5, 0.4, 0.6, 0.1],  # two above: rank 2
        [0.2, 0.7, 0.7, 0.0],  # tied with one: counts against, rank 1
        [0.8, 0.9, 0.95, 0.3],  # last: rank 3
    ])
    np.testing.assert_array_equal(R.ranks(s), [0, 2, 1, 3])
    m = R.retrieval_metrics(s, ks=(1, 2, 10))
    assert m["recall@1"] == 0.25 and m["recall@2"] == 0.5 and m["recall@10"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 4) / 4)
    assert m["random_recall@1"] == 0.25 and m["random_recall@10"] == 1.0
    assert m["pool"] == 4
    # A collapsed model (all scores equal) finds nothing rather than everything.
    assert R.retrieval_metrics(np.ones((5, 5)), ks=(1,))["recall@1"] == 0.0


def test_ranks_match_a_sort() -> None:
    rng = np.random.default_rng(1)
    s = rng.integers(0, 4, size=(30, 30)).astype(float)  # many ties
    # Reference: place each answer after its ties in a descending sort.
    ref = [list(np.lexsort((np.arange(30) == i, -row))).index(i) for i, row in enumerate(s)]
    np.testing.assert_array_equal(R.ranks(s), ref)


def test_random_recall_is_the_chance_value() -> None:
    assert R.random_recall_at_k(1, 200) == 1 / 200
    assert R.random_recall_at_k(10, 200) == 10 / 200
    assert R.random_recall_at_k(10, 4) == 1.0
    rng = np.random.default_rng(2)
    n, trials = 50, 400
    hits = [R.retrieval_metrics(rng.random((n, n)), ks=(1, 10)) for _ in range(trials)]
    for k in (1, 10):
        p = k / n
        mean = np.mean([h[f"recall@{k}"] for h in hits])
        assert abs(mean - p) < 4 * np.sqrt(p * (1 - p) / (n * trials))
    with pytest.raises(ValueError, match="square"):
        R.ranks(np.zeros((2, 3)))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_tiny_run_learns(tmp_path: Path, loss: str) -> None:
    split = R.load_pairs(vocab_size=100, heldout_every=3, root=write_source(tmp_path))
    cfg = R.RetrievalConfig(loss=loss, batch_size=20, steps=30, learning_rate=1e-2,
                            embed_dim=16, hidden=32, eval_every=15)
    result = R.train(cfg, split, log=lambda _: None)
    losses = np.array([h["loss"] for h in result.history])
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    assert [e["step"] for e in result.evals] == [0, 15, 30]
    # Held-out functions it never saw: the untrained towers already match shared words (about
    # half at recall@1, chance 1/20); training finds nearly all.
    assert result.evals[0]["recall@1"] < 0.7
    assert result.final["recall@1"] >= 0.9
    assert result.final["random_recall@1"] == 1 / 20


def test_batches_are_distinct_pairs_and_padding_is_masked(tmp_path: Path) -> None:
    split = R.load_pairs(vocab_size=100, heldout_every=3, root=write_source(tmp_path))
    stream = R.batches(split, 15, np.random.default_rng(0), multiple=4)
    seen = []
    for _ in range(2):  # one epoch of 40 pairs: two batches of 15, the tail skipped
        q_tok, q_len, c_tok, c_len, where = next(stream)
        assert q_tok.shape == (16, 32) and c_tok.shape == (16, 128)
        np.testing.assert_array_equal(where, np.arange(16) < 15)
        assert (q_len[15] == 0) and (c_len[15] == 0)
        seen.extend(map(bytes, q_tok[:15]))
    assert len(set(seen)) == 30
    with pytest.raises(ValueError, match="batch_size"):
        next(R.batches(split, 41, np.random.default_rng(0)))


_RING_CHECK = """
import json, sys
import jax, numpy as np, optax
from experiments import retrieval as R
split = R.load_pairs(vocab_size=100, heldout_every=3, root=sys.argv[1])
out = {}
for loss in ("clip", "siglip"):
    runs = []
    for devices in (None, 4):
        cfg = R.RetrievalConfig(loss=loss, batch_size=10, embed_dim=8, hidden=16,
                                devices=devices)
        opt = optax.sgd(1.0)
        params = R.init_params(jax.random.key(0), cfg, len(split.vocab))
        for k, side in enumerate(("query", "code")):  # so that w1 and b1 get gradients too
            params[side]["w2"] = 0.3 * jax.random.normal(jax.random.key(k + 1), (16, 8))
        start = [np.asarray(a) for a in jax.tree.leaves(params)]  # the step donates params
        mesh = R.make_mesh(devices) if devices else None
        step = R.make_train_step(cfg, opt, mesh)
        batch = R.take_batch(split, np.arange(3, 13), devices or 1)  # 10 pairs, padded to 12
        new, _, value = step(params, opt.init(params), batch)
        runs.append((float(value), jax.tree.leaves(new)))
    (v1, p1), (v4, p4) = runs
    out[loss] = {"loss": [v1, v4],
                 "param_diff": max(float(np.abs(a - b).max()) for a, b in zip(p1, p4)),
                 "moved": min(float(np.abs(a - b).max())
                              for a, b in zip(p1, start))}
print(json.dumps(out))
"""


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "scripts"),
                                       os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu", MPLBACKEND="Agg", **extra)


def test_ring_over_devices_matches_one_device(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    write_source(root)
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, "-c", _RING_CHECK, str(root)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for loss in ("clip", "siglip"):
        one, ring = out[loss]["loss"]
        assert ring == pytest.approx(one, rel=1e-5)
        # One SGD step with lr 1 moves every leaf, and the same way on both paths.
        assert out[loss]["moved"] > 1e-4
        assert out[loss]["param_diff"] < 1e-5


# --------------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------------


def _script(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=240)


def test_script_writes_metrics_and_figure(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_source(src)
    out = tmp_path / "run"
    args = ("--source", src, "--heldout-every", "3", "--batch-size", "15", "--steps", "20",
            "--eval-every", "10", "--embed", "16", "--hidden", "16",
            "--devices", "2", "--out", out)
    done = _script(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("recall@1", "recall@10", "random_recall@1", "random_recall@10", "mrr"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["random_recall@1"] == 1 / 20 and metrics["pool"] == 20
    assert metrics["config"]["devices"] == 2 and metrics["config"]["loss"] == "clip"
    assert len(metrics["history"]) == 20 and [e["step"] for e in metrics["evals"]] == [0, 10, 20]
    assert metrics["data"]["train_pairs"] == 40
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert "recall@1" in done.stdout
    # A second run into the same folder is refused, then allowed with --overwrite.
    again = _script(*args, cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip() == (
        f"train_retrieval.py: error: {out} already holds a run (metrics.json and 1 more);"
        " pass --overwrite to start over")


def test_script_bad_steps_in_a_subprocess(tmp_path: Path) -> None:
    done = _script("--steps", "0", "--out", tmp_path / "r", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "train_retrieval.py: error: steps must be positive, got 0"]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "1"], "batch_size must be at least 2"),
    (["--devices", "0"], "devices must be positive"),
    (["--devices", str(len(jax.devices()) + 1)], "devices but JAX sees"),
    (["--lr", "nan"], "learning_rate must be a positive number"),
    (["--vocab", "1"], "vocab_size must be at least 2"),
    (["--max-files", "1"], "max_files must be at least 2"),
    (["--batch-size", "41"], "--batch-size 41 is more than the 40 training pairs"),
    (["--source", "/nonexistent/folder"], "/nonexistent/folder not found"),
])
def test_script_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str) -> None:
    # main() sets XLA_FLAGS for --devices; keep that out of the later tests' environment.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    write_source(tmp_path)
    script = load_script("train_retrieval.py")
    code = script.main(["--source", str(tmp_path), "--heldout-every", "3",
                        "--out", str(tmp_path / "r"), "--no-progress", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2)
    assert len(err) == 1 and err[0].startswith("train_retrieval.py: error: ") and message in err[0]
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_script_names_the_missing_extras(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script("train_retrieval.py")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    with pytest.raises(SystemExit) as exit_:
        script.main(["--out", str(tmp_path / "r")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_retrieval.py: error: tqdm is not installed")
    assert err[0].endswith("the scripts need their extras: pip install 'softmax_jax[scripts]'")


def test_script_refuses_an_old_run_and_overwrite_removes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_source(src)
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "curves.png").write_text("old")
    script = load_script("train_retrieval.py")
    flags = ["--source", str(src), "--heldout-every", "3", "--out", str(out), "--no-progress"]
    # Without --overwrite: refused, nothing touched. (No --resume: it keeps no checkpoint.)
    assert script.main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train_retrieval.py: error: {out} already holds a run (metrics.json and 1"
                   " more); pass --overwrite to start over"]
    assert (out / "metrics.json").read_text() == "{}"
    # With a bad setting: refused before anything is removed.
    assert script.main([*flags, "--overwrite", "--steps", "0"]) == 2
    assert "steps must be positive" in capsys.readouterr().err
    assert (out / "metrics.json").exists() and (out / "curves.png").exists()
    # With good flags the old files go before the work starts: a run that then fails (here
    # on the data: 40 training pairs) leaves nothing that could pass for its own output.
    assert script.main([*flags, "--overwrite", "--batch-size", "41"]) == 2
    assert "more than the 40 training pairs" in capsys.readouterr().err
    assert not (out / "metrics.json").exists() and not (out / "curves.png").exists()


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_step_loss_is_the_loss_of_the_towers(loss: str) -> None:
    # The step's loss against optax's materialised formula on the towers' own embeddings,
    # with the learned scale (and bias): the plumbing between towers and loss.
    cfg = R.RetrievalConfig(loss=loss, batch_size=4, embed_dim=4, hidden=4)
    params = R.init_params(jax.random.key(0), cfg, 7)
    for k, side in enumerate(("query", "code")):  # MLPs that do something (init: zero)
        params[side]["w2"] = jax.random.normal(jax.random.key(k + 1), (4, 4))
    opt = optax.adam(1e-3)
    tokens = np.array([[1, 2, 0], [3, 4, 5], [6, 0, 0], [2, 2, 2]], np.int32)
    lengths = np.array([2, 3, 1, 3], np.int32)
    batch = (tokens, lengths, tokens[::-1].copy(), lengths[::-1].copy(), np.ones(4, bool))
    u = np.asarray(R.embed(params, "query", tokens, lengths))
    v = np.asarray(R.embed(params, "code", batch[2], batch[3]))
    logit = {k: float(a) for k, a in params["logit"].items()}
    z = math.exp(logit["log_scale"]) * (u @ v.T)
    if loss == "clip":
        ref = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(z, np.arange(4))
                     + optax.softmax_cross_entropy_with_integer_labels(z.T, np.arange(4))).mean()
    else:
        eye = np.eye(4, dtype=z.dtype)
        ref = optax.sigmoid_binary_cross_entropy(z + logit["bias"], eye).sum(1).mean()
    _, _, value = R.make_train_step(cfg, opt)(params, opt.init(params), batch)
    assert float(value) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_step_compiles_once(tmp_path: Path, loss: str) -> None:
    # Weakly typed initial parameters made Adam's first update change their type, and every
    # run compiled the step two or three times (seconds each at the real batch sizes).
    cfg = R.RetrievalConfig(loss=loss, batch_size=4, embed_dim=4, hidden=4)
    params = R.init_params(jax.random.key(0), cfg, 7)
    opt = optax.adam(1e-3)
    state = opt.init(params)
    step = R.make_train_step(cfg, opt)
    tokens = np.array([[1, 2], [3, 4], [5, 6], [2, 2]], np.int32)
    lengths = np.full((4,), 2, np.int32)
    batch = (tokens, lengths, tokens, lengths, np.ones(4, bool))
    for _ in range(3):
        params, state, _ = step(params, state, batch)
    assert step._cache_size() == 1
