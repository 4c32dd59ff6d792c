"""prepare() refuses, in one line naming the file and the row, column or value, inputs it used to
accept or to report vaguely: an output over an input, times float64 cannot order, vectors float32
cannot hold, rows polars cannot parse, empty or complex npz vectors, infinite or negative weights."""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import polars as pl
import pytest

from recsys.data import DataValidationError, load_prepared, prepare
from recsys.data.__main__ import main
from recsys.data.readers import checked_chunks, scan_table

OPTIONS = dict(user_col="user", item_col="item", time_col="ts", min_count=1, cache_dir=None)
LOG = "user,item,ts\n" + "".join(f"u{u},i{i},{t}\n" for u in range(3) for t, i in enumerate(range(4)))


def snapshot(directory) -> dict:
    """Every file under ``directory`` (links not followed) with its bytes."""
    files = {}
    for root, dirs, names in os.walk(directory):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            files[os.path.relpath(path, directory)] = os.readlink(path) if os.path.islink(path) else open(path, "rb").read()
    return files


def history(out, user) -> list:
    data = load_prepared(out)
    return [data.item_ids[i] for i in data.history(list(data.user_ids).index(user))]


# -- 2: an output that is, or holds, an input -------------------------------------------------------------


def _inputs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "log.csv").write_text(LOG)
    (data / "items.csv").write_text("item,title\n" + "".join(f"i{i},T{i}\n" for i in range(4)))
    np.savez(data / "v.npz", ids=np.array([f"i{i}" for i in range(4)]), vectors=np.ones((4, 2)))
    return data


def _link(tmp_path, target, name="link"):
    os.symlink(target, tmp_path / name)
    return tmp_path / name


OVER_INPUTS = {  # case: (out, interactions, expected "is"/"holds" and option) as functions of tmp_path and the data folder
    "the log's folder": (lambda t, d: d, lambda t, d: d / "log.csv",
                         r"^--out: .*data holds the input file .*data/log\.csv \(given by --interactions\); writing the output there would delete it"),
    "the log itself": (lambda t, d: d / "log.csv", lambda t, d: d / "log.csv", r"^--out: .*log\.csv is the input file given by --interactions;"),
    "the folder above": (lambda t, d: t, lambda t, d: d / "log.csv", r"^--out: .* holds the input file .*log\.csv"),
    "the folder by another spelling": (lambda t, d: d / ".." / "data", lambda t, d: d / "log.csv", r"^--out: .*/\.\./data holds the input file"),
    "a link to the log's folder": (lambda t, d: _link(t, d), lambda t, d: d / "log.csv", r"^--out: .*link holds the input file"),
    "the folder of a link to the log": (lambda t, d: d, lambda t, d: _link(d, t / "elsewhere.csv", "log-link.csv"),
                                        r"^--out: .* holds the input file .*log-link\.csv"),
    "the items file": (lambda t, d: d / "items.csv", lambda t, d: d / "log.csv", r"^--out: .*items\.csv is the input file given by --items;"),
    "the vectors file": (lambda t, d: d / "v.npz", lambda t, d: d / "log.csv", r"^--out: .*v\.npz is the input file given by --vectors img;"),
}


@pytest.mark.parametrize("case", OVER_INPUTS, ids=list(OVER_INPUTS))
def test_output_over_an_input_is_refused_before_anything_changes(tmp_path, case):
    make_out, make_log, message = OVER_INPUTS[case]
    data = _inputs(tmp_path)
    (tmp_path / "elsewhere.csv").write_text(LOG)
    interactions = make_log(tmp_path, data)
    out = make_out(tmp_path, data)
    before = snapshot(tmp_path)
    with pytest.raises(DataValidationError, match=message):
        prepare(interactions, out, items=data / "items.csv", vectors={"img": data / "v.npz"}, overwrite=True, **OPTIONS)
    assert snapshot(tmp_path) == before


