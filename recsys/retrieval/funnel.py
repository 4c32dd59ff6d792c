"""Funnel search (docs/method.md §6, after AdANNS): shortlist with a prefix retriever, re-rank exactly.

Stage 0 is any retriever over the first ``prefix`` columns of the item matrix (normally a faiss
index, :class:`~recsys.retrieval.faiss_index.FaissRetriever`); it returns ``shortlist`` rows per
query. Each re-rank stage then scores the surviving rows exactly at a larger prefix ``d`` of the
vectors with the prefix-logit recurrence: the scores at ``d_i`` are the scores at ``d_{i-1}``
plus the product of the chunk ``[d_{i-1}, d_i)`` alone (the same recurrence as
``recsys.nn.nested.prefix_scores``), so every column of a candidate is multiplied once over all
stages, and an intermediate stage's pruning saves the later chunks' work.

The chunk products use faiss' ``fvec_inner_products_by_idx`` on one contiguous copy of each chunk's
columns, which reads the candidate rows in place: gathering the candidates into a ``(B, L, d)``
tensor and running ``prefix_scores`` on it was 2.5-6x slower (10^5 items, shortlist 1000,
batch 1024, d=64, 2 cores; the commit that introduced this module has the figures).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import faiss
import numpy as np
import torch

from recsys.retrieval.base import Retriever
from recsys.retrieval.checks import as_matrix, check_int, check_k, check_spec_keys
from recsys.retrieval.exclusion import pad
from recsys.retrieval.faiss_index import FaissRetriever, IndexSpec

__all__ = ["FunnelSpec", "FunnelRetriever", "rerank"]


@dataclass(frozen=True)
class FunnelSpec:
    """Settings of a funnel search (docs/method.md §6, after AdANNS), JSON-able for a manifest.

    Stage 0: an index of kind ``index`` over ``vectors[:, :prefix]`` returns ``shortlist`` rows.
    Then for each ``d`` in ``rerank_dims`` (increasing, each > ``prefix``) the surviving rows are
    scored exactly with ``vectors[:, :d]``; after stage ``i`` (all but the last) the best
    ``keep[i]`` survive (never fewer than ``k``); the last stage returns the top ``k``. Default
    ``keep`` halves the candidate list at each intermediate stage.

    With ``shortlist >= N``, an exact prefix index and ``keep`` entries ``>= N`` the result equals
    exact search at ``rerank_dims[-1]``; the point is to get close with a small shortlist.
    """

    prefix: int
    shortlist: int
    rerank_dims: tuple[int, ...]
    keep: tuple[int, ...] = ()
    index: IndexSpec = field(default_factory=IndexSpec)

    def __post_init__(self) -> None:
        prefix = check_int("prefix", self.prefix)
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "shortlist", check_int("shortlist", self.shortlist))
        dims = (self.rerank_dims,) if isinstance(self.rerank_dims, (int, np.integer)) else tuple(self.rerank_dims)
        if not dims:
            raise ValueError("rerank_dims must name at least one dimension")
        for d in dims:
            check_int("rerank_dims entry", d)
        if dims[0] <= prefix or any(b <= a for a, b in zip(dims, dims[1:])):
            raise ValueError(f"rerank_dims must increase and exceed prefix={prefix}, got {list(dims)}")
        keep = tuple(self.keep) if self.keep else tuple(self.shortlist // 2 ** (i + 1) for i in range(len(dims) - 1))
        if len(keep) != len(dims) - 1:
            raise ValueError(f"keep needs {len(dims) - 1} entries (one per intermediate stage), got {list(keep)}")
        previous = self.shortlist
        for size in keep:
            check_int("keep entry", size)
            if size > previous:
                raise ValueError(f"keep must not grow: {list(keep)} after shortlist={self.shortlist}")
            previous = size
        if not isinstance(self.index, IndexSpec):
            raise TypeError(f"index must be an IndexSpec, got {type(self.index).__name__}")
        object.__setattr__(self, "rerank_dims", tuple(int(d) for d in dims))
        object.__setattr__(self, "keep", tuple(int(s) for s in keep))

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "shortlist": self.shortlist,
            "rerank_dims": list(self.rerank_dims),
            "keep": list(self.keep),
            "index": self.index.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FunnelSpec:
        check_spec_keys(cls, data, "funnel")
        values = dict(data)
        if "index" in values:
            values["index"] = IndexSpec.from_dict(values["index"])
        if "keep" in values:
            values["keep"] = tuple(values["keep"])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class FunnelRetriever(Retriever):
    """A funnel over an item matrix ``vectors_full`` (``(N, D)``, ``D >= rerank_dims[-1]``).

    ``prefix_retriever`` (any :class:`Retriever` over ``vectors_full[:, :prefix]``) shortlists;
    by default a faiss index of kind ``spec.index`` is built here. Queries have at least
    ``rerank_dims[-1]`` columns; their prefixes are used, as for the size-s models.

    Manifest entry: ``{"kind": "funnel", **FunnelSpec.to_dict()}``, where ``"index"`` is the
    faiss prefix index written as ``index.faiss``; a prefix retriever that is not a faiss index is
    written as ``"prefix_retriever": <its entry>`` instead of ``"index"``.

    Each intermediate re-rank stage keeps a contiguous copy of its chunk's columns (a single-stage
    funnel at the full width ``D`` copies nothing): at most one more item matrix in memory.
    """

    kind = "funnel"

    def __init__(
        self, vectors_full: Any, spec: FunnelSpec, prefix_retriever: Retriever | None = None
    ) -> None:
        self.vectors = as_matrix("vectors_full", vectors_full)
        n, width = self.vectors.shape
        if spec.rerank_dims[-1] > width:
            raise ValueError(f"rerank_dims {list(spec.rerank_dims)} exceed the vectors' width {width}")
        if prefix_retriever is None:
            prefix_retriever = FaissRetriever.build(self.vectors[:, : spec.prefix], spec.index)
        elif prefix_retriever.dim != spec.prefix or prefix_retriever.num_rows != n:
            raise ValueError(
                f"the prefix retriever covers {prefix_retriever.num_rows} rows of {prefix_retriever.dim} dims, "
                f"expected {n} rows of {spec.prefix} dims"
            )
        if isinstance(prefix_retriever, FaissRetriever):
            spec = replace(spec, index=prefix_retriever.spec)  # the resolved settings actually used
        self.spec = spec
        self.prefix_retriever = prefix_retriever
        bounds = list(zip((0, *spec.rerank_dims[:-1]), spec.rerank_dims))
        self._chunks = [
            (lo, hi, self.vectors if (lo, hi) == (0, width) else np.ascontiguousarray(self.vectors[:, lo:hi]))
            for lo, hi in bounds
        ]

    @property
    def num_rows(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.spec.rerank_dims[-1]

    @classmethod
    def build(cls, vectors_full: Any, entry: dict[str, Any]) -> FunnelRetriever:
        """Build the funnel of a manifest entry (its prefix retriever included) over ``vectors_full``."""
        from recsys.retrieval import build_retriever

        spec, inner = _split_entry(entry)
        if inner is None:
            return cls(vectors_full, spec)
        vectors = as_matrix("vectors_full", vectors_full)
        return cls(vectors, spec, build_retriever(np.ascontiguousarray(vectors[:, : spec.prefix]), inner))

    @classmethod
    def load(cls, directory: str | os.PathLike, entry: dict[str, Any], vectors_full: Any, device: str = "auto") -> FunnelRetriever:
        """The funnel of an export: its prefix retriever read from ``directory``, re-ranking over ``vectors_full``."""
        from recsys.retrieval import load_retriever

        spec, inner = _split_entry(entry)
        inner = inner or {"kind": FaissRetriever.kind, "index": spec.index.to_dict()}
        vectors = as_matrix("vectors_full", vectors_full)
        prefix = load_retriever(directory, inner, vectors[:, : spec.prefix], device=device)
        return cls(vectors, spec, prefix)

    def to_dict(self) -> dict[str, Any]:
        entry = {"kind": self.kind, **self.spec.to_dict()}
        if not isinstance(self.prefix_retriever, FaissRetriever):
            del entry["index"]
            entry["prefix_retriever"] = self.prefix_retriever.to_dict()
        return entry

    def save(self, directory: str | os.PathLike) -> list[str]:
        return self.prefix_retriever.save(directory)

    def search(
        self, queries: Any, k: int, exclude: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for each query (exclusion is applied by the prefix retriever)."""
        k = check_k(k)
        spec = self.spec
        q = as_matrix("queries", queries)
        if q.shape[1] < spec.rerank_dims[-1]:
            raise ValueError(f"queries have {q.shape[1]} columns, the funnel re-ranks at {spec.rerank_dims[-1]}")
        _, rows = self.prefix_retriever.search(
            np.ascontiguousarray(q[:, : spec.prefix]), max(spec.shortlist, k), exclude
        )
        scores = None
        for (lo, hi, chunk), keep in zip(self._chunks, [*spec.keep, k]):
            part = _inner_products(np.ascontiguousarray(q[:, lo:hi]), chunk, rows)
            scores = part if scores is None else scores + part  # scores at hi = scores at lo + chunk
            rows, scores = _top_per_row(rows, scores, min(max(keep, k), rows.shape[1]))
        return pad(scores, rows, k)


