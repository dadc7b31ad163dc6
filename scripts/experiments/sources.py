"""The source files of the stdlib experiments and their split into training and held-out files.

Every experiment over the interpreter's own ``.py`` files (the language models' corpus,
:mod:`experiments.lm.corpus`; the code-search pairs,
:mod:`experiments.retrieval.data`) chooses and splits its files here, by one rule:
the files in sorted order, ``max_files`` of them evenly spaced when asked, and every
``heldout_every``-th one held out (the last one when there are fewer). Files are split, not
what is in them, so that no file lends text to both sides.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

__all__ = [
    "CorpusError",
    "check_split",
    "read_source",
    "source_root",
    "split_files",
    "stdlib_files",
]


class CorpusError(Exception):
    """The standard library's source could not be found or read."""


def source_root(root: str | Path | None = None) -> Path:
    """``root``, or the standard library's folder when it is None."""
    return Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files in sorted order (third-party packages excluded)."""
    base = source_root(root)
    if not base.is_dir():
        raise CorpusError(f"standard library folder {base} not found")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(
        p for p in base.rglob("*.py") if not skip.intersection(p.relative_to(base).parts)
    )
    if not files:
        raise CorpusError(f"no .py files under {base}")
    return files


def check_split(max_files: int | None, heldout_every: int,
                names: tuple[str, str] = ("max_files", "heldout_every")) -> None:
    """Raises ValueError naming the first of :func:`split_files`' settings out of range, by
    its name in ``names`` (the scripts pass their flags' names)."""
    if max_files is not None and max_files < 2:
        raise ValueError(f"{names[0]} must be at least 2 (train + held-out), got {max_files}")
    if heldout_every < 2:
        raise ValueError(f"{names[1]} must be at least 2, got {heldout_every}")


def split_files(root: str | Path | None, max_files: int | None,
                heldout_every: int) -> list[tuple[Path, bool]]:
    """``(path, held_out)`` of every file chosen, in sorted order.

    Args:
      root: the folder to read instead of the standard library (None).
      max_files: use only this many files, evenly spaced through the sorted list (for quick
        runs and tests); None for all.
      heldout_every: every ``heldout_every``-th file is held out; with fewer files than
        that, the last file is, so that neither side is empty.

    Raises:
      CorpusError: no folder, or no ``.py`` file in it.
      ValueError: ``max_files`` or ``heldout_every`` below 2.
    """
    check_split(max_files, heldout_every)
    files = stdlib_files(root)
    if max_files is not None:
        files = files[:: max(1, len(files) // max_files)][:max_files]
    held = [i % heldout_every == heldout_every - 1 for i in range(len(files))]
    if not any(held):
        held[-1] = True
    return list(zip(files, held, strict=True))


def read_source(path: Path) -> str | None:
    """The text of ``path``, or None when it cannot be read as UTF-8 (a few of the standard
    library's test fixtures are deliberately not UTF-8); the experiments skip such files."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
