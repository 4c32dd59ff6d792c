"""The batch candidate job: same answers as ``serving.load(...).recommend``, every user exactly once
(after a kill, across shards), identical reruns, and clear errors that leave no output behind."""

import json
import shutil
import threading

import numpy as np
import polars as pl
import pytest
import torch

import serving
import serving.candidates as candidates
from serving.candidates import plan, store
from recsys.atomic import NotWritable
from recsys.data.errors import DataValidationError
from recsys.item_features import ItemFeatures
from recsys.model import MatryoshkaRecommender
from serving.candidates import CandidatesError, generate_candidates, main, stable_user_hash
from recsys.export import export_sizes
from serving.sized_model import ExportError

N_ITEMS = 40
K = 5


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A size-16 export of an untrained 2-size model over 40 items with string ids."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    features = ItemFeatures(num_items=N_ITEMS, dense={"text": torch.randn(N_ITEMS + 1, 6, generator=g)})
    model = MatryoshkaRecommender(item_features=features, sizes=[8, 16], max_len=10).eval()
    ckpt = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    item_ids = [f"i{i:02d}" for i in range(1, N_ITEMS + 1)]
    popularity = [int(c) for c in torch.randint(1, 100, (N_ITEMS,), generator=g)]
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
         "catalogue": {"item_ids": item_ids, "popularity": popularity}},
        ckpt,
    )
    (d,) = export_sizes(ckpt, [16], tmp_path_factory.mktemp("export"))
    return d


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """An interaction log of 30 users: tied timestamps, unknown ids, one user with only unknown ids."""
    rng = np.random.default_rng(1)
    rows = []
    for user in range(30):
        for _ in range(int(rng.integers(1, 9))):
            item = f"i{int(rng.integers(1, N_ITEMS + 1)):02d}" if rng.random() > 0.1 else f"zz{int(rng.integers(9))}"
            rows.append((user * 7 + 3, item, int(rng.integers(0, 4))))  # few distinct times: many ties
    rows.append((999, "nope-1", 1))
    rows.append((999, "nope-2", 0))
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    path = tmp_path_factory.mktemp("log") / "log.parquet"
    frame.write_parquet(path)
    return path, frame


def _expected_histories(frame: pl.DataFrame) -> dict[int, list[str]]:
    """Each user's items ordered by time, ties by row: the job's documented rule, done by hand."""
    out: dict[int, list[tuple[int, int, str]]] = {}
    for row, (user, item, t) in enumerate(frame.iter_rows()):
        out.setdefault(user, []).append((t, row, item))
    return {u: [item for _, _, item in sorted(events)] for u, events in out.items()}


def _read(out) -> pl.DataFrame:
    return pl.read_parquet(sorted(out.glob("part-*.parquet"))).sort("user_id", "rank")


def test_candidates_equal_recommend_for_every_user(export_dir, log, tmp_path):
    path, frame = log
    manifest = generate_candidates(export_dir, path, tmp_path / "out", K, users_per_part=7, batch_size=4, progress=False)
    got = _read(tmp_path / "out")
    histories = _expected_histories(frame)
    users = sorted(histories)
    assert got.columns == ["user_id", "rank", "item_id", "score"]
    assert got["user_id"].unique().sort().to_list() == users
    ranks = got.group_by("user_id").agg(pl.col("rank")).sort("user_id")["rank"].to_list()
    assert ranks == [list(range(1, K + 1))] * len(users)

    model = serving.load(export_dir)
    want = model.recommend([histories[u] for u in users], k=K, on_unknown="skip")
    for user, recs in zip(users, want):
        mine = got.filter(pl.col("user_id") == user)
        assert mine["item_id"].to_list() == [item for item, _ in recs], user
        np.testing.assert_allclose(mine["score"].to_numpy(), [s for _, s in recs], rtol=1e-5, atol=1e-6)
        assert not set(mine["item_id"]) & set(histories[user])  # seen items excluded

    unknown = sum(not item.startswith("i") for item in frame["item_id"])
    fallback = [u for u in users if not any(item.startswith("i") for item in histories[u])]
    assert 999 in fallback
    assert manifest["counts"] == {
        "users": len(users), "fallback_users": len(fallback), "unknown_items_skipped": unknown,
        "rows": len(users) * K, "parts": 5,
    }
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["counts"] == manifest["counts"] and on_disk["model"]["size"] == 16 and on_disk["k"] == K
    assert [p["file"] for p in on_disk["parts"]] == sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet"))
    assert not list((tmp_path / "out").glob(".staging*"))  # staging removed at the end


