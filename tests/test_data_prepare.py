"""prepare(): layout, cleaning policies, k-core, vocabularies, features, overwrite and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest

from recsys.data import DataValidationError, load_prepared, prepare
from recsys.data.__main__ import main
from recsys.data.cleaning import k_core_mask


def write_log(path, rows: list[tuple], columns=("user", "item", "ts")):
    pl.DataFrame([list(r) for r in rows], schema=list(columns), orient="row").write_csv(path)
    return path


def histories(directory) -> dict:
    """original user id -> list of original item ids, in time order."""
    data = load_prepared(directory)
    return {data.user_ids[u]: [data.item_ids[i] for i in data.history(u)] for u in range(1, data.num_users + 1)}


def prep(tmp_path, log, name="out", **kwargs):
    kwargs = {"user_col": "user", "item_col": "item", "time_col": "ts", "min_count": 0, "cache_dir": None, **kwargs}
    return prepare(log, tmp_path / name, **kwargs)


# -- layout -------------------------------------------------------------------------------------------


def test_layout_dtypes_and_split(synthetic_prepared):
    d = synthetic_prepared
    inter = pl.read_parquet(d / "interactions.parquet")
    users = pl.read_parquet(d / "users.parquet")
    items = pl.read_parquet(d / "items.parquet")
    stats = json.loads((d / "stats.json").read_text())
    assert inter.schema["user"] == pl.Int32 and inter.schema["item"] == pl.Int32 and inter.schema["pos"] == pl.Int32
    assert users["user"].to_list() == list(range(1, users.height + 1))
    assert items["item"].to_list() == list(range(1, items.height + 1))
    assert users["user_id"].is_sorted() and items["item_id"].is_sorted()
    assert inter.equals(inter.sort(["user", "pos"]))
    lengths = inter.group_by("user").len().sort("user")["len"].to_numpy()
    expected_pos = np.concatenate([np.arange(n) for n in lengths])
    np.testing.assert_array_equal(inter["pos"].to_numpy(), expected_pos)
    assert lengths.min() >= 5  # default 5-core
    # train_count counts the events before each user's last two
    is_train = inter.with_columns(pl.len().over("user").alias("n")).filter(pl.col("pos") < pl.col("n") - 2)
    counts = np.bincount(is_train["item"].to_numpy(), minlength=items.height + 1)[1:]
    np.testing.assert_array_equal(items["train_count"].to_numpy(), counts)
    data = load_prepared(d)
    np.testing.assert_array_equal(data.item_features.in_training.numpy()[1:], counts > 0)
    assert not data.item_features.in_training[0]
    assert stats["users"] == users.height == data.num_users
    assert stats["items"] == items.height == data.num_items
    assert stats["interactions"] == inter.height == len(data.seq_items)
    assert stats["interacted_items"] + stats["cold_items"] == stats["items"]
    assert stats["format_version"] == 1 and stats["options"]["repeats"] == "drop"
    assert len(stats["sources"]["interactions"]["sha256"]) == 64
    assert stats["history_length"]["min"] == lengths.min() and stats["history_length"]["max"] == lengths.max()


def test_seq_offsets_match_interactions(synthetic_prepared):
    data = load_prepared(synthetic_prepared)
    inter = pl.read_parquet(synthetic_prepared / "interactions.parquet")
    assert data.seq_offsets.shape == (data.num_users + 2,) and data.seq_offsets[0] == data.seq_offsets[1] == 0
    for u in (1, 7, data.num_users):
        expected = inter.filter(pl.col("user") == u).sort("pos")["item"].to_numpy()
        np.testing.assert_array_equal(data.history(u), expected)


# -- cleaning -----------------------------------------------------------------------------------------


REPEAT_LOG = [  # user, item, time; u1's events are out of order in the file on purpose
    ("u1", "a", 1), ("u1", "b", 2), ("u1", "b", 3), ("u1", "c", 5), ("u1", "a", 4), ("u1", "b", 6),
    ("u2", "a", 1), ("u2", "c", 2), ("u2", "c", 3), ("u2", "c", 4), ("u2", "b", 5),
]


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("keep", {"u1": ["a", "b", "b", "a", "c", "b"], "u2": ["a", "c", "c", "c", "b"]}),
        ("drop", {"u1": ["a", "b", "c"], "u2": ["a", "c", "b"]}),
        ("collapse", {"u1": ["a", "b", "a", "c", "b"], "u2": ["a", "c", "b"]}),
    ],
)
def test_repeat_policies(tmp_path, policy, expected):
    out = prep(tmp_path, write_log(tmp_path / "log.csv", REPEAT_LOG), repeats=policy)
    assert histories(out) == expected
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped"]["repeat_events"] == len(REPEAT_LOG) - sum(map(len, expected.values()))


def test_exact_duplicate_rows_dropped_and_ties_follow_file_order(tmp_path):
    rows = [("u", "x", 1), ("u", "y", 1), ("u", "x", 1), ("u", "z", 1), ("u", "w", 0)]
    out = prep(tmp_path, write_log(tmp_path / "log.csv", rows), repeats="keep")
    assert histories(out) == {"u": ["w", "x", "y", "z"]}
    assert json.loads((out / "stats.json").read_text())["dropped"]["duplicate_rows"] == 1


def test_rows_differing_in_an_unused_column_are_not_duplicates(tmp_path):
    rows = [("u", "x", 1, 5), ("u", "x", 1, 7), ("u", "x", 1, 5), ("u", "y", 2, 1), ("u", "z", 3, 1)]
    log = write_log(tmp_path / "log.csv", rows, columns=("user", "item", "ts", "plays"))
    out = prep(tmp_path, log, repeats="keep")
    assert histories(out) == {"u": ["x", "x", "y", "z"]}
    assert json.loads((out / "stats.json").read_text())["dropped"]["duplicate_rows"] == 1


def test_row_order_when_no_time_column(tmp_path):
    out = prep(tmp_path, write_log(tmp_path / "log.csv", [("u", "c", 9), ("u", "a", 1), ("u", "b", 5)]), time_col=None)
    assert histories(out) == {"u": ["c", "a", "b"]}


def test_datetime_strings_order_events(tmp_path):
    rows = [("u", "late", "2021-03-01 10:00:00"), ("u", "early", "2021-01-01 09:00:00"), ("u", "mid", "2021-02-01 00:00:00")]
    out = prep(tmp_path, write_log(tmp_path / "log.csv", rows))
    assert histories(out) == {"u": ["early", "mid", "late"]}


def naive_k_core(users, items, k_user, k_item):
    """A plain-Python k-core, the reference for the vectorised one."""
    alive = set(range(len(users)))
    while True:
        uc, ic = {}, {}
        for e in alive:
            uc[users[e]] = uc.get(users[e], 0) + 1
            ic[items[e]] = ic.get(items[e], 0) + 1
        keep = {e for e in alive if uc[users[e]] >= k_user and ic[items[e]] >= k_item}
        if keep == alive:
            return np.array([e in alive for e in range(len(users))])
        alive = keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k_core_equals_naive_and_is_a_fixed_point(seed):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 60, 900)
    items = (rng.zipf(1.6, 900) - 1) % 80
    mask, rounds = k_core_mask(users, items, 6, 4)
    np.testing.assert_array_equal(mask, naive_k_core(users.tolist(), items.tolist(), 6, 4))
    assert rounds >= 1 and 0 < mask.sum() < len(users)
    again, more_rounds = k_core_mask(users[mask], items[mask], 6, 4)
    assert again.all() and more_rounds == 0


def test_prepared_log_is_a_k_core_fixed_point(synthetic_files, tmp_path):
    out = prepare(out=tmp_path / "k10", **synthetic_files.prepare_kwargs(), min_count=10, cache_dir=None)
    data = load_prepared(out)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped"]["kcore_events"] > 0
    assert data.history_lengths[1:].min() >= 10
    item_counts = np.bincount(data.seq_items, minlength=data.num_items + 1)[1:]
    assert item_counts[item_counts > 0].min() >= 10
    # preparing the output again removes nothing more
    log = pl.DataFrame({"user": np.repeat(data.user_ids[1:].astype(np.int64), data.history_lengths[1:]),
                        "item": data.item_ids[data.seq_items].astype(np.int64),
                        "ts": np.arange(len(data.seq_items))})
    log.write_parquet(tmp_path / "again.parquet")
    again = prep(tmp_path, tmp_path / "again.parquet", name="again", min_count=10)
    assert json.loads((again / "stats.json").read_text())["dropped"]["kcore_events"] == 0
    assert histories(again) == histories(out)


def test_min_history_of_three_is_enforced(tmp_path):
    rows = [("short", "a", 1), ("short", "b", 2), ("long", "a", 1), ("long", "b", 2), ("long", "c", 3)]
    out = prep(tmp_path, write_log(tmp_path / "log.csv", rows))
    assert histories(out) == {"long": ["a", "b", "c"]}


# -- vocabularies and ids -----------------------------------------------------------------------------


def test_string_ids_round_trip(tmp_path):
    rows = [(u, i, t) for u in ("007", "7", "x y") for t, i in enumerate(["0070", "007", "7", "a\"b"])]
    out = prep(tmp_path, write_log(tmp_path / "log.csv", rows))
    data = load_prepared(out)
    assert sorted(data.user_ids[1:]) == ["007", "7", "x y"]
    assert list(data.item_ids[1:]) == sorted(["0070", "007", "7", "a\"b"])
    assert data.item_ids[0] is None and data.user_ids[0] is None
    assert histories(out)["007"] == ["0070", "007", "7", "a\"b"]
    query = ["7", "007", "0070"]
    np.testing.assert_array_equal(data.item_ids[data.item_index(query)], query)
    assert pl.read_parquet(out / "items.parquet").schema["item_id"] == pl.String
    with pytest.raises(KeyError, match="'70'"):
        data.item_index(["7", "70"])
    np.testing.assert_array_equal(data.item_index(["7", "70"], unknown="zero"), [data.item_index(["7"])[0], 0])


def test_integer_log_and_csv_item_table_match_as_integers(tmp_path):
    log = pl.DataFrame({"user": [1, 1, 1], "item": [10, 20, 30], "ts": [1, 2, 3]}, schema={"user": pl.Int32, "item": pl.Int32, "ts": pl.Int64})
    log.write_parquet(tmp_path / "log.parquet")
    pl.DataFrame({"item": ["10", "20", "30", "40"], "name": ["a", "b", "c", "d"]}).write_csv(tmp_path / "items.csv")
    out = prep(tmp_path, tmp_path / "log.parquet", items=tmp_path / "items.csv")
    data = load_prepared(out)
    assert list(data.item_ids[1:]) == [10, 20, 30, 40]
    assert pl.read_parquet(out / "users.parquet").schema["user_id"] == pl.Int32
    np.testing.assert_array_equal(data.item_index(np.array([40, 10])), [4, 1])
    np.testing.assert_array_equal(data.item_index(["40"]), [4])  # strings compare by spelling


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_integer_ids_of_a_text_log_stay_integers(tmp_path, suffix):
    """Issue 32: CSV and TSV carry no types; ids that are all spelled as integers are integers, in the
    ascending numeric order (not "10" < "2"), as they would be from a parquet log."""
    rows = [(u, i, t) for u in (3, 20, 100) for t, i in enumerate([2, 10, 33, -4])]
    text = "\n".join(("\t" if suffix == ".tsv" else ",").join(map(str, r)) for r in [("user", "item", "ts"), *rows]) + "\n"
    (tmp_path / f"log{suffix}").write_text(text)
    out = prep(tmp_path, tmp_path / f"log{suffix}")
    data = load_prepared(out)
    assert list(data.item_ids[1:]) == [-4, 2, 10, 33] and all(type(i) is int for i in data.item_ids[1:])
    assert list(data.user_ids[1:]) == [3, 20, 100] and all(type(u) is int for u in data.user_ids[1:])
    assert histories(out)[20] == [2, 10, 33, -4]
    assert pl.read_parquet(out / "items.parquet").schema["item_id"] == pl.Int64
    assert pl.read_parquet(out / "users.parquet").schema["user_id"] == pl.Int64
    assert json.loads((out / "stats.json").read_text())["id_dtypes"] == {"user_id": "Int64", "item_id": "Int64"}
    np.testing.assert_array_equal(data.item_index([10, 33]), [3, 4])
    np.testing.assert_array_equal(data.item_index(["10"]), [3])  # the spelling still names the item
    # the same log as parquet, typed by its writer, gives the same ids
    pl.DataFrame(rows, schema=["user", "item", "ts"], orient="row").write_parquet(tmp_path / "log.parquet")
    typed = load_prepared(prep(tmp_path, tmp_path / "log.parquet", name="typed"))
    assert list(typed.item_ids[1:]) == list(data.item_ids[1:]) and list(typed.user_ids[1:]) == list(data.user_ids[1:])


def test_text_item_table_and_log_of_integer_spellings_make_integer_ids(tmp_path):
    write_log(tmp_path / "log.csv", [(1, 10, 1), (1, 20, 2), (1, 30, 3)])
    pl.DataFrame({"item": ["10", "20", "30", "400"], "name": ["a", "b", "c", "d"]}).write_csv(tmp_path / "items.csv")
    data = load_prepared(prep(tmp_path, tmp_path / "log.csv", items=tmp_path / "items.csv"))
    assert list(data.item_ids[1:]) == [10, 20, 30, 400]  # the cold item of the table too


@pytest.mark.parametrize("case", ["a spelling that is not an integer's", "an id that is not a number",
                                  "a parquet item table of text", "vectors with text ids"])
def test_text_ids_stay_text_when_one_id_or_a_typed_file_says_so(tmp_path, case):
    """One id like "007" (not "7") keeps every item id text, spelled as in the file; so does a typed
    file (parquet, vectors) whose ids are text: the user's own type wins over the spelling."""
    write_log(tmp_path / "log.csv", [(1, 7, 1), (1, 8, 2), (1, 9, 3)])
    kwargs = {}
    if case == "a spelling that is not an integer's":
        pl.DataFrame({"item": ["007", "8", "9"]}).write_csv(tmp_path / "items.csv")
        kwargs["items"], expected = tmp_path / "items.csv", ["007", "7", "8", "9"]
    elif case == "an id that is not a number":
        pl.DataFrame({"item": ["7", "8", "9", "x"]}).write_csv(tmp_path / "items.csv")
        kwargs["items"], expected = tmp_path / "items.csv", ["7", "8", "9", "x"]
    elif case == "a parquet item table of text":
        pl.DataFrame({"item": ["7", "8", "9"]}).write_parquet(tmp_path / "items.parquet")
        kwargs["items"], expected = tmp_path / "items.parquet", ["7", "8", "9"]
    else:
        pl.DataFrame({"item_id": ["7", "8", "9"], "vector": [[1.0, 0.0]] * 3}).write_parquet(tmp_path / "vectors.parquet")
        kwargs["vectors"], expected = {"v": tmp_path / "vectors.parquet"}, ["7", "8", "9"]
    data = load_prepared(prep(tmp_path, tmp_path / "log.csv", **kwargs))
    assert list(data.item_ids[1:]) == expected
    assert list(data.user_ids[1:]) == [1]  # user ids come from the log alone: integers


