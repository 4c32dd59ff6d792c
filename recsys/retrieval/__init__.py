"""Retrieval: the top-``k`` rows of an item matrix by inner product, behind one interface.

A size-``s`` model scores item ``r`` for a user vector ``u`` as ``u @ Z[r, :s]``, so serving needs
the ``k`` rows of ``Z[:, :s]`` with the largest inner product: maximum inner product search (MIPS).
Every way of doing it is a :class:`Retriever` with ``search(queries, k, exclude=None)``:

- :class:`ExactRetriever` (``"exact"``, :mod:`.exact`): torch matrix product and top-k over item
  blocks; the reference;
- :class:`FaissRetriever` (``"faiss"``, :mod:`.faiss_index`): a faiss index (flat, IVF-flat, HNSW,
  IVF-PQ; :class:`IndexSpec`), on the GPU when the GPU build of faiss and a GPU are present;
- :class:`FunnelRetriever` (``"funnel"``, :mod:`.funnel`): any retriever over a prefix of the
  vectors shortlists, exact re-ranking at larger prefixes finishes (docs/method.md §6); its
  :func:`rerank` (the exact re-ranking of given candidate rows) also finishes the own-network
  funnel of ``serving/sized_model.py``, whose shortlist comes from a smaller size's own export.

Row convention
--------------
A retriever indexes rows ``0..N-1`` of the matrix it is given, and returns those rows. It knows
nothing about item ids or padding: the model's item matrix has a padding row 0 that the caller
drops before building (``Z[1:, :s]``), so our row ``r`` is the caller's row ``r`` of what it passed
in, nothing more. Mapping rows to item ids, and excluded item ids to rows, is the caller's job.

Results
-------
Searches return ``(scores, rows)``: float32 ``(B, k)`` in descending score order and int64 ``(B, k)``.
``exclude`` is ``None`` or one array of rows per query (e.g. the user's seen items, already mapped to
rows); those rows are never returned. When fewer than ``k`` rows can be returned (``k > N``, more
rows excluded than ``N - k``, or an approximate index whose probed lists hold fewer than ``k``
rows), the missing tail entries are ``rows == -1`` with ``scores == -inf``. Callers should drop
``-1`` rows, never map them to items.

Manifest entries
----------------
``retriever.to_dict()`` is a JSON-able entry naming the implementation and its settings, e.g.
``{"kind": "exact"}``, ``{"kind": "faiss", "index": {"kind": "hnsw", ...}}`` or
``{"kind": "funnel", "prefix": 32, "shortlist": 1000, "rerank_dims": [256], "keep": [],
"index": {"kind": "flat", "seed": 0}}``. :func:`build_retriever` builds one from an entry,
``retriever.save(directory)`` writes its files into an export directory, :func:`load_retriever`
reads it back, and :func:`retriever_entry` reads the entry of a manifest (old ones included).
"""

from __future__ import annotations

import os
from typing import Any

from recsys.retrieval.base import Retriever
from recsys.retrieval.exact import ExactRetriever, torch_topk
from recsys.retrieval.faiss_index import INDEX_FILE, KINDS, FaissRetriever, IndexSpec, gpu_available
from recsys.retrieval.funnel import FunnelRetriever, FunnelSpec, rerank
from recsys.retrieval.recall import recall_at_k

__all__ = [
    "Retriever",
    "ExactRetriever",
    "FaissRetriever",
    "FunnelRetriever",
    "IndexSpec",
    "FunnelSpec",
    "KINDS",
    "RETRIEVERS",
    "build_retriever",
    "load_retriever",
    "retriever_entry",
    "gpu_available",
    "recall_at_k",
    "rerank",
    "torch_topk",
]

#: every retriever by the ``"kind"`` of its manifest entry
RETRIEVERS: dict[str, type[Retriever]] = {cls.kind: cls for cls in (ExactRetriever, FaissRetriever, FunnelRetriever)}


def _class_of(entry: Any) -> type[Retriever]:
    if not isinstance(entry, dict):
        raise ValueError(f"a retriever entry must be a JSON object, got {entry!r}")
    kind = entry.get("kind")
    if kind not in RETRIEVERS:
        raise ValueError(f"retriever kind must be one of {sorted(RETRIEVERS)}, got {kind!r}")
    return RETRIEVERS[kind]


def build_retriever(vectors: Any, entry: dict[str, Any]) -> Retriever:
    """The retriever described by ``entry`` over the rows of ``vectors`` (float ``(N, d)``)."""
    return _class_of(entry).build(vectors, entry)


def load_retriever(
    directory: str | os.PathLike, entry: dict[str, Any], vectors: Any, device: str = "auto"
) -> Retriever:
    """The retriever of an export: ``entry`` from its manifest, files from ``directory``.

    ``vectors`` is the item matrix the retriever searches (``(N, size)``, without the padding
    row); an exact retriever searches it on its own device, a funnel re-ranks with it, a faiss
    index is checked against its shape. ``device`` places faiss indexes: ``"auto"`` (GPU when
    :func:`gpu_available`), ``"cpu"`` or ``"gpu"``.
    """
    return _class_of(entry).load(directory, entry, vectors, device)


def retriever_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    """The retriever entry of an export manifest.

    ``manifest["retriever"]`` when present; manifests written before it existed (format 1 with
    ``"index"`` and ``"funnel"``) get it derived: a funnel when ``"funnel"`` is set, else the faiss
    index of ``"index"`` when the export has ``index.faiss``, else exact search (as the old loader did).
    """
    if manifest.get("retriever") is not None:
        return manifest["retriever"]
    if manifest.get("funnel"):
        return {"kind": FunnelRetriever.kind, **manifest["funnel"]}
    if manifest.get("index") and INDEX_FILE in manifest.get("checksums", {}):
        return {"kind": FaissRetriever.kind, "index": manifest["index"]}
    return {"kind": ExactRetriever.kind}
