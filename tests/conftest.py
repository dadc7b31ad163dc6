"""Fixtures shared by the library's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jax
import pytest

_HERE = Path(__file__).parent


@pytest.fixture
def x64() -> Iterator[None]:
    """Runs a test with float64 enabled, without changing the setting for other tests."""
    with jax.enable_x64(True):
        yield


def pytest_ignore_collect(collection_path, config) -> bool | None:
    """Leaves ``tests/multidevice`` to its own pytest process (8 simulated devices), unless
    the command line names it."""
    if collection_path.name == "multidevice" and collection_path.parent == _HERE:
        named = (str(a) for a in config.args)
        return not any("multidevice" in a for a in named)
    return None
