"""The benchmark script runs end to end on small inputs and reports every row."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _scripts import load_module
from _subprocess import repo_env

ROOT = Path(__file__).resolve().parents[2]


def _core_case_names() -> list[str]:
    module = load_module(ROOT / "scripts" / "benchmark.py", "benchmark")
    return [c.name for c in module.core_cases(4, 5, np.float32)]


CORE_ARGS = ["--n", "32", "--v", "50"]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> dict[str, str]:
    """The environment of a benchmark subprocess, with one JAX compilation cache shared by
    every core-suite run of this module: the runs compile the same programs (the same N and
    V), so only the first compiles them."""
    return repo_env(drop=("GLIBC_TUNABLES",),
                    JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.mark.parametrize("extra", [[], ["--hugepages"]], ids=["default", "hugepages"])
def test_core_benchmark_small_run_prints_a_complete_table(extra, compile_cache):
    # The table's structure, not the speed (the benchmark itself measures that).
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *CORE_ARGS,
         "--repeats", "2", "--rounds", "2", *extra],
        capture_output=True, text=True, check=True, timeout=300, env=compile_cache,
    ).stdout
    header = out.splitlines()[0]
    assert ("glibc.malloc.hugetlb=1" in header) == bool(extra), header
    assert "N=32, V=50, 2 round(s) of 2 interleaved runs (medians)" in out, out
    rows = _table(out, "| function | anchor | anchor ms | softmax_jax ms | time ratio")
    assert [r[0] for r in rows] == _core_case_names(), out
    for row in rows:
        assert len(row) == 9, row
        assert row[1], row  # every row names its anchor
        for cell in (row[2], row[3], row[7], row[8]):  # milliseconds and MiB
            assert re.fullmatch(r"\d+(\.\d)?", cell), row
        assert re.fullmatch(r"\d+\.\d\dx", row[4]), row
        low, high = (float(t) for t in row[5].split("-"))  # the range over rounds
        assert low <= float(row[4][:-1]) <= high, row


def _table(out: str, header_start: str) -> list[list[str]]:
    """The data rows (cells) of the markdown table whose header starts with header_start."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_fused_suite_quick_run_prints_every_table(capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", [*sys.path])  # the suite puts scripts/ on the path
    load_module(ROOT / "scripts" / "benchmark.py", "benchmark").main(
        ["--suite", "fused", "--quick", "--repeats", "1"])
    out = capsys.readouterr().out
    ce = _table(out, "| N | D | V | anchor temp MiB")
    assert [r[:3] for r in ce] == [["96", "16", "300"], ["64", "8", "1000"]], out
    chunked = _table(out, "| loss | N | D | V | chunked ms")
    assert [r[0] for r in chunked] == ["cross-entropy", "distillation (T=2, beta=0)"] * 2
    for row in chunked:
        # The chunked anchor returns the unfused composition's numbers (relative error).
        assert float(row[9]) < 1e-4, row
    for row in chunked[0::2]:  # the fused cross-entropy is there and agrees too
        assert float(row[10]) < 1e-4, row
        assert re.fullmatch(r"\d+\.\d+x.*", row[6]), row
    bf16 = _table(out, "| loss | N | D | V | fused temp MiB")
    assert [r[:4] for r in bf16][0] == ["cross-entropy", "256", "64", "4096"]
    assert float(bf16[0][4]) > 0.0
    assert all(float(r[10]) < 1e-4 for r in chunked[1::2]), chunked
    assert float(bf16[1][4]) > 0.0


def test_timing_helpers_measure_and_compare():
    import jax
    import jax.numpy as jnp

    from experiments.timing import (
        compile_fn,
        interleaved_medians,
        max_rel_err,
        temp_bytes,
    )

    def f(x):
        return jnp.sum(jnp.exp(x)[:, None] * x[None, :])  # a 64 x 64 temporary

    x = jnp.arange(64.0)
    compiled, temp = compile_fn(f, (x,))
    assert float(compiled(x)) == float(f(x))
    assert temp == temp_bytes(f, (jax.ShapeDtypeStruct((64,), jnp.float32),))
    calls = []
    times = interleaved_medians([lambda x: calls.append("a") or x,
                                 lambda x: calls.append("b") or x], (x,), repeats=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up each, then round-robin
    assert len(times) == 2 and all(t >= 0.0 for t in times)
    assert max_rel_err({"a": jnp.array([1.0, 2.0])}, {"a": jnp.array([1.0, 4.0])}) == 0.5
    assert max_rel_err(jnp.array([2e-6]), jnp.array([1e-6])) == 1.0  # relative, not absolute
    assert max_rel_err(jnp.array([0.5]), jnp.zeros(1)) == 0.5  # absolute for an all-zero leaf


def _block(text: str, name: str) -> str:
    return text.split(f"<!-- {name} -->\n", 1)[1].split(f"<!-- /{name} -->", 1)[0]


def test_write_docs_rewrites_the_core_tables_and_keeps_the_header_true(tmp_path,
                                                                        compile_cache):
    from experiments import benchmark_docs

    page = tmp_path / "benchmarks.md"
    original = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    # The page's other tables come from an earlier run of the same commit on this machine.
    earlier = {**benchmark_docs.run_header(ROOT), "Date": "2000-01-01"}
    old_header = _block(original, "benchmark-header")
    before = original.replace(old_header, benchmark_docs.format_header(earlier))
    page.write_text(before, encoding="utf-8")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *CORE_ARGS,
         "--repeats", "1", "--rounds", "1", "--write-docs", "--docs", str(page)],
        capture_output=True, text=True, check=True, timeout=300, env=compile_cache,
    )
    after = page.read_text(encoding="utf-8")
    today = benchmark_docs.run_header(ROOT)["Date"]
    assert _block(after, "benchmark-header") == benchmark_docs.format_header(
        {**earlier, "Date": f"2000-01-01 to {today}"})
    for name, allocator in (("core-hugepages", "huge pages"), ("core-default",
                                                               "default allocator")):
        block = _block(after, name)
        assert block.startswith("Core: forward + gradient, float32, N=32, V=50,"), block
        assert block.splitlines()[0].endswith(f", {allocator}"), block
        assert [r[0] for r in _table(block, "| function |")] == _core_case_names()
    untouched = ("fused-cross-entropy", "fused-chunked", "contrastive-time")
    assert all(_block(after, n) == _block(before, n) for n in untouched)
    # Outside the rewritten blocks, the page is as it was.
    strip = re.compile(r"<!-- (core-\w+|benchmark-header) -->\n.*?<!-- /\1 -->", re.DOTALL)
    assert strip.sub("", after) == strip.sub("", before)


