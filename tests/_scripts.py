"""The scripts as modules, for tests that call a script's ``main`` in the test process
(faster than a subprocess, and its output is captured with ``capsys``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/name`` (``"train_lm.py"``) loaded afresh as a module."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py") + "_script",
                                                  SCRIPTS / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
