"""Recall of a retriever's result rows against the exact ones (benchmarks and tests)."""

from __future__ import annotations

import numpy as np

__all__ = ["recall_at_k"]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of ``|found_b ∩ truth_b| / |truth_b|`` (``-1`` entries ignored).

    ``found`` and ``truth`` are int64 ``(B, k1)`` and ``(B, k2)`` row arrays; recall@K of the exact
    top-K is ``recall_at_k(approx_rows[:, :K], exact_rows[:, :K])``.
    """
    found, truth = np.asarray(found), np.asarray(truth)
    if found.ndim != 2 or truth.ndim != 2 or len(found) != len(truth):
        raise ValueError(f"found {found.shape} and truth {truth.shape} must be 2-D with equal rows")
    b = len(truth)
    n = int(max(found.max(initial=0), truth.max(initial=0))) + 1
    query = np.arange(b, dtype=np.int64)[:, None]
    valid_truth = truth >= 0
    found_keys = (query * n + found)[found >= 0]
    hits = np.isin(query * n + truth, found_keys) & valid_truth
    per_query = hits.sum(axis=1) / np.maximum(valid_truth.sum(axis=1), 1)
    return float(per_query.mean())