# -- the warning about what cleaning dropped (issue 32) -------------------------------------------------


def _dropping_log(tmp_path):
    """User a repeats item x (1 repeat event); user b has 2 events, fewer than the 3 every user needs."""
    rows = [("a", "x", 1), ("a", "y", 2), ("a", "x", 3), ("a", "z", 4), ("b", "x", 1), ("b", "w", 2)]
    return write_log(tmp_path / "log.csv", rows)


def test_prepare_warns_what_cleaning_dropped_by_which_step_and_option(tmp_path, caplog):
    log = _dropping_log(tmp_path)
    with caplog.at_level("WARNING", logger="recsys.data.pipeline"):
        prep(tmp_path, log)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(
        "prepare kept 3 of the log's 6 rows as events (50%), 1 of its 2 users and 3 of its 4 items; dropped: ")
    assert "1 repeated (user, item) event by --repeats drop (--repeats keep keeps them all" in warning
    assert ("2 events, 1 user and 1 item by the k-core filter (--min-count 0: every user needs 3 events "
            "(the least for train, validation and test) and every item 1") in warning
    assert "\n" not in warning

    caplog.clear()
    with caplog.at_level("WARNING", logger="recsys.data.pipeline"):
        prep(tmp_path, log, name="keep", repeats="keep")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "repeated" not in warning and "by the k-core filter (--min-count 0" in warning

    caplog.clear()
    with caplog.at_level("WARNING", logger="recsys.data.pipeline"):  # nothing dropped: no warning
        prep(tmp_path, write_log(tmp_path / "whole.csv", [("a", "x", 1), ("a", "y", 2), ("a", "z", 3)]), name="whole")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_the_dropped_warning_names_every_step():
    from recsys.data.pipeline import dropped_warning

    stats = {
        "raw": {"rows": 64286, "users": 1362, "items": 9000}, "interactions": 15674, "users": 769, "interacted_items": 4000,
        "dropped": {"duplicate_rows": 12, "repeat_events": 40000, "kcore_events": 8000, "kcore_users": 590, "kcore_items": 5000},
        "min_user_events": 5, "options": {"repeats": "collapse", "min_count": 5},
        "cold_start": {"fraction": 0.1, "items": 400, "events_removed": 600, "users_dropped": 3},
    }
    warning = dropped_warning(stats)
    assert warning.startswith(
        "prepare kept 15,674 of the log's 64,286 rows as events (24%), 769 of its 1,362 users and 4,000 of its 9,000 items")
    assert "12 exact duplicate rows" in warning
    assert "40,000 repeated (user, item) events by --repeats collapse (--repeats keep keeps them)" in warning
    assert ("8,000 events, 590 users and 5,000 items by the k-core filter (--min-count 5: every user needs 5 events "
            "and every item 5, counted again") in warning
    assert "a lower --min-count keeps more" in warning
    assert "600 events and 3 users by --cold-start-fraction 0.1" in warning
    assert dropped_warning({**stats, "interactions": 64286}) is None


