"""The stdlib corpus of the next-token experiments: files, tokens, vocabulary, windows.

Kept apart from the model and the training loop so that every script over this text
(``train_lm.py``, ``distill_lm.py``) reads, splits and encodes it the same way; the held-out
perplexities of different runs are only comparable when they are measured on the same ids.
See :mod:`experiments.lm` for the whole experiment.
"""

from __future__ import annotations

import collections
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments.sources import CorpusError, read_source, split_files, stdlib_files

__all__ = [
    "UNK",
    "Corpus",
    "CorpusError",
    "build_vocab",
    "load_corpus",
    "stdlib_files",
    "tokenize",
    "unigram_perplexity",
    "windows",
]

UNK = "<unk>"
#: Identifiers/words, digit runs, newlines, and any other non-space character alone.
TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+|\n|[^\sA-Za-z_0-9]")


def tokenize(text: str) -> list[str]:
    """Word-level tokens of ``text``.

    Examples:
      >>> tokenize("def f(x):\\n    return x + 10")
      ['def', 'f', '(', 'x', ')', ':', '\\n', 'return', 'x', '+', '10']
    """
    return TOKEN_RE.findall(text)


def build_vocab(counts: collections.Counter[str], size: int) -> list[str]:
    """``[UNK]`` plus the ``size - 1`` most frequent tokens (ties broken alphabetically)."""
    if size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {size}")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [UNK] + [tok for tok, _ in ranked[: size - 1] if tok != UNK]


def _encode(tokens: Iterable[str], index: dict[str, int]) -> np.ndarray:
    return np.fromiter((index.get(t, 0) for t in tokens), dtype=np.int32)


@dataclass
class Corpus:
    """Token ids of the training and held-out text, and the vocabulary (id 0 is ``<unk>``)."""

    train: np.ndarray
    heldout: np.ndarray
    vocab: list[str]
    train_files: int
    heldout_files: int
    train_counts: np.ndarray = field(repr=False)  # occurrences of each id in train

    def describe(self) -> dict[str, Any]:
        unk = float(np.mean(self.heldout == 0)) if len(self.heldout) else 0.0
        return {
            "vocab_size": len(self.vocab),
            "train_files": self.train_files,
            "heldout_files": self.heldout_files,
            "train_tokens": int(len(self.train)),
            "heldout_tokens": int(len(self.heldout)),
            "heldout_unk_rate": unk,
        }

    def fingerprint(self) -> str:
        """A CRC-32 of the vocabulary and both id arrays, as 8 hex digits.

        Checkpoints record it: parameters trained on one encoding are meaningless under
        another (same size, different words), and the sizes alone would not notice.
        """
        crc = zlib.crc32("\0".join(self.vocab).encode())
        crc = zlib.crc32(self.train.tobytes(), crc)
        return f"{zlib.crc32(self.heldout.tobytes(), crc):08x}"


def load_corpus(
    vocab_size: int = 32000,
    max_files: int | None = None,
    heldout_every: int = 20,
    root: str | Path | None = None,
) -> Corpus:
    """Reads, splits and encodes the standard library's source.

    Args:
      vocab_size: vocabulary size including ``<unk>``.
      max_files: use only this many files, evenly spaced through the sorted list (for quick
        runs and tests); None for all.
      heldout_every: every ``heldout_every``-th file (in sorted order) is held out; with
        fewer files than that, the last file is (the rule of
        :func:`experiments.sources.split_files`).
      root: the folder to read instead of the standard library.
    """
    files = split_files(root, max_files, heldout_every)
    split: dict[bool, list[str]] = {True: [], False: []}
    for path, is_held in files:
        text = read_source(path)
        if text is not None:
            split[is_held].extend(tokenize(text))
    if not split[False] or not split[True]:
        raise CorpusError(f"no readable text in the {len(files)} files chosen")
    counts = collections.Counter(split[False])
    vocab = build_vocab(counts, vocab_size)
    index = {tok: i for i, tok in enumerate(vocab)}
    train = _encode(split[False], index)
    heldout = _encode(split[True], index)
    return Corpus(
        train=train,
        heldout=heldout,
        vocab=vocab,
        train_files=sum(not held for _, held in files),
        heldout_files=sum(held for _, held in files),
        train_counts=np.bincount(train, minlength=len(vocab)),
    )


def windows(tokens: np.ndarray, positions: np.ndarray, context: int) -> tuple[np.ndarray, ...]:
    """``(contexts [B, context], targets [B])``: the ``context`` tokens before each position
    and the token at it. Positions must be at least ``context``."""
    offsets = np.arange(-context, 0)
    return tokens[positions[:, None] + offsets], tokens[positions]


def unigram_perplexity(corpus: Corpus) -> float:
    """Held-out perplexity of token frequencies (add-one smoothed): the no-context baseline."""
    probs = (corpus.train_counts + 1.0) / (corpus.train_counts.sum() + len(corpus.vocab))
    return float(np.exp(-np.mean(np.log(probs[corpus.heldout]))))
