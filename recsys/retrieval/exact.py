"""Exact search with torch: blocked ``q @ Z.T`` and a streaming top-k, with exclusion.

The reference every approximate retriever is measured against, and the default retriever of an
export (``recsys/export.py``). Runs on the device of the item matrix: torch's CPU or CUDA matrix
product and top-k, chosen at run time by where the tensors are.

How it works (docs/method.md §6)
--------------------------------
Item rows are scored block by block into one reused buffer (``scores = q @ Z[block].T``, at most
``BLOCK_ELEMENTS`` floats, never the whole ``B x N`` matrix; a fresh buffer per block costs more in
page faults than the product), and each query keeps its best ``k`` so far: the block's top-k is
merged with it by another top-k over ``2k`` candidates. A wide block's top-k first shortlists the
groups of ``GROUP`` columns whose maxima are the ``k + 1`` highest (:func:`_shortlist`, exact):
a top-k over all ``10^5`` scores of a line costs several times the product at size 64.

Ties: the result is exactly the top-``k`` of ``q @ Z.T`` with equal scores ordered by row, lower
first (what a stable descending sort of the whole score matrix gives). ``torch.topk`` is free to
choose among equal scores, so every top-k takes ``k + 1`` entries: where the ``k``-th and the
``(k+1)``-th are equal, the choice could matter, and those lines (rare: exactly equal scores at
the cut) are redone with a stable sort by score then row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from recsys.retrieval.base import Retriever
from recsys.retrieval.checks import as_matrix, check_k
from recsys.retrieval.exclusion import check_exclude

__all__ = ["BLOCK_ELEMENTS", "ExactRetriever", "torch_topk"]

#: the most scores held at once (256 MiB of float32): a block has ``BLOCK_ELEMENTS // B`` item rows
BLOCK_ELEMENTS = 1 << 26
#: columns per group of the top-k shortlist (:func:`_shortlist`), used from ``SHORTLIST_FROM * (k + 1)`` groups
GROUP = 32
SHORTLIST_FROM = 4
#: the widest block: more queries than ``BLOCK_ELEMENTS // WIDE_BLOCK`` (2,048 from 32,768 items on) are searched
#: that many at a time, so that blocks stay wide enough to shortlist (smaller blocks measured slower)
WIDE_BLOCK = 1 << 15


def _as_tensor(name: str, array: Any) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(as_matrix(name, array))


def _by_score_then_row(scores: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each line sorted by score descending, equal scores by row ascending (``-1`` rows last)."""
    by_row = torch.sort(torch.where(rows < 0, torch.iinfo(torch.int64).max, rows), dim=1, stable=True).indices
    scores, rows = torch.gather(scores, 1, by_row), torch.gather(rows, 1, by_row)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return torch.gather(scores, 1, order), torch.gather(rows, 1, order)


