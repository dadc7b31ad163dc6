"""The code-search pairs: (docstring summary, function body) from the standard library's ``ast``.

Every ``def`` with a docstring and something after it gives one pair. The *query* is the
docstring's first paragraph (what a person would type); the *code* is the function unparsed
without any docstring (its own or a nested one), so the answer is never written inside it.
Comments are gone too, because ``ast`` drops them.

Files are split, not pairs: every ``heldout_every``-th file in sorted order is held out, so no
file is in both sets, and a pair whose query or code text occurred earlier (in train first,
then held-out) is dropped. The held-out pool therefore holds no exact copy of a training pair
and no two candidates with the same text, which would make recall ambiguous.

Text becomes sub-word tokens: identifiers are split at underscores and at lower-to-upper case
changes and lower-cased (``getLineNumber`` and ``get_line_number`` both give ``get line
number``), and punctuation is dropped, so that the words of a docstring can meet the names in
the code. The vocabulary comes from the training pairs alone.
"""

from __future__ import annotations

import ast
import collections
import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments.lm import build_vocab
from experiments.sources import (
    CorpusError,
    check_split,
    read_source,
    source_root,
    split_files,
)

__all__ = [
    "Encoded",
    "check_data_settings",
    "Pair",
    "PairSplit",
    "encode",
    "extract_pairs",
    "load_pairs",
    "subword_tokens",
]

_WORD_RE = re.compile(r"[A-Za-z]+|\d+")
_CAMEL_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")
#: Shorter queries or code (in sub-word tokens) carry too little to search with.
MIN_TOKENS = 3


def subword_tokens(text: str) -> list[str]:
    """Lower-cased sub-words of ``text``: identifiers split at ``_`` and case changes.

    Examples:
      >>> subword_tokens("def getLineNo(self, max_len=10):")
      ['def', 'get', 'line', 'no', 'self', 'max', 'len', '10']
    """
    out: list[str] = []
    for word in _WORD_RE.findall(text):
        parts = _CAMEL_RE.findall(word) if word[0].isalpha() else [word]
        out.extend(p.lower() for p in parts)
    return out


@dataclass(frozen=True)
class Pair:
    """One function: its docstring summary, its code without docstrings, and where it is."""

    query: str
    code: str
    file: str  # relative to the library root
    line: int


def _strip_docstrings(node: ast.AST) -> None:
    """Removes the docstring of ``node`` and of every function or class inside it."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if ast.get_docstring(sub, clean=False) is not None:
                sub.body = sub.body[1:] or [ast.Pass()]


def extract_pairs(source: str, file: str) -> list[Pair]:
    """The (docstring summary, code) pairs of one module's source; [] if it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []  # lib2to3's and the tests' deliberately broken fixtures
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2:
            continue
        summary = " ".join(doc.split("\n\n")[0].split())
        fn = copy.deepcopy(node)
        _strip_docstrings(fn)
        pairs.append(Pair(summary, ast.unparse(fn), file, node.lineno))
    return pairs


@dataclass
class Encoded:
    """Token ids (``[n, length]``, padded with 0) and the true lengths of one side."""

    tokens: np.ndarray
    lengths: np.ndarray


def encode(texts: list[str], index: dict[str, int], max_tokens: int) -> Encoded:
    """The first ``max_tokens`` sub-word ids of each text (0, ``<unk>``, for unknown words).

    Padding is 0 as well; the towers tell it from ``<unk>`` by the lengths.
    """
    tokens = np.zeros((len(texts), max_tokens), np.int32)
    lengths = np.zeros((len(texts),), np.int32)
    for i, text in enumerate(texts):
        ids = [index.get(t, 0) for t in subword_tokens(text)[:max_tokens]]
        tokens[i, : len(ids)] = ids
        lengths[i] = len(ids)
    return Encoded(tokens, lengths)


@dataclass
class PairSplit:
    """Training and held-out pairs, encoded with the training vocabulary (id 0 ``<unk>``)."""

    train: list[Pair]
    heldout: list[Pair]
    vocab: list[str]
    train_query: Encoded
    train_code: Encoded
    heldout_query: Encoded
    heldout_code: Encoded

    def files(self, which: str) -> set[str]:
        """The files that ``"train"`` or ``"heldout"`` pairs come from."""
        return {p.file for p in getattr(self, which)}

    def describe(self) -> dict[str, Any]:
        def unk(enc: Encoded) -> float:
            mask = np.arange(enc.tokens.shape[1]) < enc.lengths[:, None]
            return float(np.mean(enc.tokens[mask] == 0)) if mask.any() else 0.0

        return {
            "train_pairs": len(self.train),
            "heldout_pairs": len(self.heldout),
            "train_files": len(self.files("train")),
            "heldout_files": len(self.files("heldout")),
            "vocab_size": len(self.vocab),
            "heldout_unk_rate_query": unk(self.heldout_query),
            "heldout_unk_rate_code": unk(self.heldout_code),
        }