def test_history_table_csv_and_parquet_folder_give_the_same_candidates(export_dir, log, tmp_path):
    path, frame = log
    generate_candidates(export_dir, path, tmp_path / "a", K, progress=False)
    csv = tmp_path / "log.csv"
    frame.write_csv(csv)
    generate_candidates(export_dir, csv, tmp_path / "b", K, progress=False)
    histories = _expected_histories(frame)
    table = pl.DataFrame({"user": list(histories), "items": list(histories.values())})
    table.write_parquet(tmp_path / "histories.parquet")
    manifest = generate_candidates(
        export_dir, tmp_path / "histories.parquet", tmp_path / "c", K, user_col="user", history_col="items", progress=False
    )
    folder = tmp_path / "log-parts"  # a directory of parquet files, read in name order
    folder.mkdir()
    frame[:60].write_parquet(folder / "0.parquet")
    frame[60:].write_parquet(folder / "1.parquet")
    generate_candidates(export_dir, folder, tmp_path / "d", K, progress=False)
    a, b, c, d = (_read(tmp_path / name) for name in "abcd")
    assert b["user_id"].dtype == pl.Int64  # CSV ids that are all integers come back as integers
    assert a.equals(b) and a.equals(c) and a.equals(d)
    assert manifest["input"]["kind"] == "histories"


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_integer_ids_of_a_text_log_come_back_as_integers_in_candidate_files(tmp_path, suffix):
    """Issue 32: user ids were integers and item ids text; both columns now have the ids' own type."""
    from csv_exports import INT_ITEMS, INT_USERS, export_of_log, write_log  # tests/ is on the path

    log = write_log(tmp_path / f"log{suffix}")
    directory = export_of_log(log, tmp_path)
    generate_candidates(directory, log, tmp_path / "out", 2, progress=False)
    got = _read(tmp_path / "out")
    assert got.schema["user_id"] == pl.Int64 and got.schema["item_id"] == pl.Int64
    assert got["user_id"].unique().sort().to_list() == INT_USERS and set(got["item_id"]) <= set(INT_ITEMS)
    model = serving.load(directory)
    events = pl.read_csv(log, separator="\t" if suffix == ".tsv" else ",")
    histories = events.group_by("user_id", maintain_order=True).agg("item_id")
    want = [[item for item, _ in recs] for recs in model.recommend(histories["item_id"].to_list(), k=2)]
    assert [got.filter(pl.col("user_id") == u)["item_id"].to_list() for u in histories["user_id"]] == want