def rerank(queries: Any, vectors: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of each query's candidate ``rows`` (``(B, L)``, ``-1`` for none) scored exactly
    as ``queries[b] @ vectors[row]`` (``vectors``: float32 ``(N, d)``, queries ``(B, d)``), as a
    search returns them: ``(scores, rows)``, ``-inf`` / ``-1`` past the candidates."""
    k = check_k(k)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    q = as_matrix("queries", queries, dim=vectors.shape[1])
    scores = _inner_products(q, vectors, rows)
    top_rows, top_scores = _top_per_row(rows, scores, min(k, rows.shape[1]))
    return pad(top_scores, top_rows, k)


def _split_entry(entry: dict[str, Any]) -> tuple[FunnelSpec, dict[str, Any] | None]:
    """A funnel manifest entry as its :class:`FunnelSpec` and the prefix retriever's entry (if any)."""
    if not isinstance(entry, dict):
        raise ValueError(f"the funnel spec must be a JSON object, got {entry!r}")
    settings = {key: value for key, value in entry.items() if key not in ("kind", "prefix_retriever")}
    inner = entry.get("prefix_retriever")
    if inner is not None and "index" in settings:
        raise ValueError("a funnel entry names either 'index' (a faiss prefix index) or 'prefix_retriever', not both")
    return FunnelSpec.from_dict(settings), inner


def _inner_products(q: np.ndarray, vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``scores[b, j] = q[b] @ vectors[rows[b, j]]``; ``-inf`` where ``rows`` is ``-1``."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    missing = rows < 0
    safe = np.where(missing, 0, rows)
    scores = np.empty(rows.shape, dtype=np.float32)
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(scores), faiss.swig_ptr(q), faiss.swig_ptr(vectors), faiss.swig_ptr(safe),
        vectors.shape[1], rows.shape[0], rows.shape[1],
    )
    scores[missing] = -np.inf
    return scores


def _top_per_row(rows: np.ndarray, scores: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` best (row, score) pairs of every result list, best first; ``-inf`` ones become -1."""
    top_scores, pos = torch.topk(torch.from_numpy(scores), size, dim=1)
    top_scores = top_scores.numpy()
    top_rows = np.take_along_axis(rows, pos.numpy(), axis=1)
    top_rows[np.isneginf(top_scores)] = -1
    return top_rows, top_scores

