"""Fuzz-style test of ``prepare``: seeded random corruptions of a small valid log, item table and vector file.

Every case corrupts one file in one way (a dropped or renamed column, a wrong type, an empty string,
a null, NaN, a huge id, unicode, a repeated header line, a BOM, an empty or truncated file, ...),
with the row, column and value drawn from a seeded generator. Whatever the corruption, ``prepare``
must end in one of two ways:

- a valid prepared directory: ``load_prepared`` reads it and its arrays agree with ``stats.json``;
- one ``DataValidationError`` whose message starts with the corrupted file, and no output at all
  (neither the output directory nor a temporary one).

Any other exception (a polars, numpy or torch error from deep inside) fails the test, and so does
partial output. A few error cases also go through the CLI: exit status 2 and one ``error:`` line.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import subprocess
import sys
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data import DataValidationError, load_prepared, prepare
from recsys.data.__main__ import main as data_main

SEED = 20240611
N_USERS, N_ITEMS, EVENTS = 12, 10, 6
OPTIONS = dict(user_col="user_id", item_col="item_id", time_col="timestamp", category_cols=["tags"],
               min_count=2, cache_dir=None)
WEIRD_IDS = ["ユーザー", "🙂", "e\u0301", "\u200bzero-width", "مستخدم", "a,b", 'quo"te', " padded ", "null", "NaN"]


# -- the valid inputs ----------------------------------------------------------------------------------


def base_log(rng: random.Random) -> pl.DataFrame:
    """Every user sees EVENTS distinct items at increasing times; ids are integers."""
    rows = []
    for user in range(1, N_USERS + 1):
        items = rng.sample(range(101, 101 + N_ITEMS), EVENTS)
        start = rng.randrange(1_600_000_000, 1_700_000_000)
        rows += [(user, item, start + 60 * k, rng.choice(["web", "app"])) for k, item in enumerate(items)]
    return pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "device"], orient="row")


def base_items(rng: random.Random) -> pl.DataFrame:
    tags = ["drama", "comedy", "jazz", "rock", "news"]
    return pl.DataFrame({
        "item_id": list(range(101, 101 + N_ITEMS + 2)),  # two cold-start items
        "title": [f"Title {i}" for i in range(N_ITEMS + 2)],
        "tags": ["|".join(rng.sample(tags, rng.randint(1, 3))) for _ in range(N_ITEMS + 2)],
    })


def base_vectors(rng: random.Random) -> pl.DataFrame:
    ids = list(range(101, 101 + N_ITEMS))
    return pl.DataFrame({"item_id": ids, "vector": [[rng.uniform(-1, 1) for _ in range(4)] for _ in ids]})


# -- corruptions -------------------------------------------------------------------------------------------
# A frame corruption changes the table before it is written; a byte corruption changes the written file.
# Each takes the generator and returns the new frame / bytes.


def _row(rng, frame):
    return rng.randrange(frame.height)


def _set(frame: pl.DataFrame, column: str, row: int, value, dtype=None) -> pl.DataFrame:
    values = frame[column].to_list()
    if dtype == pl.String:
        values = [None if v is None else str(v) for v in values]
    values[row] = value
    return frame.with_columns(pl.Series(column, values, dtype=dtype, strict=False))


def drop_column(rng, f, used):
    return f.drop(rng.choice(used))


def rename_column(rng, f, used):
    column = rng.choice(used)
    return f.rename({column: rng.choice([column.upper(), column + " ", column.replace("_", "-"), "col"])})


def extra_columns(rng, f, used):
    return f.with_columns(pl.lit(None, dtype=pl.String).alias("empty"), pl.Series("score", [rng.random() for _ in range(f.height)]))


def strings_in_time(rng, f, used):
    return _set(f, "timestamp", _row(rng, f), rng.choice(["soon", "12:00", "1e400", "", "2020-02-30"]), pl.String)


def floats_in_ids(rng, f, used):
    column = rng.choice([c for c in used if c.endswith("_id")])
    out = f.with_columns(pl.col(column).cast(pl.Float64))
    return _set(out, column, _row(rng, out), rng.choice([1.5, float("nan"), 1e20]))


def empty_string_id(rng, f, used):
    column = rng.choice([c for c in used if c.endswith("_id")])
    return _set(f, column, _row(rng, f), "", pl.String)


def null_value(rng, f, used):
    column = rng.choice(used)
    return _set(f, column, _row(rng, f), None)


def nan_time(rng, f, used):
    out = f.with_columns(pl.col("timestamp").cast(pl.Float64))
    return _set(out, "timestamp", _row(rng, out), rng.choice([float("nan"), float("inf")]))


def huge_int_id(rng, f, used):
    """Ids at the ends of Int64 (or beyond, as UInt64), different from each other."""
    column = rng.choice([c for c in used if c.endswith("_id")])
    value, step, dtype = rng.choice([(2**63 - 1, -1, pl.Int64), (-(2**63), 1, pl.Int64), (2**64 - 1, -1, pl.UInt64)])
    values = f[column].to_list()
    for k, row in enumerate({_row(rng, f) for _ in range(3)}):
        values[row] = value + k * step
    return f.with_columns(pl.Series(column, values, dtype=dtype))


def twenty_digit_id(rng, f, used):
    column = rng.choice([c for c in used if c.endswith("_id")])
    return _set(f, column, _row(rng, f), "".join(rng.choice("123456789") for _ in range(20)), pl.String)


def unicode_ids(rng, f, used):
    """Every id of one column becomes a unicode string (consistently, so the ids still match)."""
    column = rng.choice([c for c in used if c.endswith("_id")])
    names = {v: f"{rng.choice(WEIRD_IDS)}-{v}" for v in f[column].unique().to_list()}
    out = f.with_columns(pl.col(column).replace_strict(names, return_dtype=pl.String))
    if "tags" in out.columns:
        out = out.with_columns(pl.col("tags") + "|ünï©ødé 🎵")
    return out


def duplicate_rows(rng, f, used):
    return pl.concat([f, f.sample(3, seed=rng.randrange(1000))])


def duplicate_id(rng, f, used):
    return pl.concat([f, f.head(1)])


FRAME = {
    "dropped column": drop_column, "renamed column": rename_column, "extra columns": extra_columns,
    "strings in the time column": strings_in_time, "floats in an id column": floats_in_ids,
    "empty string id": empty_string_id, "null value": null_value, "NaN time": nan_time,
    "huge integer id": huge_int_id, "20-digit id": twenty_digit_id, "unicode ids and text": unicode_ids,
    "duplicate rows": duplicate_rows, "duplicate item id": duplicate_id,
}


def duplicate_header(rng, data: bytes) -> bytes:
    lines = data.split(b"\n")
    at = rng.randrange(2, len(lines) - 1)
    return b"\n".join(lines[:at] + [lines[0]] + lines[at:])


def bom(rng, data):
    return b"\xef\xbb\xbf" + data


def empty_file(rng, data):
    return b""


def header_only(rng, data):
    return data.split(b"\n")[0] + b"\n"


def truncated(rng, data):
    return data[: rng.randrange(len(data) // 4, len(data) - 1)]


def crlf(rng, data):
    return data.replace(b"\n", b"\r\n")


def ragged_row(rng, data):
    separator = b"\t" if b"\t" in data.split(b"\n")[0] else b","
    lines = data.split(b"\n")
    at = rng.randrange(1, len(lines) - 1)
    lines[at] += separator + b"surplus"
    return b"\n".join(lines)


def latin1_bytes(rng, data):
    lines = data.split(b"\n")
    at = rng.randrange(1, len(lines) - 1)
    lines[at] = lines[at].replace(b"1", "\xe9".encode("latin-1"), 1)
    return b"\n".join(lines)


def garbage(rng, data):
    return bytes(rng.randrange(256) for _ in range(200))


BYTES = {
    "duplicate header line": duplicate_header, "BOM": bom, "empty file": empty_file, "header only": header_only,
    "truncated file": truncated, "CRLF line endings": crlf, "ragged row": ragged_row,
    "latin-1 bytes": latin1_bytes, "binary garbage": garbage,
}
TEXT_ONLY = {"duplicate header line", "BOM", "header only", "CRLF line endings", "ragged row", "latin-1 bytes"}


def nan_in_vector(rng, f, used):
    vectors = f["vector"].to_list()
    vectors[_row(rng, f)][rng.randrange(4)] = rng.choice([float("nan"), float("inf"), float("-inf")])
    return f.with_columns(pl.Series("vector", vectors))


def mixed_length_vectors(rng, f, used):
    vectors = f["vector"].to_list()
    vectors[_row(rng, f)] = rng.choice([[0.5] * 3, [0.5] * 5, []])
    return f.with_columns(pl.Series("vector", vectors))


def null_vector(rng, f, used):
    vectors = f["vector"].to_list()
    row = _row(rng, f)
    if rng.random() < 0.5:
        vectors[row] = None
    else:
        vectors[row][1] = None
    return f.with_columns(pl.Series("vector", vectors, dtype=pl.List(pl.Float64)))


def strings_in_vectors(rng, f, used):
    return f.with_columns(pl.col("vector").list.eval(pl.element().cast(pl.String)))


def no_vectors(rng, f, used):
    return f.head(0)


def array_column(rng, f, used):
    return f.with_columns(pl.col("vector").cast(pl.Array(pl.Float32, 4)))


VECTOR_FRAME = {
    "NaN in a vector": nan_in_vector, "vectors of mixed length": mixed_length_vectors, "null in a vector": null_vector,
    "strings in the vectors": strings_in_vectors, "no vectors": no_vectors, "fixed-size float32 array column": array_column,
}


def npz_object_array(rng, path: Path, f: pl.DataFrame) -> None:
    """Ragged vectors as an object array: np.savez pickles it, and the reader must not unpickle it."""
    vectors = np.empty(f.height, dtype=object)
    vectors[:] = [np.asarray(v) for v in f["vector"].to_list()]
    vectors[0] = np.zeros(7)
    np.savez(path, ids=f["item_id"].to_numpy(), vectors=vectors)


def npz_missing_array(rng, path, f):
    np.savez(path, ids=f["item_id"].to_numpy(), vecs=np.asarray(f["vector"].to_list()))


def npz_string_vectors(rng, path, f):
    np.savez(path, ids=f["item_id"].to_numpy(), vectors=np.asarray(f["vector"].to_list()).astype(str))


def npz_unsigned_ids(rng, path, f):
    ids = f["item_id"].to_numpy().astype(np.uint64)
    ids[_row(rng, f)] = 2**64 - 1
    np.savez(path, ids=ids, vectors=np.asarray(f["vector"].to_list()))


NPZ = {"npz with an object (pickled) array": npz_object_array, "npz without 'vectors'": npz_missing_array,
       "npz with text vectors": npz_string_vectors, "npz with ids beyond Int64": npz_unsigned_ids}


# -- the cases ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    index: int
    target: str  # "log", "items" or "vectors"
    corruption: str
    formats: tuple[str, str, str]  # suffixes of log, items, vectors

    @property
    def id(self) -> str:
        return f"{self.index:02d}-{self.target}{self.formats[('log', 'items', 'vectors').index(self.target)]}-{self.corruption}"


USED = {"log": ["user_id", "item_id", "timestamp"], "items": ["item_id", "tags"], "vectors": ["item_id", "vector"]}


def draw_cases() -> list[Case]:
    """Every corruption of every file it applies to, in formats drawn from a seeded generator."""
    rng = random.Random(SEED)
    plans = [("log", c) for c in FRAME if c != "duplicate item id"] + [("log", c) for c in BYTES]
    plans += [("items", c) for c in ("dropped column", "renamed column", "extra columns", "floats in an id column",
                                     "empty string id", "null value", "huge integer id", "20-digit id",
                                     "unicode ids and text", "duplicate item id")]
    plans += [("items", c) for c in ("duplicate header line", "BOM", "empty file", "header only", "truncated file")]
    plans += [("vectors", c) for c in VECTOR_FRAME] + [("vectors", c) for c in NPZ]
    plans += [("vectors", c) for c in ("dropped column", "huge integer id", "unicode ids and text", "duplicate item id",
                                       "truncated file", "empty file")]
    cases = []
    for index, (target, corruption) in enumerate(plans):
        log = rng.choice([".csv", ".tsv", ".parquet"])
        items = rng.choice([".csv", ".parquet"])
        vectors = rng.choice([".parquet", ".npz"])
        text_only = corruption in TEXT_ONLY
        if target == "log" and text_only:
            log = rng.choice([".csv", ".tsv"])
        if target == "items" and text_only:
            items = ".csv"
        if target == "vectors" and corruption not in BYTES:
            vectors = ".npz" if corruption in NPZ else ".parquet"
        if corruption in ("NaN time", "huge integer id", "floats in an id column"):
            log, items = ".parquet", ".parquet"  # typed values need parquet: CSV has no types
        cases.append(Case(index, target, corruption, (log, items, vectors)))
    return cases


CASES = draw_cases()


def write_table(frame: pl.DataFrame, path: Path) -> None:
    if path.suffix == ".parquet":
        frame.write_parquet(path)
    elif path.suffix == ".npz":
        np.savez(path, ids=frame["item_id"].to_numpy(), vectors=np.asarray(frame["vector"].to_list(), dtype=np.float64))
    else:
        frame.write_csv(path, separator="\t" if path.suffix == ".tsv" else ",", quote_style="necessary")


def write_inputs(case: Case, directory: Path) -> dict[str, Path]:
    """The three input files, with the case's corruption applied to its target; returns their paths."""
    rng = random.Random(f"{SEED}-{case.index}")
    frames = {"log": base_log(rng), "items": base_items(rng), "vectors": base_vectors(rng)}
    paths = {name: directory / f"{name}{suffix}" for name, suffix in zip(("log", "items", "vectors"), case.formats)}
    for name, frame in frames.items():
        path = paths[name]
        if name != case.target:
            write_table(frame, path)
        elif case.corruption in NPZ:
            NPZ[case.corruption](rng, path, frame)
        elif case.corruption in BYTES:
            write_table(frame, path)
            path.write_bytes(BYTES[case.corruption](rng, path.read_bytes()))
        else:
            corrupt = VECTOR_FRAME.get(case.corruption) or FRAME[case.corruption]
            frame = corrupt(rng, frame, USED[name])
            if path.suffix == ".npz" and frame.height and not frame["item_id"].dtype.is_integer():
                frame = frame.with_columns(pl.col("item_id").cast(pl.String))
            write_table(frame, path)
    return paths


