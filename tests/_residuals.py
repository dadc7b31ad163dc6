"""Lists what reverse mode saves for the backward pass, through JAX's public printer."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable

from jax.ad_checkpoint import print_saved_residuals

_LINE = re.compile(r"^(\w+)\[([\d,\s]*)\]\s+(.*)$")


def saved_residuals(fn: Callable, *args) -> list[tuple[tuple[int, ...], str]]:
    """``(shape, reason)`` for every residual ``jax.vjp(fn, *args)`` keeps."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(fn, *args)
    out = []
    for line in buf.getvalue().splitlines():
        m = _LINE.match(line.strip())
        if m:
            dims = tuple(int(d) for d in m.group(2).split(",") if d.strip())
            out.append((dims, m.group(3)))
    assert out, f"could not parse residuals from: {buf.getvalue()!r}"
    return out