def test_killed_job_resumes_with_every_user_exactly_once(export_dir, log, tmp_path, monkeypatch):
    path, frame = log
    real_write = store._write_part
    written = []

    def dies_after_two(frame, counts, target):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        real_write(frame, counts, target)
        written.append(target.name)

    monkeypatch.setattr(store, "_write_part", dies_after_two)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        generate_candidates(export_dir, path, out, K, users_per_part=7, progress=False)
    assert sorted(p.name for p in out.glob("part-*.parquet")) == sorted(written)
    assert not (out / "manifest.json").exists()  # no manifest: visibly unfinished

    monkeypatch.setattr(store, "_write_part", lambda *a: (written.append(a[2].name), real_write(*a)))
    manifest = generate_candidates(export_dir, path, out, K, users_per_part=7, progress=False)
    assert len(written) == 5 and len(set(written)) == 5  # the rerun wrote only the 3 missing parts
    got = _read(out)
    assert got.height == got.unique(["user_id", "rank"]).height  # nobody twice
    assert sorted(got["user_id"].unique()) == sorted(frame["user_id"].unique())
    assert manifest["counts"]["users"] == frame["user_id"].n_unique()

    clean = generate_candidates(export_dir, path, tmp_path / "clean", K, users_per_part=7, progress=False)
    assert got.equals(_read(tmp_path / "clean"))
    assert [p["sha256"] for p in manifest["parts"]] == [p["sha256"] for p in clean["parts"]]  # byte-identical parts


