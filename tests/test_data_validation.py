"""A table of bad inputs: each raises its own clear DataValidationError and leaves no output behind."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.data import DataValidationError, ItemFeatures, prepare

GOOD_LOG = "user,item,ts\n" + "".join(f"u{u},i{i},{t}\n" for u in range(3) for t, i in enumerate(range(4)))
GOOD_ITEMS = "item,title,genres\ni0,A,x|y\ni1,B,y\ni2,C,x\ni3,D,z\n"


def text(name: str, content: str):
    def write(d):
        (d / name).write_text(content)
        return d / name
    return write


def frame(name: str, data: dict, schema=None):
    def write(d):
        pl.DataFrame(data, schema=schema).write_parquet(d / name)
        return d / name
    return write


def npz(name: str, **arrays):
    def write(d):
        np.savez(d / name, **arrays)
        return d / name
    return write


def raw_bytes(name: str, content: bytes):
    def write(d):
        (d / name).write_bytes(content)
        return d / name
    return write


good_log = text("log.csv", GOOD_LOG)
good_items = text("items.csv", GOOD_ITEMS)

# (case id, interactions writer, items writer or None, vector writers {name: writer}, extra options, expected message regex)
CASES = [
    ("missing file", lambda d: d / "nope.csv", None, {}, {}, r"nope\.csv: file not found"),
    ("unknown extension", text("log.json", GOOD_LOG), None, {}, {}, r"log\.json: unknown file extension '\.json'"),
    ("misnamed user column", good_log, None, {}, {"user_col": "usr"},
     r"log\.csv: the interaction log has no column 'usr' \(given by --user-col\); available columns: user, item, ts"),
    ("misnamed time column", good_log, None, {}, {"time_col": "time"}, r"no column 'time' \(given by --time-col\)"),
    ("misnamed weight column", good_log, None, {}, {"weight_col": "plays"}, r"no column 'plays' \(given by --weight-col\)"),
    ("empty log", text("log.csv", "user,item,ts\n"), None, {}, {}, r"log\.csv: the interaction log has no rows"),
    ("empty file", text("log.csv", ""), None, {}, {}, r"log\.csv: "),
    ("null user id", text("log.csv", "user,item,ts\nu,a,1\n,b,2\n"), None, {}, {}, r"log\.csv: user column 'user' is empty \(null id\) at row 2"),
    ("null item id", text("log.csv", "user,item,ts\nu,a,1\nu,b,2\nu,,3\n"), None, {}, {}, r"item column 'item' is empty \(null id\) at row 3"),
    ("unparsable time", text("log.csv", "user,item,ts\nu,a,1\nu,b,yesterday\n"), None, {}, {},
     r"log\.csv: time column 'ts' has the value 'yesterday' at row 2, which is not a number"),
    ("unparsable datetime", text("log.csv", "user,item,ts\nu,a,2020-01-01\nu,b,2020-13-45\n"), None, {}, {},
     r"time column 'ts' has the value '2020-13-45' at row 2, which is not a date/time"),
    ("null time", text("log.csv", "user,item,ts\nu,a,1\nu,b,\n"), None, {}, {}, r"time column 'ts' is empty \(null\) at row 2"),
    ("NaN time in parquet", frame("log.parquet", {"user": [1, 1], "item": [1, 2], "ts": [1.0, float("nan")]}), None, {}, {},
     r"log\.parquet: time column 'ts' has the value nan at row 2"),
    ("bad weight", text("log.csv", "user,item,ts,w\nu,a,1,3\nu,b,2,lots\n"), None, {}, {"weight_col": "w"},
     r"weight column 'w' has the value 'lots' at row 2; expected a number"),
    ("float ids", frame("log.parquet", {"user": [1.0, 2.0], "item": [1, 2], "ts": [1, 2]}), None, {}, {},
     r"log\.parquet: user column 'user' has type Float64; ids must be integers or strings"),
    ("corrupt parquet", raw_bytes("log.parquet", b"not a parquet file at all"), None, {}, {}, r"log\.parquet: cannot read the file"),
    ("ragged csv", text("log.csv", "user,item,ts\nu,a,1\nu,b,2,extra,fields\n"), None, {}, {}, r"log\.csv: cannot read the file"),
    ("item table without id column", good_log, text("items.csv", "id,title\ni0,A\n"), {}, {},
     r"items\.csv: the item table has no column 'item' \(given by --items-id-col\); available columns: id, title"),
    ("item table duplicate id", good_log, text("items.csv", "item,title\ni0,A\ni1,B\ni0,C\n"), {}, {},
     r"items\.csv: item id 'i0' occurs more than once in column 'item' \(rows 1, 3\)"),
    ("item table null id", good_log, text("items.csv", "item,title\ni0,A\n,B\n"), {}, {}, r"items\.csv: item column 'item' is empty \(null id\) at row 2"),
    ("empty item table", good_log, text("items.csv", "item,title\n"), {}, {}, r"items\.csv: the item table has no rows"),
    ("missing text column", good_log, good_items, {}, {"text_cols": ["title", "plot"]}, r"items\.csv: .*no column 'plot' \(given by --text-cols\)"),
    ("missing category column", good_log, good_items, {}, {"category_cols": ["tags"]}, r"no column 'tags' \(given by --category-cols\)"),
    ("text without item table", good_log, None, {}, {"text_cols": ["title"]}, r"--items: --text-cols and --category-cols need an item table"),
    ("vectors of inconsistent length", good_log, None, {"img": frame("v.parquet", {"item": ["i0", "i1"], "v": [[1.0, 2.0], [1.0, 2.0, 3.0]]})}, {},
     r"v\.parquet: id 'i1' \(row 2\) has a vector of length 3, the first one has 2"),
    ("vectors with NaN (parquet)", good_log, None, {"img": frame("v.parquet", {"item": ["i0", "i1"], "v": [[1.0, 2.0], [float("nan"), 0.0]]})}, {},
     r"v\.parquet: the vector of id 'i1' contains NaN"),
    ("vectors with null entry", good_log, None, {"img": frame("v.parquet", {"item": ["i0", "i1"], "v": [[1.0, None], [1.0, 0.0]]})}, {},
     r"v\.parquet: the vector of id 'i0' contains NaN or missing values"),
    ("vectors with NaN (npz)", good_log, None, {"img": npz("v.npz", ids=np.array(["i0", "i1"]), vectors=np.array([[1.0], [np.nan]]))}, {},
     r"v\.npz: the vector of id 'i1' contains NaN"),
    ("npz without vectors", good_log, None, {"img": npz("v.npz", ids=np.array(["i0"]), vecs=np.ones((1, 2)))}, {},
     r"v\.npz: has no array 'vectors'; arrays found: ids, vecs"),
    ("npz ids and vectors disagree", good_log, None, {"img": npz("v.npz", ids=np.array(["i0", "i1"]), vectors=np.ones((3, 2)))}, {},
     r"v\.npz: expected 'ids' of shape \(n,\) and 'vectors' of shape \(n, dim\)"),
    ("duplicate vector ids", good_log, None, {"img": npz("v.npz", ids=np.array([1, 1]), vectors=np.ones((2, 2)))}, {},
     r"v\.npz: id 1 has more than one vector"),
    ("vectors without a list column", good_log, None, {"img": frame("v.parquet", {"item": ["i0"], "x": [1.0]})}, {},
     r"v\.parquet: expected exactly one list/array column holding the vectors, found 0 among: item, x"),
    ("vector file extension", good_log, None, {"img": text("v.csv", "item,v\n")}, {}, r"v\.csv: unknown vector file extension '\.csv'"),
    ("bad feature name", good_log, None, {"my-img": npz("v.npz", ids=np.array([1]), vectors=np.ones((1, 2)))}, {},
     r"feature name 'my-img' must be letters, digits and _"),
    ("feature name text taken", good_log, good_items, {"text": npz("v.npz", ids=np.array([1]), vectors=np.ones((1, 2)))}, {"text_cols": ["title"]},
     r"--vectors: the feature name 'text' is taken by --text-cols"),
    ("unknown repeat policy", good_log, None, {}, {"repeats": "merge"}, r"--repeats: unknown repeat policy 'merge'"),
    ("negative min count", good_log, None, {}, {"min_count": -1}, r"--min-count: must be 0 or more, got -1"),
    ("same user and item column", good_log, None, {}, {"item_col": "user"}, r"--user-col: the user and item columns must differ"),
    ("nothing survives the k-core", good_log, None, {}, {"min_count": 50}, r"log\.csv: no events left after cleaning"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_reported_and_leaves_no_output(tmp_path, case):
    _, write_log, write_items, vector_writers, options, message = case
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    kwargs = {"user_col": "user", "item_col": "item", "time_col": "ts", "min_count": 1, "cache_dir": None}
    kwargs.update(options)
    if write_items is not None:
        kwargs["items"] = write_items(inputs)
    if vector_writers:
        kwargs["vectors"] = {name: w(inputs) for name, w in vector_writers.items()}
    log = write_log(inputs)
    with pytest.raises(DataValidationError, match=message):
        prepare(log, tmp_path / "out", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]  # no output, no temporary directory


def test_good_inputs_of_the_table_prepare(tmp_path):
    """The table's good files really are good: the failures above come from the one bad thing."""
    log, items = good_log(tmp_path), good_items(tmp_path)
    out = prepare(log, tmp_path / "out", items=items, user_col="user", item_col="item", time_col="ts", min_count=1,
                  category_cols=["genres"], cache_dir=None)
    assert (out / "stats.json").is_file()


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    log = good_log(tmp_path)

    def broken_save(self, directory):
        (directory / "half-written.npy").parent.mkdir(parents=True, exist_ok=True)
        (directory / "half-written.npy").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(ItemFeatures, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        prepare(log, tmp_path / "out", user_col="user", item_col="item", time_col="ts", min_count=1, cache_dir=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]
