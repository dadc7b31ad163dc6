"""The rounding bound of a fused gradient with narrow (bfloat16/float16) inputs."""

from __future__ import annotations

import numpy as np


def gradient_rounding_ratios(grads, want, dz, x, w, eps: float) -> list[float]:
    """For ``grads = (dx, dw, db)`` computed from narrow ``x`` and ``w``, the largest ratio of
    each error against ``want`` (the same gradients in higher precision on the same rounded
    inputs) to its rounding bound.

    The fused rule rounds the logit gradient ``dz`` to the inputs' dtype before the products
    ``dz @ w.T``, ``x.T @ dz`` and ``sum(dz)``, which it accumulates in float32 and rounds
    once more. Each step costs at most half a spacing (``eps / 2`` relative), of
    ``|dz| @ |w|.T`` (resp. ``|x|.T @ |dz|``, ``sum |dz|``) for the first and of the result
    for the second: the bound used is one ``eps`` of each, twice that. A ratio <= 1 passes.
    """
    dz, x, w = (np.abs(np.asarray(a, np.float64)) for a in (dz, x, w))
    sizes = (dz @ w.T, x.T @ dz, dz.sum(0))
    ratios = []
    for g, r, size in zip(grads, want, sizes, strict=True):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        bound = eps * (size + np.abs(r)) + 1e-30
        ratios.append(float(np.max(np.abs(g - r) / bound)))
    return ratios