def test_rerun_of_a_finished_job_changes_nothing(export_dir, log, tmp_path, monkeypatch):
    path, _ = log
    out = tmp_path / "out"
    first = generate_candidates(export_dir, path, out, K, users_per_part=10, progress=False)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(store, "_write_part", lambda *a: pytest.fail("a finished job must not write again"))
    again = generate_candidates(export_dir, path, out, K, users_per_part=10, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert again["parts"] == first["parts"]


def test_a_deleted_part_is_regenerated(export_dir, log, tmp_path):
    path, _ = log
    out = tmp_path / "out"
    first = generate_candidates(export_dir, path, out, K, users_per_part=10, progress=False)
    (out / first["parts"][1]["file"]).unlink()
    again = generate_candidates(export_dir, path, out, K, users_per_part=10, progress=False)
    assert again["parts"] == first["parts"]


def test_shards_cover_every_user_exactly_once(export_dir, log, tmp_path):
    path, frame = log
    out = tmp_path / "out"
    counts = [
        generate_candidates(export_dir, path, out, K, shard=f"{i}/3", users_per_part=4, progress=False)["counts"]["users"]
        for i in range(3)
    ]
    assert sorted(p.name for p in out.glob("manifest*.json")) == [f"manifest-0000{i}-of-00003.json" for i in range(3)]
    assert sum(counts) == frame["user_id"].n_unique() and min(counts) > 0
    sharded = _read(out)
    generate_candidates(export_dir, path, tmp_path / "whole", K, progress=False)
    whole = _read(tmp_path / "whole")
    # same candidates; scores agree to float rounding (users are batched differently)
    assert sharded.drop("score").equals(whole.drop("score"))
    np.testing.assert_allclose(sharded["score"].to_numpy(), whole["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(CandidatesError, match="another number of shards"):
        generate_candidates(export_dir, path, out, K, shard="0/2", progress=False)


def test_stable_user_hash_is_crc32_of_the_text_form():
    # fixed values: a shard must name the same users on every machine and library version
    assert stable_user_hash([7, "7", "user-1", 0]).tolist() == [1790921346, 1790921346, 2116437524, 4108050209]
    with pytest.raises(CandidatesError, match="i/n"):
        candidates.parse_shard("3/3")


def test_fewer_candidates_when_few_unseen_items_remain(export_dir, tmp_path):
    seen = [f"i{i:02d}" for i in range(1, N_ITEMS - 1)]  # all but two items
    pl.DataFrame({"user_id": ["u"] * len(seen), "item_id": seen}).write_parquet(tmp_path / "log.parquet")
    generate_candidates(export_dir, tmp_path / "log.parquet", tmp_path / "a", K, time_col=None, progress=False)
    got = _read(tmp_path / "a")
    assert sorted(got["item_id"]) == [f"i{N_ITEMS - 1}", f"i{N_ITEMS}"] and got["rank"].to_list() == [1, 2]
    generate_candidates(
        export_dir, tmp_path / "log.parquet", tmp_path / "b", K, time_col=None, exclude_seen=False, progress=False
    )
    assert _read(tmp_path / "b").height == K


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("missing user column", DataValidationError, r"no column 'user_id' \(given by --user-col\)"),
        ("empty file", DataValidationError, "empty"),
        ("header only", DataValidationError, "no rows"),
        ("null user", DataValidationError, "null id\\) at row 2"),
        ("bad time", DataValidationError, "'yesterday' at row 2"),
        ("duplicate user in history table", DataValidationError, "user 1 has more than one row"),
        ("history not a list", DataValidationError, "must be a list of item ids"),
        ("history of float ids", DataValidationError, r"has type List\(Float64\); it must be a list of item ids"),
        ("history of lists", DataValidationError, r"has type List\(List\(String\)\); it must be a list"),
        ("float item ids", DataValidationError, "item column 'item_id' has type Float64; ids must be integers or strings"),
        ("boolean item ids", DataValidationError, "item column 'item_id' has type Boolean; ids must be integers or strings"),
        ("unknown export dir", ExportError, "no such export directory"),
        ("k above the catalogue", CandidatesError, "k=41 exceeds the catalogue"),
    ],
)
def test_bad_input_is_reported_and_writes_nothing(export_dir, tmp_path, case, error, message):
    model, k, options = export_dir, K, {}
    if case == "missing user column":
        path = _write(tmp_path / "in.csv", "user,item_id,timestamp\n1,i01,5\n")
    elif case == "empty file":
        path = _write(tmp_path / "in.csv", "")
    elif case == "header only":
        path = _write(tmp_path / "in.csv", "user_id,item_id,timestamp\n")
    elif case == "null user":
        path = _write(tmp_path / "in.csv", "user_id,item_id,timestamp\n1,i01,5\n,i02,6\n")
    elif case == "bad time":
        path = _write(tmp_path / "in.csv", "user_id,item_id,timestamp\n1,i01,5\n1,i02,yesterday\n")
    elif case.startswith("duplicate"):
        path = tmp_path / "in.parquet"
        pl.DataFrame({"user_id": [1, 2, 1], "h": [["i01"], ["i02"], ["i03"]]}).write_parquet(path)
        options = {"history_col": "h"}
    elif case.startswith("history"):
        history = {"history not a list": ["i01 i02"], "history of float ids": [[2.0, 2.5]],
                   "history of lists": [[["i01"], ["i02"]]]}[case]
        path = tmp_path / "in.parquet"
        pl.DataFrame({"user_id": [1], "h": history}).write_parquet(path)
        options = {"history_col": "h"}
    elif case.endswith("item ids"):  # ids that are not exactly the catalogue's are never coerced
        item = [2.5, 1.0] if case.startswith("float") else [True, False]
        path = tmp_path / "in.parquet"
        pl.DataFrame({"user_id": [1, 1], "item_id": item, "timestamp": [5, 6]}).write_parquet(path)
    else:
        path = _write(tmp_path / "in.csv", "user_id,item_id,timestamp\n1,i01,5\n")
        if case == "unknown export dir":
            model = tmp_path / "no-such-export"
        else:
            k = N_ITEMS + 1
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        generate_candidates(model, path, out, k, progress=False, **options)
    assert not out.exists()


def test_output_dir_of_another_job_or_other_files_is_refused(export_dir, log, tmp_path):
    path, _ = log
    out = tmp_path / "out"
    generate_candidates(export_dir, path, out, K, progress=False)
    with pytest.raises(CandidatesError, match=r"different job \(k: 5 there, 6 now\)"):
        generate_candidates(export_dir, path, out, K + 1, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CandidatesError, match="notes.txt"):
        generate_candidates(export_dir, path, other, K, progress=False)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_cli_prints_a_summary_and_reports_errors(export_dir, log, tmp_path, capsys):
    path, frame = log
    args = ["--model", str(export_dir), "--input", str(path), "--k", "3", "--out", str(tmp_path / "out")]
    assert main([*args, "--shard", "0/1", "--users-per-shard", "8", "--no-exclude-seen"]) == 0
    assert f"{frame['user_id'].n_unique()} users" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["exclude_seen"] is False and manifest["users_per_part"] == 8 and manifest["k"] == 3
    assert main([*args[:-1], str(tmp_path / "bad"), "--user-col", "who"]) == 2
    assert "no column 'who'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_module_runs_with_a_progress_bar_and_an_info_summary(export_dir, log, tmp_path):
    """``python -m serving.candidates`` end to end: a users/s progress bar and INFO logging
    (torchrec's import installs a WARNING root handler; the module must override it)."""
    import subprocess
    import sys
    from pathlib import Path

    path, frame = log
    done = subprocess.run(
        [sys.executable, "-m", "serving.candidates", "--model", str(export_dir), "--input", str(path),
         "--k", "3", "--out", str(tmp_path / "out")],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "users/s" in done.stderr and "INFO serving.candidates: candidates:" in done.stderr
    assert done.stdout.startswith(f"{frame['user_id'].n_unique()} users")


# -- the input is read by recsys/data/readers.py, as prepare reads its log ---------------------------------


@pytest.mark.parametrize(
    "case, message",
    [
        ("directory without parquet files", r"in: directory holds no \.parquet files$"),
        ("repeated header line", r"in\.csv: row 2 repeats the header line \(user_id, item_id, timestamp\)"),
        ("blank user id", r"in\.csv: user column 'user_id' has an empty id ' ' at row 2$"),
        ("null item id", r"in\.csv: item column 'item_id' is empty \(null id\) at row 2$"),
        ("null item in a history", r"in\.parquet: history column 'h' holds a null item id at row 2$"),
        ("float user ids", r"in\.parquet: user column 'user_id' has type Float64; ids must be integers or strings$"),
        ("header only history table", r"in\.parquet: the history table has no rows$"),
        ("interleaved repeated users", r"in\.parquet: user 1 has more than one row in the history table \(rows 1 and 5\)"),
    ],
)
def test_bad_input_messages_come_from_the_shared_readers(export_dir, tmp_path, case, message):
    options = {}
    if case.startswith("directory"):
        path = tmp_path / "in"
        path.mkdir()
        (path / "notes.txt").write_text("not parquet")
    elif case == "repeated header line":
        path = _write(tmp_path / "in.csv", "user_id,item_id,timestamp\n1,i01,5\nuser_id,item_id,timestamp\n1,i02,6\n")
    elif case == "blank user id":
        path = _write(tmp_path / "in.csv", "user_id,item_id,timestamp\n1,i01,5\n ,i02,6\n")
    elif case == "null item id":
        path = _write(tmp_path / "in.csv", "user_id,item_id,timestamp\n1,i01,5\n1,,6\n")
    elif case == "float user ids":
        path = tmp_path / "in.parquet"
        pl.DataFrame({"user_id": [1.0], "item_id": ["i01"], "timestamp": [1]}).write_parquet(path)
    else:
        path = tmp_path / "in.parquet"
        options = {"history_col": "h"}
        users, lists = {
            "null item in a history": ([1, 2], [["i01"], ["i02", None]]),
            "header only history table": ([], []),
            "interleaved repeated users": ([1, 2, 3, 2, 1], [["i01"]] * 5),
        }[case]
        pl.DataFrame({"user_id": users, "h": lists}, schema={"user_id": pl.Int64, "h": pl.List(pl.String)}).write_parquet(path)
    out = tmp_path / "out"
    with pytest.raises(DataValidationError, match=message):
        generate_candidates(export_dir, path, out, K, progress=False, **options)
    assert not out.exists()


def test_rows_are_counted_over_the_whole_input_when_streamed_in_chunks(export_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "_CHUNK_ROWS", 2)
    rows = ["1,i01,5", "1,i02,6", "2,i03,7", "2,i04,8", "3,i05,soon"]
    path = _write(tmp_path / "in.csv", "user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataValidationError, match=r"'soon' at row 5, which is neither a number nor a date/time$"):
        generate_candidates(export_dir, path, tmp_path / "out", K, progress=False)
    path = _write(tmp_path / "in.csv", "user_id,item_id,timestamp\n" + "\n".join([*rows[:4], ",i05,9"]) + "\n")
    with pytest.raises(DataValidationError, match=r"user column 'user_id' is empty \(null id\) at row 5$"):
        generate_candidates(export_dir, path, tmp_path / "out", K, progress=False)


def test_prepare_and_candidates_report_a_bad_log_with_the_same_message(export_dir, tmp_path):
    from recsys.data import prepare

    bad_logs = {
        "empty file": "",
        "header only": "user_id,item_id,timestamp\n",
        "missing column": "user,item_id,timestamp\nu1,i01,1\n",
        "null user": "user_id,item_id,timestamp\nu1,i01,1\n,i02,2\n",
        "bad time": "user_id,item_id,timestamp\nu1,i01,1\nu1,i02,later\n",
        "repeated header": "user_id,item_id,timestamp\nu1,i01,1\nuser_id,item_id,timestamp\n",
    }
    for case, content in bad_logs.items():
        path = _write(tmp_path / "log.csv", content)
        with pytest.raises(DataValidationError) as from_prepare:
            prepare(path, tmp_path / "prepared", min_count=1, cache_dir=None)
        with pytest.raises(DataValidationError) as from_candidates:
            generate_candidates(export_dir, path, tmp_path / "out", K, progress=False)
        assert str(from_candidates.value) == str(from_prepare.value), case


def test_parts_are_written_by_the_writer_thread_and_a_failed_write_stops_the_job(export_dir, log, tmp_path, monkeypatch):
    """Writing overlaps computing (one writer thread), with the same guarantees: a failed write
    stops the job with its error and no manifest; the rerun gives the parts of a clean run, byte for byte."""
    path, frame = log
    real_write = store._write_part
    threads = []

    def fails_third(frame, counts, target):
        threads.append(threading.current_thread().name)
        if len(threads) == 3:
            raise OSError("disk full (simulated)")
        real_write(frame, counts, target)

    monkeypatch.setattr(store, "_write_part", fails_third)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        generate_candidates(export_dir, path, out, K, users_per_part=7, progress=False)
    assert threads and all(name.startswith("candidates-writer") for name in threads)
    assert not (out / "manifest.json").exists() and len(list(out.glob("part-*.parquet"))) < 5
    monkeypatch.setattr(store, "_write_part", real_write)
    stages = {}
    manifest = generate_candidates(export_dir, path, out, K, users_per_part=7, progress=False, stage_seconds=stages)
    clean = generate_candidates(export_dir, path, tmp_path / "clean", K, users_per_part=7, progress=False)
    assert [p["sha256"] for p in manifest["parts"]] == [p["sha256"] for p in clean["parts"]]
    assert set(stages) == {"read", "write"} and all(v >= 0 for v in stages.values())


# -- one run at a time, reruns that trust only whole files, and places that cannot be written ----------


def test_a_second_run_into_the_same_out_refuses_at_once_and_the_first_finishes(export_dir, log, tmp_path, monkeypatch):
    """Two runs of the same shard into one ``--out``: while the first is writing its parts, the
    second refuses with one line, before reading its input (here a bad one), and writes nothing; the
    first then ends exactly as a lone run would."""
    path, _ = log
    out = tmp_path / "out"
    real_write, writing, go_on = store._write_part, threading.Event(), threading.Event()

    def slow_write(frame, counts, target):
        writing.set()
        go_on.wait(60)
        real_write(frame, counts, target)

    monkeypatch.setattr(store, "_write_part", slow_write)
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(generate_candidates(export_dir, path, out, K, users_per_part=7, progress=False)))
    thread.start()
    try:
        assert writing.wait(60)
        before = sorted(p.name for p in out.iterdir())
        bad_input = _write(tmp_path / "bad.csv", "user_id,item_id,timestamp\n1,i01,soon\n")
        with pytest.raises(CandidatesError, match=r"another run is writing there \(it holds \.lock-00000-of-00001\)"):
            generate_candidates(export_dir, bad_input, out, K, users_per_part=7, progress=False)
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        go_on.set()
        thread.join(120)
    clean = generate_candidates(export_dir, path, tmp_path / "clean", K, users_per_part=7, progress=False)
    assert [p["sha256"] for p in first["parts"]] == [p["sha256"] for p in clean["parts"]]


@pytest.mark.skipif(store.fcntl is None, reason="the lock needs fcntl.flock")
def test_the_lock_of_a_killed_run_is_never_stale(export_dir, log, tmp_path):
    """Another process holds the lock (a run in progress), is then SIGKILLed: the system releases
    its lock, and the next run goes ahead without anyone deleting anything."""
    import signal
    import subprocess
    import sys

    path, _ = log
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'ab'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(600)", str(out / ".lock-00000-of-00001")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CandidatesError, match="another run is writing there"):
            generate_candidates(export_dir, path, out, K, progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(60)
    manifest = generate_candidates(export_dir, path, out, K, progress=False)
    assert manifest["counts"]["users"] == log[1]["user_id"].n_unique()


def _killed_after_two_parts(export_dir, path, out, monkeypatch) -> None:
    real_write, written = store._write_part, []

    def dies_after_two(frame, counts, target):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        real_write(frame, counts, target)
        written.append(target.name)

    monkeypatch.setattr(store, "_write_part", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate_candidates(export_dir, path, out, K, users_per_part=7, progress=False)
    monkeypatch.setattr(store, "_write_part", real_write)
    assert (out / ".staging-00000").is_dir() and len(list(out.glob("part-*.parquet"))) == 2


@pytest.mark.parametrize("left", ["half-deleted staging", "staging of another job", "unreadable part", "unreadable manifest"])
def test_a_rerun_never_trusts_an_unfinished_file(export_dir, log, tmp_path, monkeypatch, left):
    """What a killed or disturbed run can leave: a staging directory whose removal was cut short
    (its record goes first), a staging directory split for another input (the job file deleted by
    hand), a part file that is not whole, a manifest that is not JSON. The rerun discards them and
    gives the files of a clean run, byte for byte."""
    path, frame = log
    out = tmp_path / "out"
    clean = generate_candidates(export_dir, path, tmp_path / "clean", K, users_per_part=7, progress=False)
    if left == "unreadable manifest":
        generate_candidates(export_dir, path, out, K, users_per_part=7, progress=False)
        (out / "manifest.json").write_text('{"parts": [')
    else:
        _killed_after_two_parts(export_dir, path, out, monkeypatch)
    if left == "half-deleted staging":
        (out / ".staging-00000.json").unlink(missing_ok=True)  # removed first, when ours
        shutil.rmtree(sorted((out / ".staging-00000").iterdir())[-1])
    elif left == "staging of another job":
        other = tmp_path / "other.parquet"
        frame.with_columns(pl.col("timestamp").reverse()).write_parquet(other)  # same users, other histories
        (out / ".job-00000-of-00001.json").unlink()
        for part in out.glob("part-*.parquet"):
            part.unlink()
        path = other
        clean = generate_candidates(export_dir, other, tmp_path / "clean-other", K, users_per_part=7, progress=False)
    elif left == "unreadable part":
        part = sorted(out.glob("part-*.parquet"))[0]
        part.write_bytes(part.read_bytes()[:50])
    manifest = generate_candidates(export_dir, path, out, K, users_per_part=7, progress=False)
    assert [p["sha256"] for p in manifest["parts"]] == [p["sha256"] for p in clean["parts"]]
    assert not list(out.glob(".staging*"))


def test_out_that_cannot_be_written_is_reported_before_the_input_is_read(export_dir, tmp_path):
    """``--out`` a file, or inside one: one line about ``--out``, though the input is bad too (it is
    read only after the check)."""
    bad_input = _write(tmp_path / "in.csv", "user_id,item_id,timestamp\n1,i01,soon\n")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotWritable, match=r"^--out .*afile is a file, not a directory$"):
        generate_candidates(export_dir, bad_input, tmp_path / "afile", K, progress=False)
    with pytest.raises(NotWritable, match=r"^--out .*afile/sub: .*afile is a file, not a directory$"):
        generate_candidates(export_dir, bad_input, tmp_path / "afile" / "sub", K, progress=False)


@pytest.fixture()
def read_only_dir(tmp_path):
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        (directory / "probe").write_text("")
    except PermissionError:
        yield directory
    else:
        pytest.skip("this user writes into read-only directories (root): run as another user")
    finally:
        directory.chmod(0o755)


def test_a_read_only_out_is_reported_before_the_input_is_read(export_dir, tmp_path, read_only_dir):
    bad_input = _write(tmp_path / "in.csv", "user_id,item_id,timestamp\n1,i01,soon\n")
    for out in (read_only_dir, read_only_dir / "cands"):
        with pytest.raises(NotWritable, match=r"^--out .*read-only.*: cannot write in .*read-only \(Permission denied\)$"):
            generate_candidates(export_dir, bad_input, out, K, progress=False)
    assert list(read_only_dir.iterdir()) == []


@pytest.mark.parametrize("error", ["OSError", "polars"])
def test_a_full_disk_is_one_line_and_the_rerun_resumes(export_dir, log, tmp_path, monkeypatch, capsys, error):
    """The disk fills up at the third part (an OSError, or polars' error naming one): exit status 2,
    one line; once there is room, the rerun writes the rest."""
    import errno

    path, _ = log
    out = tmp_path / "out"
    real_write, calls = store._write_part, []

    def fills_up(frame, counts, target):
        calls.append(target)
        if len(calls) == 3:
            if error == "OSError":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise pl.exceptions.ComputeError("parquet: underlying IO error: No space left on device (os error 28)")
        real_write(frame, counts, target)

    monkeypatch.setattr(store, "_write_part", fills_up)
    args = ["--model", str(export_dir), "--input", str(path), "--k", str(K), "--out", str(out), "--users-per-part", "7"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: --out {out}: cannot write there: No space left on device"
    assert "Traceback" not in err
    monkeypatch.setattr(store, "_write_part", real_write)
    assert main(args) == 0
    assert _read(out)["user_id"].n_unique() == log[1]["user_id"].n_unique()


def test_the_command_catches_user_errors_only(export_dir, log, tmp_path, monkeypatch):
    """A ValueError of our own (a defect) keeps its traceback; it is not shown as a user's error."""
    path, _ = log

    def defect(*args, **kwargs):
        raise ValueError("a defect in the job")

    monkeypatch.setattr(plan, "_assign", defect)
    with pytest.raises(ValueError, match="a defect in the job"):
        main(["--model", str(export_dir), "--input", str(path), "--k", str(K), "--out", str(tmp_path / "out")])


def test_a_device_that_is_not_there_is_one_line(export_dir, log, tmp_path):
    path, _ = log
    with pytest.raises(CandidatesError, match=r"^--device must be auto, cpu or cuda\[:N\], got 'tpu'$"):
        generate_candidates(export_dir, path, tmp_path / "out", K, device="tpu", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(CandidatesError, match=r"^--device cuda: no CUDA GPU is usable here \(use auto or cpu\)$"):
            generate_candidates(export_dir, path, tmp_path / "out", K, device="cuda", progress=False)
    assert not (tmp_path / "out").exists()
