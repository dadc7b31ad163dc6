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
