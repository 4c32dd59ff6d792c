"""Loading a prepared-dataset directory into numpy arrays the rest of the project reads.

Histories are kept as one flat array plus offsets (CSR), indexed by user: the items of user ``u``
(1..U) in time order are ``seq_items[seq_offsets[u]:seq_offsets[u + 1]]``; ``seq_offsets`` has
``num_users + 2`` entries, so that user 0 (padding) is an empty history like item row 0 of the
feature bags. The leave-one-out split needs no stored copy: the last item is the test target, the one
before the validation target, the rest is the training part.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.errors import DataValidationError
from recsys.data.pipeline import FORMAT_VERSION, MIN_HISTORY
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
    def file_hashes(self) -> dict[str, str]:
        """The sha256 of every file of the directory, by its path inside it (what a checkpoint
        records of the data it was trained on, so that a resume on other data is refused)."""
        hashes = {}
        for file in sorted(p for p in self.path.rglob("*") if p.is_file()):
            with open(file, "rb") as f:
                hashes[file.relative_to(self.path).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
        return hashes

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
    """Read a directory written by :func:`recsys.data.prepare`.

    The directory is checked against its own stats and shapes first (files present and readable,
    ``stats.json`` counts, user and item numbering, indices in range, every user's history long
    enough to split, training counts, feature shapes and values): a tampered, truncated or
    incomplete directory is refused with a :class:`DataValidationError` naming the file and what is
    wrong, before any training starts.
    """
    directory = Path(directory)
    for name in REQUIRED_FILES:
        if not (directory / name).is_file():
            raise DataValidationError(directory, f"not a prepared dataset: {name} is missing")
    stats = _read_json(directory / "stats.json")
    if stats.get("format_version") != FORMAT_VERSION:
        raise DataValidationError(
            directory, f"prepared with format version {stats.get('format_version')}, this code reads {FORMAT_VERSION}: prepare it again"
        )
    interactions = _read_parquet(directory / "interactions.parquet", {"user": "int", "item": "int"})
    users = _read_parquet(directory / "users.parquet", {"user": "int", "user_id": None})
    items = _read_parquet(directory / "items.parquet", {"item": "int", "item_id": None, "train_count": "int"}, optional=("cold_start",))
    _check_numbering(directory / "users.parquet", users["user"], "user")
    _check_numbering(directory / "items.parquet", items["item"], "item")
    history_lengths = _check_interactions(directory / "interactions.parquet", interactions, users.height, items.height)
    train_counts = np.concatenate([[0], items["train_count"].to_numpy()]).astype(np.int64)
    _check_train_counts(directory / "items.parquet", train_counts, interactions["item"].to_numpy(), history_lengths, items["item_id"])
    _check_stats(directory, stats, users.height, items.height, interactions.height)
    _check_features(directory / "features", stats, train_counts, items["item_id"])
    return PreparedDataset(
        path=directory,
        seq_items=interactions["item"].to_numpy().astype(np.int32, copy=False),
        seq_offsets=np.concatenate([[0], np.cumsum(history_lengths)]).astype(np.int64),
        item_ids=_with_padding(items["item_id"]),
        user_ids=_with_padding(users["user_id"]),
        train_counts=train_counts,
        stats=stats,
        # datasets prepared before the cold-start protocol have no such column
        cold_start=np.concatenate([[False], items["cold_start"].to_numpy() if "cold_start" in items.columns else np.zeros(items.height, bool)]),
        _item_lookup=items.select(pl.col("item_id").alias("id"), pl.col("item").alias("index")),
        _user_lookup=users.select(pl.col("user_id").alias("id"), pl.col("user").alias("index")),
    )


# -- reading the files, every failure named ----------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataValidationError(path, f"cannot read the file ({exc}); prepare the dataset again") from None
    if not isinstance(value, dict):
        raise DataValidationError(path, f"expected a JSON object, got {type(value).__name__}")
    return value


def _read_parquet(path: Path, columns: dict[str, str | None], optional: tuple[str, ...] = ()) -> pl.DataFrame:
    """``columns`` (name -> ``"int"`` for an integer column without nulls, or None) of a prepared
    parquet file, and the ``optional`` ones it has."""
    try:
        schema = pl.read_parquet_schema(path)
        missing = [c for c in columns if c not in schema]
        if missing:
            raise DataValidationError(path, f"has no column {missing[0]!r} (columns: {', '.join(schema)}); prepare the dataset again")
        table = pl.read_parquet(path, columns=[*columns, *(c for c in optional if c in schema)])
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataValidationError(path, f"cannot read the file ({_first_line(exc)}); it may be truncated: prepare the dataset again") from None
    for name, kind in columns.items():
        if kind == "int" and (not table[name].dtype.is_integer() or table[name].null_count()):
            raise DataValidationError(path, f"column {name!r} must hold integers without nulls, got {table[name].dtype} "
                                            f"with {table[name].null_count()} nulls")
    return table


def _read_array(path: Path) -> np.ndarray:
    """A ``.npy`` file, memory-mapped (only its header is read until its values are looked at)."""
    if not path.is_file():
        raise DataValidationError(path, "is missing (listed in features/features.json); prepare the dataset again")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # numpy's errors for a truncated or foreign file
        raise DataValidationError(path, f"cannot read the array ({_first_line(exc)}); it may be truncated: prepare the dataset again") from None


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# -- checks of the directory against itself ------------------------------------------------------------


def _check_numbering(path: Path, index: pl.Series, what: str) -> None:
    """Row ``r`` (from 0) of users.parquet / items.parquet must hold index ``r + 1``."""
    wrong = np.flatnonzero(index.to_numpy() != np.arange(1, len(index) + 1))
    if len(wrong):
        row = int(wrong[0])
        raise DataValidationError(
            path, f"column {what!r} must number the rows 1..{len(index)} in order; row {row + 1} holds {index[row]}"
        )


def _check_interactions(path: Path, interactions: pl.DataFrame, num_users: int, num_items: int) -> np.ndarray:
    """Indices in range, rows grouped by user, every user with a training, validation and test
    event. Returns the history length of each user (index 0 = padding, 0)."""
    user, item = interactions["user"].to_numpy(), interactions["item"].to_numpy()
    for name, values, count, table in (("user", user, num_users, "users.parquet"), ("item", item, num_items, "items.parquet")):
        outside = np.flatnonzero((values < 1) | (values > count))
        if len(outside):
            row = int(outside[0])
            padding = " (0 is the padding index)" if values[row] == 0 else ""
            raise DataValidationError(
                path, f"{name} index {values[row]} at row {row + 1} is outside 1..{count}{padding}: {table} has {count} {name}s "
                      f"({len(outside)} of {len(values)} rows are outside)"
            )
    if len(user) > 1 and (np.diff(user) < 0).any():
        raise DataValidationError(path, "rows are not sorted by user")
    lengths = np.bincount(user, minlength=num_users + 1)
    short = np.flatnonzero(lengths[1:] < MIN_HISTORY) + 1
    if len(short):
        raise DataValidationError(
            path, f"user {short[0]} has {lengths[short[0]]} events; every user needs at least {MIN_HISTORY} "
                  f"(training, validation and test) ({len(short)} of {num_users} users have fewer)"
        )
    return lengths


def _check_train_counts(path: Path, train_counts: np.ndarray, item: np.ndarray, lengths: np.ndarray, item_ids: pl.Series) -> None:
    """``train_count`` must be each item's events in the training parts (all but each user's last two)."""
    ends = np.cumsum(lengths)
    position_from_end = np.repeat(ends, lengths) - np.arange(len(item))  # 1 = the user's last event
    expected = np.bincount(item[position_from_end > 2], minlength=len(train_counts))
    wrong = np.flatnonzero(expected != train_counts)
    if len(wrong):
        i = int(wrong[0])
        raise DataValidationError(
            path, f"train_count of {_item_name(i, item_ids)} is {train_counts[i]}, but the training parts of "
                  f"interactions.parquet hold it {expected[i]} times ({len(wrong)} of {len(train_counts) - 1} items differ)"
        )


def _check_stats(directory: Path, stats: dict, num_users: int, num_items: int, num_interactions: int) -> None:
    actual = {"users": (num_users, "users.parquet"), "items": (num_items, "items.parquet"),
              "interactions": (num_interactions, "interactions.parquet")}
    for key, (value, source) in actual.items():
        if stats.get(key) != value:
            raise DataValidationError(
                directory / "stats.json", f"says {key} = {stats.get(key)}, but {source} has {value} rows; prepare the dataset again"
            )


def _check_features(directory: Path, stats: dict, train_counts: np.ndarray, item_ids: pl.Series) -> None:
    """Every feature file features.json lists: present, readable, of the catalogue's shape, with
    finite values and categories inside their vocabulary; ``in_training`` as the training counts say."""
    index = _read_json(directory / "features.json")
    rows = len(train_counts)  # items + the padding row 0
    if index.get("num_items") != rows - 1:
        raise DataValidationError(directory / "features.json", f"says num_items = {index.get('num_items')}, but items.parquet has {rows - 1}")
    dims = {name: entry.get("dim") for name, entry in stats.get("features", {}).get("dense", {}).items()}
    for name in index.get("dense", []):
        path = directory / f"dense_{name}.npy"
        values = _read_array(path)
        _check_shape(path, values, (rows, None), "a row per item plus the padding row 0")
        if name in dims and values.shape[1] != dims[name]:
            raise DataValidationError(path, f"has width {values.shape[1]}, but stats.json says the feature {name!r} has dim {dims[name]}")
        if not np.issubdtype(values.dtype, np.floating):
            raise DataValidationError(path, f"must hold floats, got {values.dtype}")
        _check_finite(path, values, item_ids)
        _check_shape(directory / f"dense_{name}_mask.npy", _read_array(directory / f"dense_{name}_mask.npy"), (rows,), "a flag per item row")
    for name, vocab_size in index.get("bags", {}).items():
        offsets = _read_array(directory / f"bag_{name}_offsets.npy")
        values = _read_array(directory / f"bag_{name}_values.npy")
        _check_shape(directory / f"bag_{name}_offsets.npy", offsets, (rows + 1,), "an offset per item row, plus one")
        if not (np.issubdtype(offsets.dtype, np.integer) and np.issubdtype(values.dtype, np.integer)):
            raise DataValidationError(directory / f"bag_{name}_values.npy", f"bags must hold integers, got {values.dtype} and {offsets.dtype}")
        if offsets[0] != 0 or offsets[-1] != len(values) or (np.diff(offsets) < 0).any():
            raise DataValidationError(directory / f"bag_{name}_offsets.npy",
                                      f"offsets must rise from 0 to the {len(values)} values of bag_{name}_values.npy")
        outside = np.flatnonzero((values < 0) | (values >= vocab_size))
        if len(outside):
            raise DataValidationError(directory / f"bag_{name}_values.npy",
                                      f"category {values[outside[0]]} is outside the vocabulary 0..{vocab_size - 1} of features.json")
    in_training = _read_array(directory / "in_training.npy")
    _check_shape(directory / "in_training.npy", in_training, (rows,), "a flag per item row")
    expected = train_counts > 0
    wrong = np.flatnonzero(np.asarray(in_training, dtype=bool) != expected)
    if len(wrong):
        i = int(wrong[0])
        raise DataValidationError(
            directory / "in_training.npy",
            f"says {_item_name(i, item_ids)} is{'' if in_training[i] else ' not'} in training, but its train_count in items.parquet "
            f"is {train_counts[i]} ({len(wrong)} rows differ)"
        )


def _check_shape(path: Path, values: np.ndarray, expected: tuple[int | None, ...], meaning: str) -> None:
    if values.ndim != len(expected) or any(e is not None and s != e for s, e in zip(values.shape, expected)):
        shown = "(" + ", ".join("dim" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
        raise DataValidationError(path, f"has shape {tuple(values.shape)}, expected {shown}: {meaning}")


def _check_finite(path: Path, values: np.ndarray, item_ids: pl.Series, block: int = 1 << 16) -> None:
    """No NaN or infinity in a dense feature, checked a block of rows at a time (it is memory-mapped)."""
    bad = []
    for start in range(0, len(values), block):
        bad.extend(np.flatnonzero(~np.isfinite(values[start : start + block]).all(axis=1)) + start)
    if bad:
        i = int(bad[0])
        raise DataValidationError(path, f"the row of {_item_name(i, item_ids)} holds NaN or infinite values ({len(bad)} of {len(values)} rows do)")


def _item_name(row: int, item_ids: pl.Series) -> str:
    return "the padding row 0" if row == 0 else f"item {row} (id {item_ids[row - 1]!r})"


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
