"""A prepared directory is checked against its own stats and shapes when it is loaded.

Each case changes one thing in a copy of a good prepared directory (a count in ``stats.json``, a
feature matrix's width or rows, an index out of range, item index 0, a NaN, a truncated or missing
file, ...) and ``load_prepared`` must refuse it with a ``DataValidationError`` naming the file and
what is wrong, before anything trains on it. Before these checks every case failed this test: 17
loaded silently, 17 raised a bare ``ValueError``, ``TypeError``, ``FileNotFoundError``, JSON or
polars error, and one was refused for the wrong reason ("rows are not sorted by user").
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data import DataValidationError, load_prepared

Tamper = Callable[[Path], None]


def _stats(**changes) -> Tamper:
    def change(d: Path) -> None:
        stats = json.loads((d / "stats.json").read_text())
        (d / "stats.json").write_text(json.dumps({**stats, **changes}))
    return change


def _array(name: str, edit: Callable[[np.ndarray], np.ndarray]) -> Tamper:
    def change(d: Path) -> None:
        path = d / "features" / name
        np.save(path, edit(np.load(path)))
    return change


def _set(x: np.ndarray, index, value) -> np.ndarray:
    x = x.copy()
    x[index] = value
    return x


def _table(name: str, edit: Callable[[pl.DataFrame], pl.DataFrame]) -> Tamper:
    def change(d: Path) -> None:
        edit(pl.read_parquet(d / name)).write_parquet(d / name)
    return change


def _cell(column: str, row: int, value) -> Callable[[pl.DataFrame], pl.DataFrame]:
    return lambda t: t.with_columns(
        pl.when(pl.int_range(pl.len()) == row).then(value).otherwise(pl.col(column)).cast(t[column].dtype).alias(column)
    )


def _truncate(name: str) -> Tamper:
    def change(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
    return change


def _delete(name: str) -> Tamper:
    return lambda d: (d / name).unlink()


def _text(name: str, text: str) -> Tamper:
    return lambda d: (d / name).write_text(text)


def _features_json(**changes) -> Tamper:
    def change(d: Path) -> None:
        index = json.loads((d / "features" / "features.json").read_text())
        (d / "features" / "features.json").write_text(json.dumps({**index, **changes}))
    return change


def _drop_first_events_of_user_1(keep: int) -> Tamper:
    """User 1 keeps only its last ``keep`` events; train_count follows, so only the history is short."""
    def change(d: Path) -> None:
        events = pl.read_parquet(d / "interactions.parquet")
        mine = events.filter(pl.col("user") == 1)
        events = pl.concat([mine.tail(keep), events.filter(pl.col("user") != 1)])
        events.write_parquet(d / "interactions.parquet")
        train = np.bincount(events.filter(pl.col("pos") < pl.col("pos").max().over("user") - 1)["item"].to_numpy(),
                            minlength=pl.read_parquet(d / "items.parquet").height + 1)[1:]
        _table("items.parquet", lambda t: t.with_columns(pl.Series("train_count", train.astype(np.int64))))(d)
        stats = json.loads((d / "stats.json").read_text())
        (d / "stats.json").write_text(json.dumps({**stats, "interactions": events.height}))
    return change


# (case, tamper, the file named, what the message says)
CASES: list[tuple[str, Tamper, str, str]] = [
    ("users count in stats.json", _stats(users=999), "stats.json", r"says users = 999, but users\.parquet has \d+ rows"),
    ("items count in stats.json", _stats(items=3), "stats.json", r"says items = 3, but items\.parquet has 120 rows"),
    ("interactions count in stats.json", _stats(interactions=5), "stats.json", r"says interactions = 5, but interactions\.parquet has"),
    ("stats.json not JSON", _text("stats.json", "{"), "stats.json", r"cannot read the file"),
    ("feature matrix one column wider", _array("dense_text.npy", lambda x: np.concatenate([x, x[:, :1]], 1)),
     "features/dense_text.npy", r"has width 9, but stats\.json says the feature 'text' has dim 8"),
    ("feature matrix one row short", _array("dense_text.npy", lambda x: x[:-1]),
     "features/dense_text.npy", r"has shape \(120, 8\), expected \(121, dim\)"),
    ("feature matrix flattened", _array("dense_text.npy", lambda x: x[:, 0]), "features/dense_text.npy", r"has shape \(121,\)"),
    ("feature matrix of integers", _array("dense_text.npy", lambda x: x.astype(np.int64)), "features/dense_text.npy", r"must hold floats"),
    ("NaN in a feature", _array("dense_text.npy", lambda x: _set(x, (5, 0), np.nan)),
     "features/dense_text.npy", r"the row of item 5 \(id \d+\) holds NaN or infinite values \(1 of 121 rows do\)"),
    ("infinity in a feature", _array("dense_text.npy", lambda x: _set(x, (7, 1), -np.inf)),
     "features/dense_text.npy", r"the row of item 7 .* holds NaN or infinite values"),
    ("NaN in the padding row", _array("dense_text.npy", lambda x: _set(x, (0, 0), np.nan)),
     "features/dense_text.npy", r"the row of the padding row 0 holds NaN"),
    ("feature mask short", _array("dense_text_mask.npy", lambda x: x[:-2]), "features/dense_text_mask.npy", r"has shape \(119,\), expected \(121,\)"),
    ("category outside the vocabulary", _array("bag_tags_values.npy", lambda x: _set(x, 0, 10**6)),
     "features/bag_tags_values.npy", r"category 1000000 is outside the vocabulary 0\.\.\d+"),
    ("bag offsets short", _array("bag_tags_offsets.npy", lambda x: x[:-1]), "features/bag_tags_offsets.npy", r"has shape \(121,\), expected \(122,\)"),
    ("bag offsets past the values", _array("bag_tags_offsets.npy", lambda x: _set(x, -1, x[-1] + 5)),
     "features/bag_tags_offsets.npy", r"offsets must rise from 0 to the \d+ values"),
    ("in_training short", _array("in_training.npy", lambda x: x[:-1]), "features/in_training.npy", r"has shape \(120,\)"),
    ("in_training flipped", _array("in_training.npy", lambda x: ~x), "features/in_training.npy", r"says the padding row 0 is in training"),
    ("user index out of range", _table("interactions.parquet", _cell("user", 10, 10**5)),
     "interactions.parquet", r"user index 100000 at row 11 is outside 1\.\.\d+: users\.parquet has \d+ users"),
    ("user index 0", _table("interactions.parquet", _cell("user", 0, 0)),
     "interactions.parquet", r"user index 0 at row 1 is outside 1\.\.\d+ \(0 is the padding index\)"),
    ("item index 0 (padding)", _table("interactions.parquet", _cell("item", 3, 0)),
     "interactions.parquet", r"item index 0 at row 4 is outside 1\.\.120 \(0 is the padding index\): items\.parquet has 120 items"),
    ("item index above the catalogue", _table("interactions.parquet", _cell("item", 3, 10**4)),
     "interactions.parquet", r"item index 10000 at row 4 is outside 1\.\.120"),
    ("a user with 2 events", _drop_first_events_of_user_1(2),
     "interactions.parquet", r"user 1 has 2 events; every user needs at least 3 \(training, validation and test\)"),
    ("null user index", _table("interactions.parquet", lambda t: t.with_columns(
        pl.when(pl.int_range(pl.len()) == 2).then(None).otherwise(pl.col("user")).alias("user"))),
     "interactions.parquet", r"column 'user' must hold integers without nulls, got Int32 with 1 nulls"),
    ("train_count changed", _table("items.parquet", _cell("train_count", 2, 77)),
     "items.parquet", r"train_count of item 3 \(id \d+\) is 77, but the training parts of interactions\.parquet hold it \d+ times"),
    ("users renumbered", _table("users.parquet", _cell("user", 4, 99)), "users.parquet", r"column 'user' must number the rows 1\.\.\d+ in order; row 5 holds 99"),
    ("items column missing", _table("items.parquet", lambda t: t.drop("train_count")), "items.parquet", r"has no column 'train_count'"),
    ("truncated interactions.parquet", _truncate("interactions.parquet"), "interactions.parquet", r"cannot read the file .*it may be truncated"),
    ("truncated items.parquet", _truncate("items.parquet"), "items.parquet", r"cannot read the file"),
    ("truncated users.parquet", _truncate("users.parquet"), "users.parquet", r"cannot read the file"),
    ("truncated feature file", _truncate("features/dense_text.npy"), "features/dense_text.npy", r"cannot read the array .*it may be truncated"),
    ("missing feature file", _delete("features/dense_text.npy"), "features/dense_text.npy", r"is missing \(listed in features/features\.json\)"),
    ("missing bag file", _delete("features/bag_tags_values.npy"), "features/bag_tags_values.npy", r"is missing"),
    ("missing in_training.npy", _delete("features/in_training.npy"), "features/in_training.npy", r"is missing"),
    ("features.json num_items", _features_json(num_items=5), "features/features.json", r"says num_items = 5, but items\.parquet has 120"),
    ("features.json not JSON", _text("features/features.json", "nope"), "features/features.json", r"cannot read the file"),
]


@pytest.mark.parametrize("tamper,file,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_tampered_prepared_directory_is_refused_naming_the_file(synthetic_prepared, tmp_path, tamper, file, message):
    directory = tmp_path / "prepared"
    shutil.copytree(synthetic_prepared, directory)
    tamper(directory)
    with pytest.raises(DataValidationError) as error:
        load_prepared(directory)
    assert error.value.source == str(directory / file)
    assert re.search(message, error.value.problem), error.value.problem


def test_the_good_directory_loads(synthetic_prepared):
    """The cases above change one thing each: the directory they start from passes every check."""
    data = load_prepared(synthetic_prepared)
    assert data.num_items == 120 and np.isfinite(data.item_features.dense["text"].numpy()).all()