def _read_pairs(files: list[tuple[Path, bool]], base: Path) -> dict[bool, list[Pair]]:
    """Pairs per side (True: held out), without repeated query or code texts."""
    found: dict[bool, list[Pair]] = {False: [], True: []}
    for path, is_held in files:
        source = read_source(path)
        if source is not None:
            found[is_held].extend(extract_pairs(source, path.relative_to(base).as_posix()))
    seen: set[str] = set()
    kept: dict[bool, list[Pair]] = {False: [], True: []}
    for side in (False, True):  # train first: a held-out copy of a training text goes
        for pair in found[side]:
            q, c = subword_tokens(pair.query), subword_tokens(pair.code)
            if len(q) < MIN_TOKENS or len(c) < MIN_TOKENS:
                continue
            keys = ("q:" + " ".join(q), "c:" + pair.code)
            if seen.intersection(keys):
                continue
            seen.update(keys)
            kept[side].append(pair)
    return kept


def check_data_settings(vocab_size: int, max_files: int | None, heldout_every: int,
                        max_query_tokens: int, max_code_tokens: int, min_count: int = 1) -> None:
    """Raises ValueError naming the first of :func:`load_pairs`' arguments out of range."""
    check_split(max_files, heldout_every)
    for name, value, least in (("vocab_size", vocab_size, 2),
                               ("max_query_tokens", max_query_tokens, 1),
                               ("max_code_tokens", max_code_tokens, 1),
                               ("min_count", min_count, 1)):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")


def load_pairs(
    vocab_size: int = 16000,
    max_files: int | None = None,
    heldout_every: int = 10,
    max_query_tokens: int = 32,
    max_code_tokens: int = 128,
    root: str | Path | None = None,
    min_count: int = 3,
) -> PairSplit:
    """Reads, splits and encodes the code-search pairs of the standard library.

    Args:
      vocab_size: vocabulary size including ``<unk>``, over the training queries and code.
      max_files: use only this many files, evenly spaced through the sorted list (for quick
        runs and tests); None for all.
      heldout_every: every ``heldout_every``-th file (sorted) is held out; with fewer files,
        the last one is (the rule of :func:`experiments.sources.split_files`).
      max_query_tokens, max_code_tokens: sub-word tokens kept from the start of each side.
      root: the folder to read instead of the standard library.
      min_count: a sub-word seen fewer times in the training pairs is ``<unk>``. A word met
        once or twice is a name the towers can only memorise; on the standard library,
        dropping them (3 keeps about 5.7k of the 9.3k words) raises held-out recall.

    Raises:
      CorpusError: no folder, or no pairs on one of the two sides.
      ValueError: a bad argument.
    """
    check_data_settings(vocab_size, max_files, heldout_every, max_query_tokens, max_code_tokens,
                        min_count)
    files = split_files(root, max_files, heldout_every)
    pairs = _read_pairs(files, source_root(root))
    if not pairs[False] or not pairs[True]:
        raise CorpusError(
            f"the {len(files)} files chosen give {len(pairs[False])} training and"
            f" {len(pairs[True])} held-out pairs; both must be non-empty"
        )
    counts: collections.Counter[str] = collections.Counter()
    for pair in pairs[False]:
        counts.update(subword_tokens(pair.query)[:max_query_tokens])
        counts.update(subword_tokens(pair.code)[:max_code_tokens])
    vocab = build_vocab(collections.Counter({t: c for t, c in counts.items() if c >= min_count}),
                        vocab_size)
    index = {tok: i for i, tok in enumerate(vocab)}

    def side(ps: list[Pair], field: str, limit: int) -> Encoded:
        return encode([getattr(p, field) for p in ps], index, limit)

    return PairSplit(
        pairs[False], pairs[True], vocab,
        side(pairs[False], "query", max_query_tokens), side(pairs[False], "code", max_code_tokens),
        side(pairs[True], "query", max_query_tokens), side(pairs[True], "code", max_code_tokens),
    )
