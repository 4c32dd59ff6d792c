"""A model exported at one size, loaded without the training code: ``serving.load(DIR)``.

An export directory holds (see ``serving/export.py``):

- ``manifest.json``: size, encoder name and options, parameter count, source, data stats, the
  retriever and its settings, and the sha256 of every other file;
- ``model.safetensors``: the encoder cut to the size, and the item matrix ``Z[:, :size]``;
- ``items.parquet``: ``row`` (1..N), ``item_id`` (the catalogue's original ids), ``popularity``;
- ``index.faiss``: the faiss index of the retriever the manifest names (``"retriever"``, see
  ``serving/retrieval``), over ``Z[1:, :size]`` or a prefix of it (row r of the index is item row r+1).

Every file is checked against the manifest's checksums before anything is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file

from recsys.errors import UserError
from recsys.nn.encoders import build_encoder
from recsys.nn.item_tower import FixedItemMatrix
from recsys.nn.nested import nested_parameter_count
from recsys.nn.recommender import SequentialRecommender
from serving.item_ids import ItemLookup, id_column

__all__ = ["ExportError", "UnknownItemsError", "SizedRecommender", "load", "sha256_of", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ExportError(UserError, ValueError):
    """An export directory that is missing, incomplete, corrupted or of another format."""


class UnknownItemsError(KeyError):
    """Histories that name items the model's catalogue does not have."""

    def __init__(self, unknown: Sequence[Hashable]):
        self.unknown = list(unknown)
        shown = ", ".join(repr(u) for u in self.unknown[:10])
        more = f" (and {len(self.unknown) - 10} more)" if len(self.unknown) > 10 else ""
        super().__init__(f"{len(self.unknown)} unknown item id(s) in the histories: {shown}{more}")

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return self.args[0]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of an export directory, after checking every file's checksum."""
    d = Path(directory)
    if not d.is_dir():
        raise ExportError(f"{d}: no such export directory")
    path = d / MANIFEST
    if not path.is_file():
        raise ExportError(f"{d}: not an export directory (no {MANIFEST}); export one with `python -m serving.export`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: manifest is not valid JSON ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: export format {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    if verify:
        for name, expected in manifest["checksums"].items():
            file = d / name
            if not file.is_file():
                raise ExportError(f"{d}: {name} is missing (listed in the manifest)")
            if sha256_of(file) != expected:
                raise ExportError(f"{file}: checksum mismatch: the file was changed or corrupted after export")
    return manifest


class SizedRecommender:
    """The size-``s`` model: encodes histories and recommends from the item matrix ``Z[:, :s]``.

    ``retriever`` (a :class:`serving.retrieval.Retriever`, the one the manifest names) searches
    ``Z[1:, :s]``; its row ``r`` is item row ``r + 1``.

    ``stage_seconds`` adds up the wall time :meth:`recommend_rows` spends encoding histories
    (``"encode"``) and searching (``"search"``), for instrumentation.
    """

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu", use_index: bool = True):
        """Load an export; ``use_index=False`` searches exactly with torch instead of its retriever."""
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        m = self.manifest
        self.size: int = m["size"]
        self.max_len: int = m["max_len"]
        self.device = torch.device(device)
        state = load_file(self.directory / "model.safetensors", device="cpu")
        matrix = state["items.matrix"].float()
        self.net = SequentialRecommender(
            FixedItemMatrix(torch.zeros_like(matrix), m["sizes"]),
            build_encoder(m["encoder"], m["sizes"], **m["encoder_options"]),
        )
        state["items.matrix"] = matrix
        self.net.load_state_dict(state)
        self.net.eval().to(self.device)
        items = pl.read_parquet(self.directory / "items.parquet")
        self.item_ids: list[Hashable] = items["item_id"].to_list()
        self.popularity = torch.from_numpy(items["popularity"].to_numpy().astype(np.float32))
        self.item_lookup = ItemLookup(items["item_id"])
        from serving.retrieval import ExactRetriever, load_retriever, retriever_entry

        entry = retriever_entry(m) if use_index else {"kind": ExactRetriever.kind}
        # rows 0..N-1 of the retriever are item rows 1..N (row 0 is padding)
        self.retriever = load_retriever(self.directory, entry, self.item_matrix[1:])
        self.stage_seconds = {"encode": 0.0, "search": 0.0}

    @property
    def num_parameters(self) -> int:
        """Parameters of the encoder at this size (the item matrix is counted in ``num_items * size``)."""
        return nested_parameter_count(self.net.encoder)

    @property
    def item_matrix(self) -> torch.Tensor:
        return self.net.items.matrix

    def lookup(self, histories: Sequence[Sequence[Hashable]]) -> tuple[list[list[int]], list[list[Hashable]]]:
        """Item rows of each history, and beside them the ids that name no item, by the one rule
        of ``serving/item_ids.py`` (``2.5``, ``True`` or ``"007"`` are never item ``2``, ``1`` or ``7``)."""
        flat: list[Hashable] = []
        lengths = []
        for history in histories:
            if isinstance(history, (str, bytes)):
                raise TypeError("a history is a list of item ids, not a string")
            history = list(history)
            flat.extend(history)
            lengths.append(len(history))
        found = self.item_lookup.rows(id_column(flat)).to_list()
        rows, unknown, start = [], [], 0
        for length in lengths:
            pairs = list(zip(flat[start : start + length], found[start : start + length]))
            rows.append([row for _, row in pairs if row is not None])
            unknown.append([item for item, row in pairs if row is None])
            start += length
        return rows, unknown

    def rows(self, histories: Sequence[Sequence[Hashable]], on_unknown: str = "error") -> list[list[int]]:
        """Item rows of each history; unknown ids raise :class:`UnknownItemsError` or are skipped."""
        if on_unknown not in ("error", "skip"):
            raise ValueError(f"on_unknown must be 'error' or 'skip', got {on_unknown!r}")
        rows, unknown = self.lookup(histories)
        unknown = [item for items in unknown for item in items]
        if unknown and on_unknown == "error":
            raise UnknownItemsError(unknown)
        if unknown:
            log.warning("skipped %d unknown item id(s)", len(unknown))
        return rows

    def _padded(self, rows: list[list[int]]) -> torch.Tensor:
        # as wide as the longest history (at most max_len): left padding does not change the
        # user vectors, and narrower batches encode much faster; filled with one numpy scatter
        lengths = np.fromiter((min(len(r), self.max_len) for r in rows), dtype=np.int64, count=len(rows))
        width = max(1, int(lengths.max(initial=1)))
        flat = np.fromiter(
            (row for r in rows for row in r[len(r) - min(len(r), width) :]), dtype=np.int64, count=int(lengths.sum())
        )
        line = np.repeat(np.arange(len(rows)), lengths)
        column = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(width - lengths, lengths)
        batch = np.zeros((len(rows), width), dtype=np.int64)
        batch[line, column] = flat
        return torch.from_numpy(batch).to(self.device)

    @torch.no_grad()
    def encode_rows(self, rows: list[list[int]]) -> torch.Tensor:
        """User vectors of item-row histories: one pass over the real positions of the batch,
        computing the last position's state alone where the encoder can (``user_vectors``)."""
        return self.net.user_vectors(self._padded(rows), self.item_matrix)

    def encode(self, histories: Sequence[Sequence[Hashable]], on_unknown: str = "error") -> np.ndarray:
        """One ``size``-float vector per history (a list of original item ids, oldest first)."""
        return self.encode_rows(self.rows(histories, on_unknown)).cpu().numpy()

    @torch.no_grad()
    def recommend_rows(self, rows: list[list[int]], k: int, exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` item rows and scores; histories with no known item get the most popular items."""
        if k < 1 or k > len(self.item_ids):
            raise ValueError(f"k must be between 1 and the catalogue size {len(self.item_ids)}, got {k}")
        started = time.perf_counter()
        users = self.encode_rows(rows)
        encoded = time.perf_counter()
        empty = np.fromiter((len(r) == 0 for r in rows), dtype=bool, count=len(rows))
        exclude = [np.asarray(r, dtype=np.int64) - 1 for r in rows] if exclude_seen else None
        searching = time.perf_counter()
        scores, idx = self.retriever.search(users, k, exclude=exclude)
        self.stage_seconds["encode"] += encoded - started
        self.stage_seconds["search"] += time.perf_counter() - searching
        top_rows = idx + 1  # a -1 (no result) becomes 0, which recommend() drops
        if empty.any():
            popular = torch.topk(self.popularity, k)
            scores[empty], top_rows[empty] = popular.values.numpy(), popular.indices.numpy() + 1
        return top_rows, scores

    def recommend(
        self, histories: Sequence[Sequence[Hashable]], k: int = 10, exclude_seen: bool = True, on_unknown: str = "error"
    ) -> list[list[tuple[Hashable, float]]]:
        """Top-``k`` ``(item_id, score)`` per history, best first; seen items excluded by default.

        A history with no known item gets the most popular items of the training data (scored by
        their training counts).
        """
        return self.named(*self.recommend_rows(self.rows(histories, on_unknown), k, exclude_seen))

    def named(self, top_rows: np.ndarray, scores: np.ndarray) -> list[list[tuple[Hashable, float]]]:
        """:meth:`recommend_rows`'s rows as ``(item_id, score)`` lists (a row 0, no result, is dropped)."""
        return [
            [(self.item_ids[r - 1], float(s)) for r, s in zip(row, score) if r > 0]
            for row, score in zip(top_rows, scores)
        ]


def load(directory: str | Path, device: str | torch.device = "cpu") -> SizedRecommender:
    """Load an export directory written by ``python -m serving.export``."""
    return SizedRecommender(directory, device=device)
