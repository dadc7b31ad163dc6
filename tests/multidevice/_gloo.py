"""gloo CPU collectives on 127.0.0.1, for the two-process workers."""

from __future__ import annotations

import functools


def gloo_on_loopback() -> None:
    """Makes gloo listen on 127.0.0.1 instead of the address of the machine's host name.

    JAX builds its gloo collectives without a host name; the wrapper supplies one. Where a
    JAX version builds them differently, nothing is patched (the coordinator is still bound
    to 127.0.0.1).
    """
    from jax._src import xla_bridge  # noqa: PLC0415

    lib = getattr(xla_bridge, "_jax", None)
    make = getattr(lib, "make_gloo_tcp_collectives", None)
    if make is not None:
        lib.make_gloo_tcp_collectives = functools.partial(make, hostname="127.0.0.1")