def prepare_case(paths: dict[str, Path], out: Path) -> Path:
    return prepare(paths["log"], out, items=paths["items"], vectors={"img": paths["vectors"]}, **OPTIONS)


def check_valid(out: Path) -> None:
    """A prepared directory that loads and agrees with its stats."""
    data = load_prepared(out)
    stats = data.stats
    assert stats["users"] == data.num_users > 0 and stats["items"] == data.num_items > 0
    assert stats["interactions"] == len(data.seq_items) == data.seq_offsets[-1]
    lengths = data.history_lengths[1:]
    assert lengths.min() >= stats["min_user_events"] and lengths.sum() == stats["interactions"]
    assert stats["interacted_items"] + stats["cold_items"] == stats["items"]
    assert data.seq_items.min() >= 1 and data.seq_items.max() <= data.num_items
    assert len(set(data.item_ids[1:])) == data.num_items and len(set(data.user_ids[1:])) == data.num_users
    features = data.item_features
    assert features.dense["img"].shape == (data.num_items + 1, stats["features"]["dense"]["img"]["dim"])
    assert int(features.dense_mask["img"].sum()) == stats["features"]["dense"]["img"]["items_with_value"]
    assert np.isfinite(features.dense["img"].numpy()).all()
    assert features.bags["tags"].offsets.numel() == data.num_items + 2
    json.dumps(stats)  # stats.json holds plain JSON


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corrupted_input_prepares_or_fails_with_one_clear_error(case, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    paths = write_inputs(case, inputs)
    out = tmp_path / "out"
    try:
        prepare_case(paths, out)
    except DataValidationError as exc:
        assert exc.source == str(paths[case.target]), f"the error names {exc.source!r}, not the corrupted file: {exc}"
        assert "\n" not in str(exc) and len(str(exc)) < 600, f"not one short line: {exc!r}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"], "output left behind after an error"
        return
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "out"], "a temporary directory was left behind"
    check_valid(out)