def test_cli_refuses_out_over_the_log_in_one_line(tmp_path, capsys):
    data = _inputs(tmp_path)
    before = snapshot(tmp_path)
    args = ["prepare", "--interactions", str(data / "log.csv"), "--out", str(data), "--overwrite", "true", "--user-col", "user",
            "--item-col", "item", "--time-col", "ts", "--min-count", "1", "--cache-dir", "null"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --out: ") and f"holds the input file {data / 'log.csv'}" in err, err
    assert snapshot(tmp_path) == before


def test_output_beside_the_inputs_is_still_written(tmp_path):
    data = _inputs(tmp_path)
    out = prepare(data / "log.csv", data / "prepared", overwrite=True, **OPTIONS)
    assert (out / "stats.json").is_file() and (data / "log.csv").read_text() == LOG


# -- 5: times float64 cannot order ------------------------------------------------------------------------


def test_times_that_merge_as_float64_are_refused(tmp_path):
    """10**25 + 10 - k: distinct times in descending order, all the same float64; they used to tie and
    keep file order (backwards) with exit 0."""
    rows = "".join(f"u,i{k},{10**25 + 10 - k}\n" for k in range(5))
    (tmp_path / "log.csv").write_text("user,item,ts\n" + rows)
    with pytest.raises(DataValidationError, match=r"log\.csv: time column 'ts' has the values '10000000000000000000000010' \(row 1\) "
                                                   r"and '10000000000000000000000009' \(row 2\), which differ but read as the same 64-bit float"):
        prepare(tmp_path / "log.csv", tmp_path / "out", **OPTIONS)
    assert not (tmp_path / "out").exists()


def test_unsigned_times_beyond_int64(tmp_path):
    """UInt64 times above 2**63 - 1 used to fail with a polars error; now they order as floats when
    no two merge, and are refused when two do."""
    far_apart = [2**63 + 2**20 * k for k in (3, 1, 2)]
    pl.DataFrame({"user": [1, 1, 1], "item": [10, 20, 30], "ts": pl.Series(far_apart, dtype=pl.UInt64)}).write_parquet(tmp_path / "a.parquet")
    assert history(prepare(tmp_path / "a.parquet", tmp_path / "a", **OPTIONS), 1) == [20, 30, 10]
    merged = [2**64 - 1, 2**64 - 2, 2**64 - 3]
    pl.DataFrame({"user": [1, 1, 1], "item": [10, 20, 30], "ts": pl.Series(merged, dtype=pl.UInt64)}).write_parquet(tmp_path / "b.parquet")
    with pytest.raises(DataValidationError, match=r"b\.parquet: time column 'ts' has the values 18446744073709551615 \(row 1\) "
                                                   r"and 18446744073709551614 \(row 2\)"):
        prepare(tmp_path / "b.parquet", tmp_path / "b", **OPTIONS)


def test_float_times_spelled_differently_are_not_refused(tmp_path):
    """Guard (passes before and after): "3" and "3.00000000000000000" are one time, not two that merged;
    integers above 2**53 stay exact."""
    (tmp_path / "log.csv").write_text("user,item,ts\nu,a,3.00000000000000000\nu,b,1.5\nu,c,3\nu,d,2\n")
    assert history(prepare(tmp_path / "log.csv", tmp_path / "out", repeats="keep", **OPTIONS), "u") == ["b", "d", "a", "c"]
    big = "".join(f"v,i{k},{2**60 + 3 - k}\n" for k in range(4))
    (tmp_path / "big.csv").write_text("user,item,ts\n" + big)
    assert history(prepare(tmp_path / "big.csv", tmp_path / "big", **OPTIONS), "v") == ["i3", "i2", "i1", "i0"]


# -- 6: vectors float32 cannot hold -----------------------------------------------------------------------


def _vector_file(kind, tmp_path, vectors):
    ids = [f"i{k}" for k in range(len(vectors))]
    if kind == "parquet":
        pl.DataFrame({"item": ids, "v": vectors}).write_parquet(tmp_path / "v.parquet")
        return tmp_path / "v.parquet"
    np.savez(tmp_path / "v.npz", ids=np.array(ids), vectors=np.array(vectors))
    return tmp_path / "v.npz"


@pytest.mark.parametrize("kind", ["parquet", "npz"])
def test_vector_values_beyond_float32_are_refused(tmp_path, kind):
    (tmp_path / "log.csv").write_text(LOG)
    path = _vector_file(kind, tmp_path, [[1.0, 2.0], [3.0, 4.0], [0.5, -1e39]])
    with pytest.raises(DataValidationError, match=rf"v\.{kind}: the vector of id 'i2' \(row 3\) holds -1e\+39, beyond the float32 range"):
        prepare(tmp_path / "log.csv", tmp_path / "out", vectors={"img": path}, **OPTIONS)
    assert not (tmp_path / "out").exists()


def test_vector_values_float32_holds_are_kept(tmp_path):
    """Guard (passes before and after): 3e38 fits float32 and is stored as it is."""
    (tmp_path / "log.csv").write_text(LOG)
    path = _vector_file("parquet", tmp_path, [[1.0, 3e38], [3.0, 4.0]])
    data = load_prepared(prepare(tmp_path / "log.csv", tmp_path / "out", vectors={"img": path}, **OPTIONS))
    assert np.isfinite(data.item_features.dense["img"].numpy()).all()


# -- 11: rows polars cannot parse -------------------------------------------------------------------------

GOOD_ROWS = ["user,item,ts\n", 'u0,"an item, quoted\non two lines",1\n', "\n"] + [f"u{k % 50},i{k % 30},{k}\n" for k in range(3000)]

BAD_ROWS = {  # case: (bad record, expected message after "cannot read the file: ", with {where})
    "more fields": ("u1,i1,5,extra\n", r"4 fields where the header has 3, at {where}"),
    "trailing separator": ("u1,i1,5,\n", r"4 fields where the header has 3, at {where}"),
    "unclosed quote": ('u1,"i1,5\n', r"a quote character at {where} opens a field that is never closed"),
    "quote inside an unquoted field": ('u1,i"1,5\n', r"a quote character at {where} opens a field that is never closed"),
    "text after a closing quote": ('u1,"i1"x,5\n', r"a quote character out of place at {where} \(quotes must enclose a whole field\)"),
    "invalid utf-8": (b"u\xe91,i1,5\n", r"invalid utf-8 sequence at {where}, byte 2 of the line"),
}


def _write_with_bad_row(path, bad, at: int) -> tuple[int, int]:
    """The good rows with ``bad`` put before good data line ``at``; returns (its line, its data row)."""
    lines = [line.encode() for line in GOOD_ROWS]
    lines.insert(at, bad if isinstance(bad, bytes) else bad.encode())
    path.write_bytes(b"".join(lines))
    line = sum(chunk.count(b"\n") for chunk in lines[:at]) + 1
    prefix = path.with_name("prefix.csv")
    prefix.write_bytes(b"".join(lines[:at]))
    row = pl.read_csv(prefix, infer_schema=False).height + 1  # the row polars gives it, as every other message counts
    prefix.unlink()
    return line, row


@pytest.mark.parametrize("at", [500, len(GOOD_ROWS)], ids=["middle", "last"])
@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_unparsable_csv_rows_are_named(tmp_path, case, at):
    bad, expected = BAD_ROWS[case]
    line, row = _write_with_bad_row(tmp_path / "log.csv", bad, at)
    assert line == row + 2  # the header, and the quoted field's second line
    where = rf"line {line} \(data row {row}\)"
    with pytest.raises(DataValidationError, match="^" + re.escape(str(tmp_path / "log.csv")) + r": cannot read the file: "
                       + expected.format(where=where) + "$"):
        prepare(tmp_path / "log.csv", tmp_path / "out", **OPTIONS)
    assert not (tmp_path / "out").exists()


def test_unparsable_tsv_row_is_named(tmp_path):
    """TSV is read with quoting off: a quote is text, a field too many is the fault."""
    rows = "user\titem\tts\n" + "".join(f'u{k % 5}\t"i{k % 7}\t{k}\n' for k in range(200)) + "u1\ti1\t5\textra\n"
    (tmp_path / "log.tsv").write_text(rows)
    with pytest.raises(DataValidationError, match=r"log\.tsv: cannot read the file: 4 fields where the header has 3, at line 202 \(data row 201\)$"):
        prepare(tmp_path / "log.tsv", tmp_path / "out", **OPTIONS)


def test_streamed_input_names_the_row_too(tmp_path):
    """serving.candidates reads logs in chunks through readers.checked_chunks: the same line is named."""
    line, row = _write_with_bad_row(tmp_path / "log.csv", "u1,i1,5,extra\n", 2000)
    chunks = checked_chunks(tmp_path / "log.csv", scan_table(tmp_path / "log.csv"), ["user", "item", "ts"], "the interaction log",
                            ids={}, chunk_rows=700)
    with pytest.raises(DataValidationError, match=rf"cannot read the file: 4 fields where the header has 3, at line {line} \(data row {row}\)$"):
        list(chunks)


# -- 12: empty or complex npz vectors, infinite or negative weights --------------------------------------


def test_npz_vectors_of_width_zero_are_refused(tmp_path):
    (tmp_path / "log.csv").write_text(LOG)
    np.savez(tmp_path / "v.npz", ids=np.array(["i0", "i1"]), vectors=np.ones((2, 0)))
    with pytest.raises(DataValidationError, match=r"v\.npz: 'vectors' has shape \(2, 0\): every vector is empty \(width 0\)$"):
        prepare(tmp_path / "log.csv", tmp_path / "out", vectors={"img": tmp_path / "v.npz"}, **OPTIONS)
    assert not (tmp_path / "out").exists()


def test_complex_npz_vectors_are_refused_without_a_warning(tmp_path):
    (tmp_path / "log.csv").write_text(LOG)
    np.savez(tmp_path / "v.npz", ids=np.array(["i0", "i1"]), vectors=np.ones((2, 2)) * (1 + 2j))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataValidationError, match=r"v\.npz: 'vectors' has dtype complex128; expected real numbers"):
            prepare(tmp_path / "log.csv", tmp_path / "out", vectors={"img": tmp_path / "v.npz"}, **OPTIONS)


