"""A model exported at one size, loaded without the training code: ``serving.load(DIR)``.

The files of an export directory, and what is checked before any of them is used (every file the
loader reads is listed in the manifest and verified), are described in ``recsys/export_dir.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from recsys.nn.encoders import build_encoder
from recsys.nn.grid import Triple
from recsys.nn.item_bias import with_ones_column
from recsys.nn.item_tower import FixedItemMatrix
from recsys.nn.nested import nested_parameter_count
from recsys.nn.recommender import SequentialRecommender
from recsys.export_dir import (
    FORMAT_VERSION,
    MANIFEST,
    NESTED_EXPORTS,
    OUTPUT_ITEMS,
    OWN_FUNNEL,
    WEIGHTS,
    ExportError,
    read_items,
    read_manifest,
    read_weights,
    sha256_of,
)
from serving.item_ids import ItemLookup, id_column

if TYPE_CHECKING:
    from recsys.retrieval import Retriever

__all__ = ["ExportError", "UnknownItemsError", "SizedRecommender", "load", "sha256_of", "FORMAT_VERSION"]

log = logging.getLogger(__name__)


class UnknownItemsError(KeyError):
    """Histories that name items the model's catalogue does not have."""

    def __init__(self, unknown: Sequence[Hashable]):
        self.unknown = list(unknown)
        shown = ", ".join(repr(u) for u in self.unknown[:10])
        more = f" (and {len(self.unknown) - 10} more)" if len(self.unknown) > 10 else ""
        super().__init__(f"{len(self.unknown)} unknown item id(s) in the histories: {shown}{more}")

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return self.args[0]




