"""Keeps docs/*.md, docs/zh/*.md and the top-level pages (README.md, CHANGELOG.md,
CONTRIBUTING.md, scripts/README.md) honest: their code runs and everything they cite exists.

- Plain ``python`` blocks are executed in order, one namespace per document, so a guide's
  examples cannot rot. A block that imports a package which is not installed (Equinox, say)
  is skipped; the blocks after it must not depend on it, or they fail where it is skipped.
- ``python`` blocks written as ``>>>`` examples are run as doctests, with the four-decimal
  print options of the docstring examples.
- Every ``path`` or ``path::name`` in backticks must name an existing file and, for
  ``::name``, a ``def``/``class`` (each part of a dotted name) or module-level assignment.
- The Chinese derivations cite exactly what the English ones cite, so neither can fall behind.

Documents are named by their path under ``docs/`` (``derivations.md``, ``zh/derivations.md``),
which keeps test ids and code-block namespaces apart for the translations; the other pages by
their path in the repository (``README.md``, ``scripts/README.md``).
"""

from __future__ import annotations

import ast
import doctest
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = ROOT / "docs"
DOCS = sorted(DOCS_DIR.glob("*.md")) + sorted((DOCS_DIR / "zh").glob("*.md"))
# The pages outside docs/ that readers meet first are held to the same rules.
DOCS += [p for p in (ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "CONTRIBUTING.md",
                     ROOT / "scripts" / "README.md") if p.is_file()]

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_CITATION = re.compile(
    r"`((?:softmax_jax|tests|scripts|docs)/[\w/.-]+?\.(?:py|md))(?:::([A-Za-z_][\w.]*))?`"
)


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    code: str

    @property
    def id(self) -> str:
        return f"{_doc_name(self.doc)}:L{self.line}"

    @property
    def is_doctest(self) -> bool:
        return self.code.lstrip().startswith(">>>")


def _blocks(doc: Path) -> list[Block]:
    text = doc.read_text(encoding="utf-8")
    return [
        Block(doc, text.count("\n", 0, m.start()) + 1, m.group(2))
        for m in _FENCE.finditer(text)
        if m.group(1) in ("python", "py")
    ]


BLOCKS = [b for doc in DOCS for b in _blocks(doc)]
SCRIPT_BLOCKS = [b for b in BLOCKS if not b.is_doctest]
DOCTEST_BLOCKS = [b for b in BLOCKS if b.is_doctest]


