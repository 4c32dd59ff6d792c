"""Is one model better than another on the same test users? A paired bootstrap over users.

Two models evaluated on the same users give per-user scores ``a_u`` and ``b_u`` (NDCG@10, say; see
``recsys.metrics.ndcg_of_ranks``). The statistic is the mean difference ``mean_u(a_u - b_u)``.
Drawing the users again with replacement, ``resamples`` times, gives as many means of the
differences; their ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles are the percentile interval.
A model is *significantly below* another when the whole interval lies below zero.

Pairing is what makes the test sharp: most of the spread of a per-user metric is between users
(some users are easy for every model), and the difference of two models on the same user cancels it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["BootstrapInterval", "paired_bootstrap"]


@dataclass(frozen=True)
class BootstrapInterval:
    """The mean difference ``a - b`` over users and its bootstrap interval."""

    mean: float
    low: float
    high: float
    level: float
    resamples: int
    users: int

    @property
    def significantly_below(self) -> bool:
        """``a`` is below ``b`` beyond the noise: the whole interval is under zero."""
        return self.high < 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> BootstrapInterval:
    """Mean of ``a - b`` over users with its percentile bootstrap interval (users resampled).

    ``a[u]`` and ``b[u]`` are the two models' scores of the same user ``u``. Deterministic for a
    ``seed``; memory is a few hundred resamples of the users at a time.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be 1-D arrays of the same users' scores, got shapes {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("a paired bootstrap needs at least one user")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("the per-user scores must be finite (a NaN or infinite score was given)")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if not (isinstance(level, float) and 0.0 < level < 1.0) or math.isnan(level):
        raise ValueError(f"level must be a float strictly between 0 and 1, got {level!r}")
    diff = a - b
    n = diff.size
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, min(resamples, 2**24 // n))  # at most about 16M drawn indices held at once
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        means[start:stop] = diff[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return BootstrapInterval(float(diff.mean()), float(low), float(high), level, resamples, n)