@pytest.mark.parametrize("value", ["inf", "-inf", "-5", "-0.5"])
def test_infinite_or_negative_weights_are_refused(tmp_path, value):
    (tmp_path / "log.csv").write_text(f"user,item,ts,w\nu,a,1,1\nu,b,2,{value}\nu,c,3,0\n")
    with pytest.raises(DataValidationError, match=rf"log\.csv: weight column 'w' has the value '{re.escape(value)}' at row 2; "
                                                   r"weights must be finite and 0 or more$"):
        prepare(tmp_path / "log.csv", tmp_path / "out", weight_col="w", **OPTIONS)
    assert not (tmp_path / "out").exists()


def test_infinite_weight_in_parquet_is_refused(tmp_path):
    pl.DataFrame({"user": [1, 1, 1], "item": [1, 2, 3], "ts": [1, 2, 3], "w": [1.0, 2.0, float("inf")]}).write_parquet(tmp_path / "log.parquet")
    with pytest.raises(DataValidationError, match=r"log\.parquet: weight column 'w' has the value inf at row 3"):
        prepare(tmp_path / "log.parquet", tmp_path / "out", weight_col="w", **OPTIONS)


# -- 9: a disk that fills up while prepare writes -----------------------------------------------------------


@pytest.mark.parametrize("error", ["OSError", "polars"])
def test_a_full_disk_is_one_line_and_the_old_output_stays_whole(tmp_path, monkeypatch, capsys, error):
    import errno

    data = _inputs(tmp_path)
    out = tmp_path / "prepared"
    prepare(data / "log.csv", out, **OPTIONS)
    before = snapshot(tmp_path)

    def disk_full(self, *args, **kwargs):
        if error == "OSError":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise pl.exceptions.ComputeError("parquet: File out of specification: underlying IO error: No space left on device (os error 28)")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", disk_full)
    args = ["prepare", "--interactions", str(data / "log.csv"), "--out", str(out), "--overwrite", "true", "--user-col", "user",
            "--item-col", "item", "--time-col", "ts", "--min-count", "1", "--cache-dir", "null"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --out {out}: cannot write there: No space left on device"
    assert snapshot(tmp_path) == before