def _missing_packages(code: str) -> list[str]:
    """Top-level packages imported by ``code`` that cannot be found."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


@pytest.fixture(scope="module")
def script_results() -> dict[str, str | Exception | None]:
    """Runs every script block once, in document order; maps block id to its outcome:
    None (ran), a skip reason (str), or the exception it raised."""
    results: dict[str, str | Exception | None] = {}
    for doc in DOCS:
        namespace: dict[str, object] = {"__name__": "docs_" + _doc_name(doc)[:-3].replace("/", "_")}
        for block in (b for b in SCRIPT_BLOCKS if b.doc == doc):
            missing = _missing_packages(block.code)
            if missing:
                results[block.id] = f"needs {', '.join(missing)}, which is not installed"
                continue
            try:
                exec(compile(block.code, block.id, "exec"), namespace)
            except Exception as err:  # reported by the block's own test
                results[block.id] = err
            else:
                results[block.id] = None
    return results


@pytest.mark.parametrize("block", SCRIPT_BLOCKS, ids=lambda b: b.id)
def test_guide_blocks_run(block: Block, script_results) -> None:
    outcome = script_results[block.id]
    if isinstance(outcome, str):
        pytest.skip(outcome)
    if isinstance(outcome, Exception):
        raise AssertionError(f"the code block at {block.id} failed") from outcome


_NUMBER = re.compile(r"-?\d+\.\d+")


def _skeleton(text: str) -> str:
    return " ".join(_NUMBER.sub("#", text).split())


class _NumberChecker(doctest.OutputChecker):
    """doctest's checker plus pytest's ``NUMBER`` reading, as in the docstring examples: a
    decimal in the expected output matches any number that rounds to it at the precision
    written (``1.4076`` matches ``1.4076061``)."""

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        if super().check_output(want, got, optionflags):
            return True
        wants, gots = _NUMBER.findall(want), _NUMBER.findall(got)
        if len(wants) != len(gots) or _skeleton(want) != _skeleton(got):
            return False
        return all(
            abs(float(w) - float(g)) <= 0.5 * 10.0 ** -len(w.split(".")[1]) * (1 + 1e-9)
            for w, g in zip(wants, gots, strict=True)
        )


@pytest.mark.parametrize("block", DOCTEST_BLOCKS, ids=lambda b: b.id)
def test_doctest_blocks_run(block: Block) -> None:
    test = doctest.DocTestParser().get_doctest(block.code, {}, block.id, str(block.doc),
                                               block.line)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    runner = doctest.DocTestRunner(checker=_NumberChecker(), optionflags=flags, verbose=False)
    out: list[str] = []
    with np.printoptions(precision=4, floatmode="fixed", suppress=True):
        runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)


def _doc_name(doc: Path) -> str:
    return doc.relative_to(DOCS_DIR if doc.is_relative_to(DOCS_DIR) else ROOT).as_posix()


def _cited(doc: Path) -> Iterator[tuple[str, str | None]]:
    for m in _CITATION.finditer(doc.read_text(encoding="utf-8")):
        yield m.group(1), m.group(2)


def _citations() -> Iterator[tuple[str, str, str | None]]:
    for doc in DOCS:
        for path, name in _cited(doc):
            yield _doc_name(doc), path, name


CITATIONS = sorted(set(_citations()), key=lambda c: (c[0], c[1], c[2] or ""))


def _defines(source: str, name: str) -> bool:
    return bool(
        re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b", source, re.MULTILINE)
        or re.search(rf"^{re.escape(name)}\s*(?::[^=\n]*)?=", source, re.MULTILINE)
    )


def test_docs_cite_something() -> None:
    assert DOCS, "no docs/*.md found"
    assert any(doc == "derivations.md" for doc, _, _ in CITATIONS)
    assert any(doc == "zh/derivations.md" for doc, _, _ in CITATIONS)


def test_chinese_derivations_cite_what_the_english_ones_cite() -> None:
    english = set(_cited(DOCS_DIR / "derivations.md"))
    chinese = set(_cited(DOCS_DIR / "zh" / "derivations.md"))

    def show(targets: set[tuple[str, str | None]]) -> list[str]:
        return sorted(f"{p}::{n}" if n else p for p, n in targets)

    assert english == chinese, (
        f"only in docs/derivations.md: {show(english - chinese)}; "
        f"only in docs/zh/derivations.md: {show(chinese - english)}"
    )


@pytest.mark.parametrize(
    "doc,path,name", CITATIONS, ids=[f"{d}:{p}::{n}" if n else f"{d}:{p}" for d, p, n in CITATIONS]
)
def test_cited_names_exist(doc: str, path: str, name: str | None) -> None:
    file = ROOT / path
    assert file.is_file(), f"{doc} cites {path}, which does not exist"
    if name is None:
        return
    source = file.read_text(encoding="utf-8")
    for part in name.split("."):
        assert _defines(source, part), f"{doc} cites {path}::{name}, but {part!r} is not defined"


@pytest.mark.parametrize("doc", ["derivations.md", "zh/derivations.md"])
def test_derivations_numbers_match_the_library(doc: str) -> None:
    import jax
    import jax.numpy as jnp

    import softmax_jax as sj

    text = (DOCS_DIR / doc).read_text(encoding="utf-8")
    z = jnp.array([2.0, 3.0, 4.0])
    a = np.asarray(sj.softmax(z), np.float64)
    grad = np.asarray(jax.grad(sj.softmax_cross_entropy_with_integer_labels)(z, 1))
    loss = float(sj.softmax_cross_entropy_with_integer_labels(z, 1))
    wanted = [f"{v:.5f}" for v in a] + [f"{v:.4f}".replace("-", "−") for v in grad]
    wanted += [f"{loss:.4f}", f"{np.exp(2.0):.5f}", f"{np.exp([2.0, 3.0, 4.0]).sum():.5f}"]
    missing = [w for w in wanted if w not in text]
    assert not missing, f"docs/{doc} lacks the library's values {missing}"