def test_the_command_prints_the_dropped_warning(tmp_path, capsys):
    log = _dropping_log(tmp_path)
    args = ["prepare", "--interactions", str(log), "--out", str(tmp_path / "cli"), "--user-col", "user", "--item-col", "item",
            "--time-col", "ts", "--min-count", "0", "--cache-dir", "null"]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(lines) == 1 and "WARNING recsys.data.pipeline: prepare kept 3 of the log's 6 rows as events" in lines[0]
    assert "--repeats drop" in lines[0] and "--min-count 0" in lines[0]


def test_zero_padded_item_table_ids_compare_as_strings(tmp_path):
    log = pl.DataFrame({"user": [1, 1, 1], "item": [7, 8, 9], "ts": [1, 2, 3]})
    log.write_parquet(tmp_path / "log.parquet")
    pl.DataFrame({"item": ["007", "8", "9"]}).write_csv(tmp_path / "items.csv")
    out = prep(tmp_path, tmp_path / "log.parquet", items=tmp_path / "items.csv")
    data = load_prepared(out)
    assert list(data.item_ids[1:]) == ["007", "7", "8", "9"]  # "007" is not item 7
    stats = json.loads((out / "stats.json").read_text())
    assert stats["cold_items"] == 1 and stats["items_missing_from_item_table"] == 1