def test_write_docs_refuses_one_suite_under_another_runs_header(tmp_path, capsys):
    page = tmp_path / "benchmarks.md"
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    page.write_text(text.replace("- Commit:", "- Commit: another commit;"), encoding="utf-8")
    module = load_module(ROOT / "scripts" / "benchmark.py", "benchmark")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--suite", "fused", "--write-docs", "--docs", str(page)])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2, stderr
    assert "header names another" in stderr and "run --suite all" in stderr, stderr
    assert page.read_text(encoding="utf-8") == text.replace("- Commit:",
                                                            "- Commit: another commit;")


def test_docs_page_has_a_block_for_every_table_and_one_header():
    from experiments import benchmark_docs

    module = load_module(ROOT / "scripts" / "benchmark.py", "benchmark")
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert sorted(benchmark_docs.blocks(text)) == sorted(
        [benchmark_docs.HEADER, *module.DOC_TABLES])
    for name, (_, title) in module.DOC_TABLES.items():  # each block starts with its title
        assert re.search(title, _block(text, name).splitlines()[0]), name


def test_page_writer_replaces_only_the_named_blocks(tmp_path):
    from experiments import benchmark_docs

    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- benchmark-header -->\n- Date: 2000-01-01\n- Machine: m\n"
                    "- Versions: v\n- Commit: c\n<!-- /benchmark-header -->\n"
                    "<!-- a -->\nold a\n<!-- /a -->\nmiddle\n<!-- b -->\nold b\n<!-- /b -->\n")
    out = "noise\n\nTitle A, 3 rows\n\n| x | y |\n|---|---|\n| 1 | 2 |\n\nTitle B\n\n| z |\n"
    tables = benchmark_docs.tables_in(out, {"a": r"^Title A", "b": r"^Title B"})
    assert tables == {"a": "Title A, 3 rows\n\n| x | y |\n|---|---|\n| 1 | 2 |",
                      "b": "Title B\n\n| z |"}
    new = {"Date": "2001-02-03", "Machine": "m2", "Versions": "v2", "Commit": "c2"}
    # Every table rewritten: the header is this run's, whatever the page said.
    assert benchmark_docs.check_page(page, ["a", "b"], new) == new
    with pytest.raises(ValueError, match="header names another machine, versions, commit"):
        benchmark_docs.check_page(page, ["a"], new)
    same = {**new, "Machine": "m", "Versions": "v", "Commit": "c"}
    assert benchmark_docs.check_page(page, ["a"], same)["Date"] == "2000-01-01 to 2001-02-03"
    with pytest.raises(ValueError, match=r"lacks the blocks \['c'\]"):
        benchmark_docs.check_page(page, ["a", "c"], new)
    benchmark_docs.write_page(page, {"a": tables["a"]}, new)
    assert page.read_text() == (
        "intro\n<!-- benchmark-header -->\n- Date: 2001-02-03\n- Machine: m2\n- Versions: v2\n"
        "- Commit: c2\n<!-- /benchmark-header -->\n<!-- a -->\nTitle A, 3 rows\n\n| x | y |\n"
        "|---|---|\n| 1 | 2 |\n<!-- /a -->\nmiddle\n<!-- b -->\nold b\n<!-- /b -->\n")


@pytest.mark.parametrize("flags,message", [
    (["--only", "softmax"], "drop --only"),
    (["--suite", "fused", "--quick"], "give --docs PATH"),
])
def test_write_docs_refuses_partial_or_quick_tables_on_the_docs_page(flags, message, capsys):
    module = load_module(ROOT / "scripts" / "benchmark.py", "benchmark")
    with pytest.raises(SystemExit) as exit_:
        module.main([*flags, "--write-docs"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