def test_the_cases_cover_every_corruption_and_both_outcomes(tmp_path):
    """The draw is not degenerate: every corruption is used, and some cases succeed while most fail."""
    used = {c.corruption for c in CASES}
    assert used == set(FRAME) | set(BYTES) | set(VECTOR_FRAME) | set(NPZ)
    assert 40 <= len(CASES) <= 60
    assert {c.formats[0] for c in CASES} == {".csv", ".tsv", ".parquet"}
    assert {c.formats[1] for c in CASES} == {".csv", ".parquet"}


CLI_CASES = ["log", "items", "vectors"]


@pytest.mark.parametrize("target", CLI_CASES)
def test_cli_prints_one_error_line_and_exits_2(target, tmp_path, monkeypatch):
    """The CLI on one error case per file: exit status 2, one ``error:`` line naming the file, no output."""
    case = next(c for c in CASES if c.target == target and c.corruption in ("empty file", "truncated file", "NaN in a vector"))
    monkeypatch.chdir(tmp_path)
    paths = write_inputs(case, Path("."))
    argv = ["prepare", "--interactions", str(paths["log"]), "--items", str(paths["items"]),
            "--vectors", f"img={paths['vectors']}", "--out", "out", "--time-col", "timestamp",
            "--category-cols", "tags", "--min-count", "2", "--cache-dir", "null"]
    stderr = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers, root.level
    root.handlers = [logging.StreamHandler(stderr)]  # log lines go where a terminal would show them
    try:
        with redirect_stderr(stderr):
            status = data_main(argv)
    finally:
        root.handlers = handlers  # the CLI's basicConfig(force=True) wrote to our buffer
        root.setLevel(level)
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
    assert status == 2
    assert len(errors) == 1 and errors[0].startswith(f"error: {paths[target]}: "), stderr.getvalue()
    assert "Traceback" not in stderr.getvalue()
    assert not Path("out").exists() and not list(Path(".").glob(".out*"))


def test_unicode_values_prepare_under_an_ascii_locale(tmp_path):
    """Files written by prepare are UTF-8 whatever the locale (an ASCII one used to fail on unicode tags)."""
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n1,a,1\n1,b,2\n1,c,3\n", encoding="utf-8")
    (tmp_path / "items.csv").write_text("item_id,tags\na,ünï©ødé|🎵\nb,x\nc,y\n", encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(
        [sys.executable, "-m", "recsys.data", "prepare", "--interactions", "log.csv", "--items", "items.csv",
         "--category-cols", "tags", "--min-count", "0", "--cache-dir", "null", "--out", "out"],
        cwd=tmp_path, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    vocabulary = json.loads((tmp_path / "out" / "features" / "bag_tags_vocab.json").read_text(encoding="utf-8"))
    assert vocabulary == ["x", "y", "ünï©ødé", "🎵"]
    assert load_prepared(tmp_path / "out").num_items == 3
