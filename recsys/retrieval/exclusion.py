"""Excluding per-query row sets from result lists, and padding lists to ``k``: shared by every retriever.

Result lists follow the contract of :mod:`recsys.retrieval`: float32 scores in descending order,
int64 rows, and ``-1`` / ``-inf`` where fewer than ``k`` rows could be returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["check_exclude", "drop_excluded", "pad"]


def check_exclude(exclude: Sequence[Any], num_queries: int, num_rows: int) -> list[np.ndarray]:
    """One int64 array of rows in ``0..num_rows-1`` per query; anything else is a ``ValueError``."""
    if len(exclude) != num_queries:
        raise ValueError(f"exclude has {len(exclude)} entries for {num_queries} queries")
    out = []
    for q, rows in enumerate(exclude):
        rows = np.asarray(rows)
        if rows.size == 0:
            out.append(np.empty(0, dtype=np.int64))
            continue
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"exclude[{q}] must be a 1-D array of integer rows, got {rows.dtype} {rows.shape}")
        bad = (rows < 0) | (rows >= num_rows)
        if bad.any():
            raise ValueError(
                f"exclude[{q}] holds row {int(rows[bad][0])}, outside 0..{num_rows - 1} "
                "(rows are positions in the indexed matrix, not item ids)"
            )
        out.append(rows.astype(np.int64, copy=False))
    return out


def pad(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Widen results to ``k`` columns with ``-inf`` / ``-1``."""
    missing = k - rows.shape[1]
    if missing <= 0:
        return scores, rows
    b = rows.shape[0]
    scores = np.concatenate([scores, np.full((b, missing), -np.inf, dtype=np.float32)], axis=1)
    rows = np.concatenate([rows, np.full((b, missing), -1, dtype=np.int64)], axis=1)
    return scores, rows


def drop_excluded(
    scores: np.ndarray, rows: np.ndarray, exclude: list[np.ndarray], k: int, num_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove excluded rows (and ``-1`` holes) from each result list, keep the first ``k`` left.

    Vectorised: every (query, row) pair becomes one int64 key ``query * num_rows + row``, so one
    ``np.isin`` marks all excluded hits; a stable argsort of the drop mask then moves the kept
    entries to the front in their original (score) order.
    """
    b = rows.shape[0]
    query = np.arange(b, dtype=np.int64)[:, None]
    excluded_keys = np.concatenate(
        [q * num_rows + e for q, e in enumerate(exclude)] or [np.empty(0, np.int64)]
    )
    drop = (rows < 0) | np.isin(query * num_rows + rows, excluded_keys)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)
    rows = np.take_along_axis(rows, order, axis=1)
    dropped = np.take_along_axis(drop, order, axis=1)
    scores[dropped] = -np.inf
    rows[dropped] = -1
    return scores, rows