# -- item features ------------------------------------------------------------------------------------


def test_item_table_cold_items_bags_and_vectors(tmp_path):
    rows = [(u, i, t) for u in ("u1", "u2") for t, i in enumerate(["a", "b", "c"])]
    log = write_log(tmp_path / "log.csv", rows)
    pl.DataFrame({"item": ["a", "b", "c", "cold"], "genres": ["x|y", "y", None, " z | x |x"]}).write_csv(tmp_path / "items.csv")
    np.savez(tmp_path / "img.npz", ids=np.array(["c", "a", "unknown"]), vectors=np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    pl.DataFrame({"id": ["cold"], "v": [[0.5, 0.25, 1.0]]}).write_parquet(tmp_path / "other.parquet")
    out = prep(tmp_path, log, items=tmp_path / "items.csv", category_cols=["genres"],
               vectors={"image": tmp_path / "img.npz", "other": tmp_path / "other.parquet"})
    data = load_prepared(out)
    f = data.item_features
    assert list(data.item_ids[1:]) == ["a", "b", "c", "cold"]
    np.testing.assert_array_equal(f.in_training.numpy(), [False, True, False, False, False])  # train part = first event
    np.testing.assert_array_equal(data.train_counts, [0, 2, 0, 0, 0])
    vocab = json.loads((out / "features" / "bag_genres_vocab.json").read_text())
    assert vocab == ["x", "y", "z"]
    bag = f.bags["genres"]
    per_item = [[vocab[v] for v in bag.values[bag.offsets[r]:bag.offsets[r + 1]].tolist()] for r in range(5)]
    assert per_item == [[], ["x", "y"], ["y"], [], ["z", "x"]]
    np.testing.assert_array_equal(f.dense["image"].numpy(), [[0, 0], [3, 4], [0, 0], [1, 2], [0, 0]])
    np.testing.assert_array_equal(f.dense_mask["image"].numpy(), [False, True, False, True, False])
    np.testing.assert_array_equal(f.dense["other"].numpy()[4], [0.5, 0.25, 1.0])
    np.testing.assert_array_equal(f.dense_mask["other"].numpy(), [False, False, False, False, True])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["cold_items"] == 1 and stats["features"]["dense"]["image"]["ids_not_in_catalogue"] == 1


# -- output directory and CLI -------------------------------------------------------------------------


def test_cold_start_items_appear_only_as_test_targets(synthetic_files, tmp_path):
    """--cold-start-fraction: a tenth of the items leave training entirely, are kept in the
    catalogue and marked, and remain only as users' last (test) events; the draw is seeded."""
    files = synthetic_files
    common = dict(items=files.items, time_col="timestamp", category_cols=["tags"], cache_dir=None)
    plain = load_prepared(prepare(files.interactions, tmp_path / "plain", **common))
    out = prepare(files.interactions, tmp_path / "cold", cold_start_fraction=0.1, cold_start_seed=3, **common)
    data = load_prepared(out)
    stats = json.loads((out / "stats.json").read_text())["cold_start"]
    cold = data.cold_start_items
    assert len(cold) == stats["items"] == round(0.1 * plain.stats["interacted_items"])
    assert set(data.item_ids[cold]) <= set(plain.item_ids[1:])  # the same catalogue, a tenth of it marked
    assert data.num_items == plain.num_items
    targets = data.test_targets
    for u in range(1, data.num_users + 1):
        history = data.history(u)
        assert not data.cold_start[history[:-1]].any(), u  # never in a training part or a validation target
        assert len(history) >= 3
    assert stats["test_users"] == int(data.cold_start[targets[1:]].sum()) > 0
    assert data.train_counts[cold].sum() == 0
    assert stats["events_removed"] > 0
    assert pl.read_parquet(out / "items.parquet")["cold_start"].sum() == len(cold)
    again = load_prepared(prepare(files.interactions, tmp_path / "again", cold_start_fraction=0.1, cold_start_seed=3, **common))
    np.testing.assert_array_equal(again.cold_start_items, cold)
    assert not plain.cold_start.any() and len(plain.cold_start) == plain.num_items + 1


@pytest.mark.parametrize("fraction", [-0.1, 1.0, True, "0.1"])
def test_cold_start_fraction_must_be_in_zero_one(tmp_path, fraction):
    log = write_log(tmp_path / "log.csv", [("u", "a", 1), ("u", "b", 2), ("u", "c", 3)])
    with pytest.raises(DataValidationError, match="--cold-start-fraction"):
        prep(tmp_path, log, cold_start_fraction=fraction)


def test_existing_output_needs_overwrite(tmp_path):
    log = write_log(tmp_path / "log.csv", [("u", i, t) for t, i in enumerate("abc")])
    out = prep(tmp_path, log)
    (out / "marker").write_text("old")
    with pytest.raises(DataValidationError, match="already exists"):
        prep(tmp_path, log)
    assert (out / "marker").exists()
    prep(tmp_path, log, overwrite=True)
    assert not (out / "marker").exists() and (out / "stats.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "out"]


def test_cli_prepares_and_reports_errors_in_one_line(tmp_path, capsys):
    log = write_log(tmp_path / "log.csv", [("u", i, t) for t, i in enumerate("abc")])
    args = ["prepare", "--interactions", str(log), "--out", str(tmp_path / "cli"), "--user-col", "user", "--item-col", "item",
            "--time-col", "ts", "--min-count", "1", "--repeats", "collapse", "--cache-dir", "null"]
    assert main(args) == 0
    assert json.loads((tmp_path / "cli" / "stats.json").read_text())["options"]["repeats"] == "collapse"
    capsys.readouterr()
    assert main(args[:-6] + ["--out", str(tmp_path / "cli2"), "--time-col", "when"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "log.csv" in err and "'when'" in err and "Traceback" not in err
    assert not (tmp_path / "cli2").exists()


def test_load_prepared_rejects_other_directories(tmp_path, synthetic_prepared):
    with pytest.raises(DataValidationError, match="not a prepared dataset: interactions.parquet is missing"):
        load_prepared(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_prepared, copy)
    stats = json.loads((copy / "stats.json").read_text())
    (copy / "stats.json").write_text(json.dumps({**stats, "format_version": 99}))
    with pytest.raises(DataValidationError, match="format version 99"):
        load_prepared(copy)
