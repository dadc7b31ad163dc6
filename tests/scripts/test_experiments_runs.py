"""What the scripts do with a run folder and a missing extra: nothing is lost, every failure
is one ``error:`` line that names the fix. A missing extra is checked in a fresh
interpreter (a subprocess); the rest call the scripts' ``main`` in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from _scripts import load_script, run_main

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
INSTALL = "pip install 'softmax_jax[scripts]'"

LM_ARGS = ("--vocab", "300", "--max-files", "8", "--heldout-every", "4", "--context", "4",
           "--batch-size", "64", "--eval-every", "3", "--eval-positions", "256",
           "--final-eval-positions", "512", "--no-progress")


def run_script(name: str, *args: str | Path, cwd: Path,
               pythonpath: tuple[Path, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(map(str, (*pythonpath, ROOT))))
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


# --- an existing run is never replaced silently ------------------------------------------------


@pytest.mark.parametrize(
    "script,marker,args",
    [
        ("train.py", "checkpoint.npz", ("--epochs", "1")),
        ("train.py", "compare.json", ("--compare", "--epochs", "1")),
        ("train_lm.py", "checkpoint.npz", ("--steps", "2", *LM_ARGS)),
        ("distill_lm.py", "metrics.json", ("--steps", "2", *LM_ARGS)),
        ("distill_lm.py", "teacher/checkpoint.npz", ("--steps", "2", *LM_ARGS)),
    ],
)
def test_an_existing_run_is_refused_without_resume_or_overwrite(tmp_path, capsys, script,
                                                                marker, args):
    out = tmp_path / "run"
    (out / marker).parent.mkdir(parents=True)
    (out / marker).write_bytes(b"an earlier run")
    code, _, err = run_main(script, *args, "--out", out, capsys=capsys)
    assert code == 2
    line = one_error_line(err)
    assert str(out) in line and "--resume" in line and "--overwrite" in line
    assert (out / marker).read_bytes() == b"an earlier run"


@pytest.mark.parametrize("script", ["train.py", "train_lm.py", "distill_lm.py"])
def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys, monkeypatch, script):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(script, "--resume", "--overwrite", capsys=capsys)
    assert code == 2 and "not allowed with argument" in err


@pytest.mark.parametrize(
    "script,marker,bad",
    [
        ("train.py", "checkpoint.npz", ("--eta", "-1")),
        ("train_lm.py", "checkpoint.npz", ("--lr", "-1", *LM_ARGS)),
        ("distill_lm.py", "metrics.json", ("--temperature", "0", *LM_ARGS)),
        ("train_retrieval.py", "metrics.json", ("--lr", "-1")),
    ],
)
def test_overwrite_with_a_bad_setting_keeps_the_old_run(tmp_path, capsys, script, marker, bad):
    # The settings are checked before --overwrite removes anything: a typo costs no run.
    out = tmp_path / "run"
    out.mkdir()
    (out / marker).write_bytes(b"an earlier run")
    try:
        code = load_script(script).main([*bad, "--out", str(out), "--overwrite"])
    except SystemExit as exit_:  # argparse's usage errors exit; main() returns the others
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert f"{script}: error:" in err and "Traceback" not in err
    assert (out / marker).read_bytes() == b"an earlier run"


@pytest.mark.parametrize("script", ["train_lm.py", "distill_lm.py"])
def test_overwrite_with_a_batch_the_devices_cannot_split_keeps_the_old_run(
        tmp_path, capsys, monkeypatch, script):
    # Without --devices the scripts take every local device: three here, pretended, which
    # cannot split a batch of 64. That is a usage error, found before the old run goes.
    from experiments import lm

    monkeypatch.setattr(lm, "make_mesh", lambda devices=None: SimpleNamespace(size=3))
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_bytes(b"an earlier run")
    code = load_script(script).main(["--steps", "2", *LM_ARGS, "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"{script}: error: --batch-size 64 must be divisible by the 3 devices"]
    assert (out / "metrics.json").read_bytes() == b"an earlier run"


def test_train_overwrite_starts_over(trained_run_copy, capsys, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = trained_run_copy
    assert json.loads((out / "metrics.json").read_text())["epochs_completed"] == 2
    code, _, err = run_main("train.py", "--epochs", "1", "--out", out, "--overwrite",
                            "--no-progress", capsys=capsys)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["epochs_completed"] == 1


# --- the scripts' extras ------------------------------------------------------------------------


def _hide(tmp_path: Path, module: str) -> Path:
    """A folder that, first on the path, makes ``import module`` fail as if not installed."""
    fake = tmp_path / "hidden" / module
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\","
                                      f" name={module!r})\n")
    return fake.parent


@pytest.mark.parametrize(
    "script,module,args",
    [
        ("train.py", "sklearn", ("--epochs", "1")),
        ("train_lm.py", "matplotlib", ("--steps", "1", *LM_ARGS)),
        ("distill_lm.py", "matplotlib", ("--steps", "1", *LM_ARGS)),
        ("slowdown.py", "matplotlib", ("--epochs", "2")),
    ],
)
def test_a_missing_extra_names_the_install_command(tmp_path, script, module, args):
    proc = run_script(script, *args, "--out", tmp_path / "o", cwd=tmp_path,
                      pythonpath=(_hide(tmp_path, module),))
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert INSTALL in line and module in line
    assert not (tmp_path / "o").exists()  # checked before any work