class SizedRecommender:
    """The size-``s`` model: encodes histories and recommends from the item matrix ``Z[:, :s]``.

    An elastic export (``width`` and ``depth`` in the manifest) encodes with the encoder cut to
    that width and depth (from ``Z[:, :width]``), through its vector head when ``s < width``.

    ``retriever`` (a :class:`recsys.retrieval.Retriever`, the one the manifest names) searches
    ``Z[1:, :s]``; its row ``r`` is item row ``r + 1``. An own-network funnel (retriever
    ``"own_funnel"``) has none: ``shortlister``, the smaller size's export inside this one, finds
    each history's ``shortlist`` best items with its own encoder, item vectors and retriever, and
    this size re-scores them exactly (docs/method.md §6).

    ``stage_seconds`` adds up the wall time :meth:`recommend_rows` spends encoding histories
    (``"encode"``) and searching (``"search"``), for instrumentation.
    """

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu", use_index: bool = True):
        """Load an export; ``use_index=False`` searches exactly with torch instead of its retriever."""
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        m = self.manifest
        self.size: int = m["size"]
        # an elastic export (recsys/nn/grid.py): the encoder's width and depth; a plain one's width is its size
        self.width: int = m.get("width", self.size)
        self.depth: int | None = m.get("depth")
        self.max_len: int = m["max_len"]
        self.device = torch.device(device)
        # every file is checked against the manifest before anything is built from it
        state = read_weights(self.directory, m)
        items = read_items(self.directory, m["num_items"])
        output = state.pop(OUTPUT_ITEMS, None)  # this size's own item vectors (separate_item_vectors)
        self.net = self._network(state)
        self.net.eval().to(self.device)
        self._own_items = None if output is None else output.float().to(self.device)
        #: the own item vectors end in their items' biases, and the searched user vectors in a one
        self.output_bias: bool = m.get("output_bias", False)
        self.item_ids: list[Hashable] = items["item_id"].to_list()
        self.popularity = torch.from_numpy(items["popularity"].to_numpy().astype(np.float32))
        self.item_lookup = ItemLookup(items["item_id"])
        from recsys.retrieval import ExactRetriever, load_retriever, retriever_entry

        self.retriever: Retriever | None = None  # None for an own-network funnel
        self.shortlister: SizedRecommender | None = None
        self.shortlist = 0
        self._rerank_vectors: np.ndarray | None = None  # Z[1:, :s] on the CPU, for the own-network funnel
        try:
            entry = retriever_entry(m) if use_index else {"kind": ExactRetriever.kind}
            if isinstance(entry, dict) and entry.get("kind") == OWN_FUNNEL:
                self.shortlister, self.shortlist = self._shortlister(entry)
                self._rerank_vectors = self.item_matrix[1:].float().cpu().numpy()
            else:
                # rows 0..N-1 of the retriever are item rows 1..N (row 0 is padding)
                self.retriever = load_retriever(self.directory, entry, self.item_matrix[1:])
        except ExportError:  # the shortlist export's own, naming its file
            raise
        except (ValueError, TypeError, KeyError, OSError) as exc:  # the manifest's entry, or its files
            raise ExportError(f"{self.directory / MANIFEST}: its retriever cannot be loaded ({exc})") from None
        self.stage_seconds = {"encode": 0.0, "search": 0.0}

    def _shortlister(self, entry: dict) -> tuple[SizedRecommender, int]:
        """The export inside this one that shortlists for an own-network funnel, and its shortlist
        length: of a smaller size, over the same items, and listed in the manifest's nested exports."""
        from recsys.retrieval.checks import check_int

        unknown = sorted(set(entry) - {"kind", "shortlist_export", "shortlist", "prefix_size"})
        if unknown:
            raise ValueError(f"unknown {OWN_FUNNEL} settings {unknown}")
        name = entry.get("shortlist_export")
        if not isinstance(name, str) or name not in self.manifest.get(NESTED_EXPORTS, {}):
            raise ValueError(f"its shortlist export {name!r} is not one of the manifest's {NESTED_EXPORTS!r}")
        shortlist = check_int("shortlist", entry.get("shortlist"))
        inner = SizedRecommender(self.directory / name, device=self.device)
        if inner.size != entry.get("prefix_size") or inner.size >= self.size:
            raise ValueError(f"its shortlist export is of size {inner.size}; 'prefix_size' is {entry.get('prefix_size')!r} "
                             f"and must be that size, below {self.size}")
        if inner.shortlister is not None or inner.item_ids != self.item_ids:
            raise ValueError("its shortlist export must search its own retriever over this export's items")
        return inner, shortlist

    def _network(self, state: dict[str, torch.Tensor]) -> SequentialRecommender:
        """The encoder the manifest describes, with the exported weights (which must fit it)."""
        m = self.manifest
        matrix = state["items.matrix"].float()
        grid = None
        if self.size < self.width:
            grid = (Triple(m["encoder_options"].get("n_blocks", 1), self.width, self.size),)
        try:
            net = SequentialRecommender(
                FixedItemMatrix(torch.zeros_like(matrix), m["sizes"]),
                build_encoder(m["encoder"], m["sizes"], **m["encoder_options"]),
                grid=grid,
            )
        except (TypeError, ValueError) as exc:
            raise ExportError(
                f"{self.directory / MANIFEST}: the encoder {m['encoder']!r} cannot be built from the manifest's "
                f"sizes and encoder_options ({exc})"
            ) from None
        try:
            net.load_state_dict({**state, "items.matrix": matrix})
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise ExportError(f"{self.directory / WEIGHTS}: the weights do not fit the encoder the manifest describes ({detail})") from None
        net.select_vector_(self.size)
        return net

    @property
    def num_parameters(self) -> int:
        """Parameters of the encoder at this size, and of its vector head if any (the item matrix is
        counted in ``num_items * size``): the manifest's ``num_parameters``."""
        heads = getattr(self.net, "heads", None)
        return nested_parameter_count(self.net.encoder) + (0 if heads is None else sum(p.numel() for p in heads.parameters()))

    @property
    def item_matrix(self) -> torch.Tensor:
        """``Z[:, :size]``, what the user vectors are scored against (row 0 padding): the size's own
        item vectors where it was trained with them (``separate_item_vectors``), which end in the
        items' biases with ``output_bias``."""
        return self.net.items.matrix[:, : self.size] if self._own_items is None else self._own_items

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
        """User vectors of item-row histories, as they search :attr:`item_matrix`: one pass over the
        real positions of the batch, computing the last position's state alone where the encoder
        can (``user_vectors``); ending in a one where the items' vectors end in their biases."""
        users = self.net.user_vectors(self._padded(rows), self.net.items.matrix)
        return with_ones_column(users) if self.output_bias else users

    def encode(self, histories: Sequence[Sequence[Hashable]], on_unknown: str = "error") -> np.ndarray:
        """One ``size``-float vector per history (a list of original item ids, oldest first), or
        ``size + 1`` floats ending in a one for an export with per-item biases (``output_bias``):
        its inner product with a row of :attr:`item_matrix` is that item's score."""
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
        scores, idx = self._search(rows, users, k, exclude)
        self.stage_seconds["encode"] += encoded - started
        self.stage_seconds["search"] += time.perf_counter() - searching
        top_rows = idx + 1  # a -1 (no result) becomes 0, which recommend() drops
        if empty.any():
            popular = torch.topk(self.popularity, k)
            scores[empty], top_rows[empty] = popular.values.numpy(), popular.indices.numpy() + 1
        return top_rows, scores

    def _search(
        self, rows: list[list[int]], users: torch.Tensor, k: int, exclude: list[np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` retriever rows and scores of each user vector (``rows``: their histories). An
        own-network funnel takes the shortlist export's top ``shortlist`` (its own user vectors from
        ``rows``, seen items excluded there) and re-scores them with ``users`` and this size's items."""
        if self.shortlister is None:
            return self.retriever.search(users, k, exclude=exclude)
        from recsys.retrieval import rerank

        inner = self.shortlister
        _, candidates = inner._search(rows, inner.encode_rows(rows), max(self.shortlist, k), exclude)
        return rerank(users, self._rerank_vectors, candidates, k)

    def recommend(
        self, histories: Sequence[Sequence[Hashable]], k: int = 10, exclude_seen: bool = True, on_unknown: str = "error"
    ) -> list[list[tuple[Hashable, float]]]:
        """Top-``k`` ``(item_id, score)`` per history, best first; seen items excluded by default.
        Item ids are the catalogue's, of its type (integers or text; ``serving/item_ids.py``).

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
    """Load an export directory written by ``python -m recsys.export``."""
    return SizedRecommender(directory, device=device)
