"""The multi-device tests: 8 simulated CPU devices in their own pytest process.

JAX fixes its device count when its backend starts, so these tests cannot share a process
with the single-device suite. ``make test`` runs them as a second pytest process::

    python -m pytest tests/multidevice

The flag is set here, before any test imports JAX's backend. The main run skips this folder
(``collect_ignore`` in ``tests/conftest.py``) unless it is named on the command line.
"""

from __future__ import annotations

import os

DEVICES = 8

os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
) + f" --xla_force_host_platform_device_count={DEVICES}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices() -> None:
    assert jax.device_count() == DEVICES, (
        "the multi-device tests need their own process: run `python -m pytest tests/multidevice`"
    )
