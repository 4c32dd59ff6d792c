"""Exact search with torch: ``topk(q @ Z.T)`` over blocks of item rows, with exclusion.

The reference every approximate retriever is measured against, and the retriever of an export
without an index (``SizedRecommender(..., use_index=False)``). Runs on the device of the item matrix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from serving.retrieval.base import Retriever
from serving.retrieval.checks import as_matrix, check_k
from serving.retrieval.exclusion import check_exclude, pad

__all__ = ["BLOCK_ROWS", "ExactRetriever", "torch_topk"]

# Item rows scored per matrix product: memory stays B * BLOCK_ROWS floats however large N is.
BLOCK_ROWS = 262_144


def _as_tensor(name: str, array: Any) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(as_matrix(name, array))


def torch_topk(
    queries: np.ndarray | torch.Tensor,
    vectors: np.ndarray | torch.Tensor,
    k: int,
    block_rows: int = BLOCK_ROWS,
    exclude: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``vectors`` by inner product with each query, excluded rows masked.

    Works over blocks of ``block_rows`` item rows and merges the running top-``k``. Excluded rows
    are set to ``-inf`` inside each block before its top-``k``, so the result is exactly the
    top-``k`` of the rows left. Runs on the device of ``queries`` when it is a tensor. Returns numpy
    float32 scores and int64 rows, padded with ``-inf`` / ``-1`` when fewer than ``k`` rows remain.
    """
    k = check_k(k)
    q = _as_tensor("queries", queries)
    z = _as_tensor("vectors", vectors)
    if q.ndim != 2 or z.ndim != 2 or q.shape[1] != z.shape[1]:
        raise ValueError(f"queries {tuple(q.shape)} and vectors {tuple(z.shape)} must be 2-D with equal widths")
    q = q.float()
    z = z.to(device=q.device, dtype=torch.float32)
    n = z.shape[0]
    masked_query = masked_row = None
    if exclude is not None:
        checked = check_exclude(exclude, q.shape[0], n)
        masked_query = torch.from_numpy(np.repeat(np.arange(len(checked)), [len(e) for e in checked])).to(q.device)
        masked_row = torch.from_numpy(np.concatenate([np.empty(0, np.int64), *checked])).to(q.device)
    best_scores = torch.empty(q.shape[0], 0, device=q.device)
    best_rows = torch.empty(q.shape[0], 0, dtype=torch.int64, device=q.device)
    with torch.no_grad():
        for start in range(0, n, block_rows):
            block = q @ z[start : start + block_rows].T
            if masked_row is not None and len(masked_row):
                inside = (masked_row >= start) & (masked_row < start + block.shape[1])
                block[masked_query[inside], masked_row[inside] - start] = -torch.inf
            s, i = torch.topk(block, min(k, block.shape[1]), dim=1)
            cand_scores = torch.cat([best_scores, s], dim=1)
            cand_rows = torch.cat([best_rows, i + start], dim=1)
            best_scores, pos = torch.topk(cand_scores, min(k, cand_scores.shape[1]), dim=1)
            best_rows = torch.gather(cand_rows, 1, pos)
    scores = best_scores.cpu().numpy().astype(np.float32)
    rows = best_rows.cpu().numpy()
    rows[np.isneginf(scores)] = -1  # only excluded rows score -inf: the vectors are finite
    return pad(scores, rows, k)


class ExactRetriever(Retriever):
    """Exact search over an item matrix held as a torch tensor (on its device); no files."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray | torch.Tensor, block_rows: int = BLOCK_ROWS) -> None:
        z = _as_tensor("vectors", vectors)
        if z.ndim != 2:
            raise ValueError(f"vectors must be 2-D (rows, dim), got shape {tuple(z.shape)}")
        self.vectors = z.detach().float()
        self.block_rows = block_rows

    @property
    def num_rows(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def search(
        self, queries: Any, k: int, exclude: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        q = _as_tensor("queries", queries).to(self.vectors.device)
        return torch_topk(q, self.vectors, k, self.block_rows, exclude)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def build(cls, vectors: np.ndarray | torch.Tensor, entry: dict[str, Any] | None = None) -> ExactRetriever:
        _check_entry(entry)
        return cls(vectors)

    @classmethod
    def load(
        cls, directory: str | os.PathLike, entry: dict[str, Any], vectors: np.ndarray | torch.Tensor, device: str = "auto"
    ) -> ExactRetriever:
        """Nothing to read: the retriever is the item matrix itself (on its own device)."""
        _check_entry(entry)
        return cls(vectors)


def _check_entry(entry: dict[str, Any] | None) -> None:
    extra = sorted(set(entry or {}) - {"kind"})
    if extra:
        raise ValueError(f"unknown exact retriever settings {extra}; it has none")
