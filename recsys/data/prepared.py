"""Loading a prepared-dataset directory into numpy arrays the rest of the project reads.

Histories are kept as one flat array plus offsets (CSR), indexed by user: the items of user ``u``
(1..U) in time order are ``seq_items[seq_offsets[u]:seq_offsets[u + 1]]``; ``seq_offsets`` has
``num_users + 2`` entries, so that user 0 (padding) is an empty history like item row 0 of the
feature bags. The leave-one-out split needs no stored copy: the last item is the test target, the one
before the validation target, the rest is the training part.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.errors import DataValidationError
from recsys.data.pipeline import FORMAT_VERSION
from recsys.item_features import ItemFeatures

__all__ = ["PreparedDataset", "load_prepared"]

REQUIRED_FILES = ("interactions.parquet", "users.parquet", "items.parquet", "stats.json", "features/features.json")


@dataclass
class PreparedDataset:
    """A prepared dataset in memory.

    Attributes:
        path: the directory it was loaded from.
        seq_items: int32 ``(interactions,)``, every user's items in time order, user after user.
        seq_offsets: int64 ``(num_users + 2,)``; user ``u``'s history is ``seq_items[seq_offsets[u]:seq_offsets[u+1]]``.
        item_ids, user_ids: original ids by index, as object arrays with ``None`` at index 0.
        train_counts: int64 ``(num_items + 1,)``, events per item in the training parts (popularity).
        stats: the contents of ``stats.json``.
        cold_start: bool ``(num_items + 1,)``, the items held out of training by the cold-start
            protocol (``prepare --cold-start-fraction``); all False without it.
    """

    path: Path
    seq_items: np.ndarray
    seq_offsets: np.ndarray
    item_ids: np.ndarray
    user_ids: np.ndarray
    train_counts: np.ndarray
    stats: dict
    cold_start: np.ndarray
    _item_lookup: pl.DataFrame = field(repr=False)
    _user_lookup: pl.DataFrame = field(repr=False)

    @property
    def num_users(self) -> int:
        return len(self.user_ids) - 1

    @property
    def num_items(self) -> int:
        """Catalogue size N (cold-start items included); item indices run over 1..N."""
        return len(self.item_ids) - 1

    @property
    def history_lengths(self) -> np.ndarray:
        """int64 ``(num_users + 1,)``, events per user (0 for the padding user)."""
        return np.diff(self.seq_offsets)

    @property
    def cold_start_items(self) -> np.ndarray:
        """int64 indices of the cold-start items (empty without the cold-start protocol)."""
        return np.flatnonzero(self.cold_start)

    @property
    def test_targets(self) -> np.ndarray:
        """int64 ``(num_users + 1,)``: each user's test item, their last event (0 for the padding user)."""
        targets = np.zeros(self.num_users + 1, dtype=np.int64)
        targets[1:] = self.seq_items[self.seq_offsets[2:] - 1]
        return targets

    @cached_property
    def item_features(self) -> ItemFeatures:
        return ItemFeatures.load(self.path / "features")

    def history(self, user: int) -> np.ndarray:
        """The items of one user (index 1..U), oldest first."""
        return self.seq_items[self.seq_offsets[user] : self.seq_offsets[user + 1]]

    def item_index(self, original_ids: Sequence | np.ndarray | pl.Series, unknown: str = "raise") -> np.ndarray:
        """int64 item indices of original item ids; unknown ids raise ``KeyError`` or, with
        ``unknown="zero"``, map to 0 (padding)."""
        return _lookup(self._item_lookup, original_ids, unknown, "item")

    def user_index(self, original_ids: Sequence | np.ndarray | pl.Series, unknown: str = "raise") -> np.ndarray:
        """int64 user indices of original user ids (see :meth:`item_index`)."""
        return _lookup(self._user_lookup, original_ids, unknown, "user")


def load_prepared(directory: str | Path) -> PreparedDataset:
    """Read a directory written by :func:`recsys.data.prepare`."""
    directory = Path(directory)
    for name in REQUIRED_FILES:
        if not (directory / name).is_file():
            raise DataValidationError(directory, f"not a prepared dataset: {name} is missing")
    stats = json.loads((directory / "stats.json").read_text(encoding="utf-8"))
    if stats.get("format_version") != FORMAT_VERSION:
        raise DataValidationError(
            directory, f"prepared with format version {stats.get('format_version')}, this code reads {FORMAT_VERSION}: prepare it again"
        )
    interactions = pl.read_parquet(directory / "interactions.parquet", columns=["user", "item"])
    users = pl.read_parquet(directory / "users.parquet")
    items = pl.read_parquet(directory / "items.parquet")
    user_of_event = interactions["user"].to_numpy()
    if len(user_of_event) > 1 and (np.diff(user_of_event) < 0).any():
        raise DataValidationError(directory / "interactions.parquet", "rows are not sorted by user")
    counts = np.bincount(user_of_event, minlength=users.height + 1)
    return PreparedDataset(
        path=directory,
        seq_items=interactions["item"].to_numpy().astype(np.int32, copy=False),
        seq_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        item_ids=_with_padding(items["item_id"]),
        user_ids=_with_padding(users["user_id"]),
        train_counts=np.concatenate([[0], items["train_count"].to_numpy()]).astype(np.int64),
        stats=stats,
        # datasets prepared before the cold-start protocol have no such column
        cold_start=np.concatenate([[False], items["cold_start"].to_numpy() if "cold_start" in items.columns else np.zeros(items.height, bool)]),
        _item_lookup=items.select(pl.col("item_id").alias("id"), pl.col("item").alias("index")),
        _user_lookup=users.select(pl.col("user_id").alias("id"), pl.col("user").alias("index")),
    )


def _with_padding(ids: pl.Series) -> np.ndarray:
    out = np.empty(len(ids) + 1, dtype=object)
    out[0] = None
    out[1:] = ids.to_list()
    return out


def _lookup(table: pl.DataFrame, original_ids, unknown: str, what: str) -> np.ndarray:
    if unknown not in ("raise", "zero"):
        raise ValueError(f"unknown must be 'raise' or 'zero', got {unknown!r}")
    if isinstance(original_ids, pl.Series):
        query = original_ids
    elif isinstance(original_ids, np.ndarray) and original_ids.dtype != object:
        query = pl.Series("id", original_ids)
    else:
        query = pl.Series("id", list(original_ids))
    dtype = table["id"].dtype
    if query.dtype != dtype:
        # ids of another type are compared by their string spelling, as when the dataset was prepared
        if dtype == pl.String or query.dtype == pl.String:
            query = query.cast(pl.String)
            keys = table.with_columns(pl.col("id").cast(pl.String))
        else:
            query, keys = query.cast(pl.Int64), table.with_columns(pl.col("id").cast(pl.Int64))
    else:
        keys = table
    found = pl.DataFrame({"id": query}).join(keys, on="id", how="left", maintain_order="left")["index"]
    if found.null_count() and unknown == "raise":
        missing = query.filter(found.is_null()).unique(maintain_order=True).head(5).to_list()
        raise KeyError(f"{found.null_count()} {what} ids are not in the vocabulary, e.g. {missing}")
    return found.fill_null(0).to_numpy().astype(np.int64)
