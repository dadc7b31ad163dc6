"""Files loaded as modules: the scripts, for tests that call a script's ``main`` in the test
process (faster than a subprocess, and its output is captured with ``capsys``), and the
subprocess check files, whose helpers the tests also call directly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_module(path: Path, name: str) -> ModuleType:
    """The file at ``path`` loaded afresh as the module ``name``, registered in
    ``sys.modules`` first (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_script(name: str) -> ModuleType:
    """``scripts/name`` (``"train_lm.py"``) loaded afresh as a module."""
    return load_module(SCRIPTS / name, name.removesuffix(".py") + "_script")


def run_main(name: str, *args: object, capsys) -> tuple[int, str, str]:
    """``scripts/name``'s ``main`` called in this process with ``args`` (faster than a
    subprocess: no second JAX start): its exit status (argparse's usage errors exit with
    2, ``main`` returns the others), and what it wrote to stdout and stderr."""
    try:
        code = load_script(name).main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    out = capsys.readouterr()
    return code, out.out, out.err
