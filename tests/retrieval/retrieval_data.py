"""Data and references shared by the retrieval tests (tests/test_retrieval*.py)."""

from __future__ import annotations

import numpy as np


def gaussian(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def clustered(n: int, d: int, num_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Items around 40 centres with a decaying spectrum (informative prefixes), and queries near them."""
    rng = np.random.default_rng(seed)
    scale = (1.0 + np.arange(d)) ** -0.5
    centres = rng.standard_normal((40, d)) * 3.0
    items = centres[rng.integers(0, 40, n)] + rng.standard_normal((n, d))
    queries = centres[rng.integers(0, 40, num_queries)] + rng.standard_normal((num_queries, d))
    return (items * scale).astype(np.float32), (queries * scale).astype(np.float32)


def min_gap(scores: np.ndarray) -> float:
    """Smallest distance between consecutive sorted scores: ranks are unambiguous above it."""
    return float(np.diff(-scores, axis=1).min())


def brute_force(queries: np.ndarray, items: np.ndarray, k: int, exclude=None) -> np.ndarray:
    """Reference rows by float64 scores with excluded rows masked."""
    scores = queries.astype(np.float64) @ items.astype(np.float64).T
    if exclude is not None:
        for b, rows in enumerate(exclude):
            scores[b, np.asarray(rows, dtype=np.int64)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    valid = np.take_along_axis(scores, order, axis=1) > -np.inf
    return np.where(valid, order, -1)


def standard_data() -> tuple[np.ndarray, np.ndarray]:
    # seeds chosen so that the exact top-50 has no near-ties (gaps > 1e-4, asserted in the tests)
    return gaussian(2000, 48, seed=4), gaussian(40, 48, seed=5)


def clustered_data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(6000, 32, 60)
