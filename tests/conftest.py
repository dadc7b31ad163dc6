"""Fixtures shared by the library's tests."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import pytest


@pytest.fixture
def x64() -> Iterator[None]:
    """Runs a test with float64 enabled, without changing the setting for other tests."""
    with jax.enable_x64(True):
        yield
