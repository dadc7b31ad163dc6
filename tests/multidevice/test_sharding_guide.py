"""docs/sharding.md's code on 8 devices (the main suite runs it on one): its python blocks,
in order, in one namespace, with the 2 x 4 mesh the guide describes."""

from __future__ import annotations

from pathlib import Path

import jax
from _scripts import load_module

ROOT = Path(__file__).resolve().parents[2]
docs = load_module(ROOT / "tests" / "test_docs.py", "_docs_for_sharding_guide")


def test_sharding_guide_runs_on_a_two_by_four_mesh():
    blocks = docs._blocks(ROOT / "docs" / "sharding.md")
    assert len(blocks) >= 6
    namespace: dict[str, object] = {"__name__": "docs_sharding"}
    for block in blocks:
        exec(compile(block.code, block.id, "exec"), namespace)
    assert dict(namespace["mesh"].shape) == {"data": 2, "model": 4}  # type: ignore[attr-defined]
    assert "256@model" in str(jax.typeof(namespace["model"].head[...]))  # type: ignore[attr-defined]
