"""Copy the benchmark tables into ``docs/benchmarks.md`` (``scripts/benchmark.py --write-docs``).

The page holds each table between ``<!-- name -->`` and ``<!-- /name -->`` lines, and one
header block, ``benchmark-header``, that gives the date, machine, jax and optax versions and
commit of the run. A table is found in the benchmark's printed output by its title line (the
line above the table), so the suites print as they always do and this module reads them.

The header must be true of every table on the page. A run that rewrites every table also
rewrites the header. A run that rewrites only some (one suite) is accepted only when the page's
header already names the same machine, versions and commit; the date then spans both runs.

Only the standard library and JAX are needed (no ``scripts`` extra).
"""

from __future__ import annotations

import datetime
import io
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import jax

__all__ = [
    "HEADER",
    "Tee",
    "blocks",
    "capture_stdout",
    "check_page",
    "format_header",
    "machine",
    "run_header",
    "tables_in",
    "write_page",
]

HEADER = "benchmark-header"
_FIELDS = ("Date", "Machine", "Versions", "Commit")


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"^<!-- {re.escape(name)} -->\n(.*?)^<!-- /{re.escape(name)} -->$",
                      re.MULTILINE | re.DOTALL)


def blocks(text: str) -> list[str]:
    """The names of the ``<!-- name -->`` blocks of a page, in order."""
    return [m.group(1) for m in re.finditer(r"^<!-- /([\w-]+) -->$", text, re.MULTILINE)]


def machine() -> str:
    """The processor, cores and memory of this host, and the JAX backend and devices."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        gib = f", {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB"
    except (ValueError, OSError, AttributeError):
        gib = ""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (f"{cpu}, {os.cpu_count()} cores{gib}; backend {jax.default_backend()},"
            f" {len(devices)} x {', '.join(kinds)}")


def _commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty",
                              "--abbrev=7"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return out.stdout.strip()


def run_header(root: Path) -> dict[str, str]:
    """The header fields of a run made now, from the checkout at ``root``."""
    import optax  # noqa: PLC0415  (the benchmarks need it anyway)

    return {
        "Date": datetime.date.today().isoformat(),
        "Machine": machine(),
        "Versions": f"jax {jax.__version__}, optax {optax.__version__}",
        "Commit": _commit(root),
    }


def format_header(fields: dict[str, str]) -> str:
    return "".join(f"- {name}: {fields[name]}\n" for name in _FIELDS)


def _read_header(text: str) -> dict[str, str]:
    match = _block(HEADER).search(text)
    body = match.group(1) if match else ""
    return dict(re.findall(r"^- (\w+): (.*)$", body, re.MULTILINE))


def check_page(path: Path, writes: Iterable[str], header: dict[str, str]) -> dict[str, str]:
    """The header to write on ``path`` after a run that fills the blocks ``writes``; raises
    ``ValueError`` if the page lacks one of them, or if the run leaves some of the page's
    tables as they are while the page's header names another machine, versions or commit."""
    text = path.read_text(encoding="utf-8")
    present = blocks(text)
    absent = [name for name in (HEADER, *sorted(set(writes))) if name not in present]
    if absent:
        raise ValueError(f"{path} lacks the blocks {absent}")
    kept = sorted(set(present) - set(writes) - {HEADER})
    if not kept:
        return header
    old = _read_header(text)
    differ = [k for k in _FIELDS[1:] if old.get(k) != header[k]]
    if differ:
        raise ValueError(
            f"{path}'s header names another {', '.join(k.lower() for k in differ)} than this"
            f" run ({', '.join(f'{k}: {old.get(k)!r} here {header[k]!r}' for k in differ)}),"
            f" and this run leaves the tables {kept} as they are; run --suite all")
    first = old.get("Date", header["Date"]).split(" to ")[0]
    return {**header, "Date": header["Date"] if first == header["Date"]
            else f"{first} to {header['Date']}"}


def tables_in(output: str, titles: dict[str, str]) -> dict[str, str]:
    """The tables of a benchmark's printed output, each with its title line, by block name:
    ``titles`` maps a block name to a regular expression that its title line matches."""
    lines = output.splitlines()
    found: dict[str, str] = {}
    for i, line in enumerate(lines):
        if not line.startswith("|") or (i and lines[i - 1].startswith("|")):
            continue
        j = i + 1
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        title = lines[k] if k >= 0 else ""
        for name, pattern in titles.items():
            if re.search(pattern, title):
                found[name] = "\n".join([title, "", *lines[i:j]])
    return found


def write_page(path: Path, tables: dict[str, str], header: dict[str, str]) -> None:
    """Rewrites the blocks ``tables`` and the header of ``path``; nothing else changes."""
    text = path.read_text(encoding="utf-8")
    for name, body in {HEADER: format_header(header).rstrip("\n"), **tables}.items():
        block = f"<!-- {name} -->\n{body}\n<!-- /{name} -->"
        text, count = _block(name).subn(lambda _, block=block: block, text, count=1)
        if count != 1:
            raise ValueError(f"{path} has no <!-- {name} --> block")
    path.write_text(text, encoding="utf-8")


class Tee(io.TextIOBase):
    """A stream that writes to ``stream`` and keeps a copy (:meth:`getvalue`)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream, self._copy = stream, io.StringIO()

    def write(self, s: str) -> int:
        self._copy.write(s)
        return self._stream.write(s)

    def flush(self) -> None:
        self._stream.flush()

    def getvalue(self) -> str:
        return self._copy.getvalue()


def capture_stdout() -> Tee:
    """Replaces ``sys.stdout`` with a :class:`Tee` of it, and returns the tee."""
    tee = Tee(sys.stdout)
    sys.stdout = tee
    return tee
