r"""Retrieval metrics over a held-out pool: recall@k, its chance value, and the mean
reciprocal rank.

Every held-out query searches the whole pool of held-out code; its answer is the code of the
same pair (the diagonal of the similarity matrix ``S``). The rank of query :math:`i` counts the
other candidates that score at least as high as its answer,

.. math::
    r_i = \#\{\, j \ne i : S_{ij} \ge S_{ii} \,\},

so ties count against the model: a collapsed model whose scores are all equal ranks every
answer last rather than first. Then :math:`\text{recall@}k = \frac{1}{n}\sum_i [r_i < k]` and
:math:`\text{MRR} = \frac{1}{n}\sum_i 1/(r_i + 1)`.

A scorer that ranks the pool in uniformly random order puts the answer in the top :math:`k`
of :math:`C` candidates with probability :math:`\min(k, C)/C`, the ``random_recall@k``
reported beside each recall.
"""

from __future__ import annotations

import numpy as np

__all__ = ["random_recall_at_k", "ranks", "retrieval_metrics"]

#: The cut-offs reported.
KS = (1, 5, 10)


def ranks(similarity: np.ndarray) -> np.ndarray:
    """Per query, the number of other candidates scoring at least as high as its answer.

    Args:
      similarity: ``[n, n]`` scores of query ``i`` against candidate ``j``; the answer of
        query ``i`` is candidate ``i``.

    Returns:
      ``[n]`` int64 ranks, 0 for an answer that beats every other candidate.
    """
    s = np.asarray(similarity)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("similarity has non-finite entries")
    answer = np.diagonal(s)[:, None]
    return (s >= answer).sum(1).astype(np.int64) - 1  # minus the answer itself


def random_recall_at_k(k: int, candidates: int) -> float:
    """The recall@k of a random ranking of ``candidates``: ``min(k, candidates) / candidates``."""
    if k < 1 or candidates < 1:
        raise ValueError(f"k and candidates must be positive, got {k} and {candidates}")
    return min(k, candidates) / candidates


def retrieval_metrics(similarity: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """``recall@k`` and ``random_recall@k`` for each ``k``, ``mrr`` and ``pool`` (the size)."""
    r = ranks(similarity)
    n = len(r)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(r < k))
        out[f"random_recall@{k}"] = random_recall_at_k(k, n)
    out["mrr"] = float(np.mean(1.0 / (r + 1)))
    out["pool"] = n
    return out