def _shortlist(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of each line that can hold its best ``k + 1``: the ``k + 1`` groups of ``GROUP``
    consecutive columns with the highest maxima, and the columns past the last whole group.

    Exact: a column outside those groups scores at most its group's maximum, which is at most
    each chosen group's maximum, so ``k + 1`` columns of the shortlist score at least as high.
    Where the shortlist's ``k``-th and ``(k+1)``-th scores differ, its top ``k`` is the line's;
    where they are equal, :func:`_top` orders the whole line. One pass of maxima over the line
    and a top-k over ``1/GROUP`` of it replace the top-k over all of it.
    """
    lines, width = scores.shape
    groups = width // GROUP
    head = groups * GROUP
    maxima = scores[:, :head].unflatten(1, (groups, GROUP)).amax(dim=2)
    best = torch.topk(maxima, k + 1, dim=1, sorted=False).indices
    columns = (best.unsqueeze(2) * GROUP + torch.arange(GROUP, device=scores.device)).flatten(1)
    if head < width:
        columns = torch.cat([columns, torch.arange(head, width, device=scores.device).expand(lines, -1)], dim=1)
    return torch.gather(scores, 1, columns), torch.gather(rows, 1, columns)


def _top(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``min(k, width)`` of each line of ``scores`` (``rows`` names its columns), equal scores by row."""
    width = scores.shape[1]
    short_scores, short_rows = (_shortlist(scores, rows, k) if width // GROUP >= SHORTLIST_FROM * (k + 1)
                                else (scores, rows))
    top, order = torch.topk(short_scores, min(k + 1, short_scores.shape[1]), dim=1)
    if width > k:
        tied = torch.nonzero((top[:, k - 1] == top[:, k]) & (top[:, k - 1] > -torch.inf)).view(-1)
        top, order = top[:, :k], order[:, :k]
    else:
        tied = torch.empty(0, dtype=torch.int64, device=scores.device)
    best_rows = torch.gather(short_rows, 1, order)
    if len(tied):  # ordered over the whole line: a column outside the shortlist may tie too
        fixed_scores, fixed_rows = _by_score_then_row(scores[tied], rows[tied])
        top[tied], best_rows[tied] = fixed_scores[:, :k], fixed_rows[:, :k]
    return top, best_rows


def torch_topk(
    queries: np.ndarray | torch.Tensor,
    vectors: np.ndarray | torch.Tensor,
    k: int,
    block_rows: int | None = None,
    exclude: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``vectors`` by inner product with each query, excluded rows left out.

    Scores blocks of ``block_rows`` item rows (default: as many as ``BLOCK_ELEMENTS`` scores allow)
    into one reused buffer and keeps a streaming top-``k`` (module docstring). Excluded rows are set
    to ``-inf`` inside each block. Runs on the device of ``queries`` when it is a tensor. Returns
    numpy float32 scores, descending (equal scores by row), and int64 rows, padded with ``-inf`` /
    ``-1`` when fewer than ``k`` rows remain.
    """
    k = check_k(k)
    q = _as_tensor("queries", queries)
    z = _as_tensor("vectors", vectors)
    if q.ndim != 2 or z.ndim != 2 or q.shape[1] != z.shape[1]:
        raise ValueError(f"queries {tuple(q.shape)} and vectors {tuple(z.shape)} must be 2-D with equal widths")
    q = q.float()
    z = z.to(device=q.device, dtype=torch.float32)
    b, n, device = q.shape[0], z.shape[0], q.device
    checked = None if exclude is None else check_exclude(exclude, b, n)
    chunk = b if block_rows is not None or device.type != "cpu" else max(1, BLOCK_ELEMENTS // min(n, WIDE_BLOCK))
    if b > chunk:  # on CPU many queries go a chunk at a time, so that each block stays wide enough to shortlist
        parts = [_blocked_topk(q[i : i + chunk], z, k, None, None if checked is None else checked[i : i + chunk])
                 for i in range(0, b, chunk)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return _blocked_topk(q, z, k, block_rows, checked)


def _blocked_topk(
    q: torch.Tensor, z: torch.Tensor, k: int, block_rows: int | None, checked: Sequence[np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`torch_topk` of checked inputs, its queries all at once."""
    b, n, device = q.shape[0], z.shape[0], q.device
    block_rows = max(1, BLOCK_ELEMENTS // max(1, b) if block_rows is None else block_rows)
    masked_query = masked_row = None
    if checked is not None:
        masked_query = torch.from_numpy(np.repeat(np.arange(b), [len(e) for e in checked])).to(device)
        masked_row = torch.from_numpy(np.concatenate([np.empty(0, np.int64), *checked])).to(device)
    best_scores = torch.full((b, k), -torch.inf, device=device)
    best_rows = torch.full((b, k), -1, dtype=torch.int64, device=device)
    buffer = torch.empty(b * min(block_rows, n), device=device)
    with torch.no_grad():
        for start in range(0, n, block_rows):
            stop = min(n, start + block_rows)
            scores = buffer[: b * (stop - start)].view(b, stop - start)  # reused: no fresh allocation per block
            torch.matmul(q, z[start:stop].T, out=scores)
            if masked_row is not None and len(masked_row):
                inside = (masked_row >= start) & (masked_row < stop)
                scores[masked_query[inside], masked_row[inside] - start] = -torch.inf
            block_scores, block_rows_found = _top(scores, torch.arange(start, stop, device=device).expand(b, -1), k)
            # earlier blocks hold lower rows: listed first, they win ties in the merge
            best_scores, best_rows = _top(
                torch.cat([best_scores, block_scores], dim=1), torch.cat([best_rows, block_rows_found], dim=1), k
            )
        # topk lists equal scores in any order: put them in row order (only lines with a tie need it)
        equal = (best_scores[:, 1:] == best_scores[:, :-1]) & (best_scores[:, 1:] > -torch.inf)
        tied = torch.nonzero(equal.any(dim=1)).view(-1)
        if len(tied):
            best_scores[tied], best_rows[tied] = _by_score_then_row(best_scores[tied], best_rows[tied])
    scores, rows = best_scores.cpu().numpy().astype(np.float32, copy=False), best_rows.cpu().numpy()
    rows[np.isneginf(scores)] = -1  # only excluded rows score -inf: the vectors are finite
    return scores, rows


class ExactRetriever(Retriever):
    """Exact search over an item matrix held as a torch tensor (on its device); no files."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray | torch.Tensor, block_rows: int | None = None) -> None:
        z = _as_tensor("vectors", vectors)
        if z.ndim != 2:
            raise ValueError(f"vectors must be 2-D (rows, dim), got shape {tuple(z.shape)}")
        self.vectors = z.detach().float().contiguous()
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
