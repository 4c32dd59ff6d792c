"""The pipeline on the real datasets in ../shared/datasets (skipped when they are absent)."""

from __future__ import annotations

import csv
import json

import numpy as np
import polars as pl
import pytest

from recsys.data import SequenceDataModule, load_prepared, prepare


@pytest.fixture(scope="module")
def ml1m(ml1m_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml1m") / "prepared"
    return prepare(ml1m_dir / "interactions.parquet", out, items=ml1m_dir / "items.csv", time_col="seq",
                   category_cols=["genres"], min_count=5, cache_dir=None)


def test_movielens_counts_after_5_core(ml1m, ml1m_dir):
    stats = json.loads((ml1m / "stats.json").read_text())
    assert (stats["users"], stats["interacted_items"], stats["interactions"]) == (6040, 3416, 999_611)
    assert (stats["items"], stats["cold_items"]) == (3883, 467)
    data = load_prepared(ml1m)
    raw_log = pl.read_parquet(ml1m_dir / "interactions.parquet")
    never_rated = set(pl.read_csv(ml1m_dir / "items.csv")["item_id"].to_list()) - set(raw_log["item_id"].to_list())
    assert len(never_rated) == 467
    cold_rows = data.item_index(sorted(never_rated))
    assert (data.train_counts[cold_rows] == 0).all() and not data.item_features.in_training[cold_rows].any()
    assert data.item_features.bag_vocab_sizes == {"genres": 18}
    # histories follow seq
    first_user = raw_log.filter(pl.col("user_id") == 1).sort("seq")["item_id"].to_list()
    assert list(data.item_ids[data.history(int(data.user_index([1])[0]))]) == first_user



def test_movielens_without_cold_items_ranks_the_published_catalogue(ml1m_dir, tmp_path):
    """cold_items=False: the catalogue is the 3,416 interacted items (as in published results),
    and the item table still gives them their features."""
    out = prepare(ml1m_dir / "interactions.parquet", tmp_path / "warm", items=ml1m_dir / "items.csv", time_col="seq",
                  category_cols=["genres"], min_count=5, cache_dir=None, cold_items=False)
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["items"], stats["cold_items"], stats["interactions"]) == (3416, 0, 999_611)
    data = load_prepared(out)
    assert data.num_items == 3416
    lengths = data.item_features.bags["genres"].offsets.diff()
    assert (lengths[1:] > 0).all()  # every movie has its genres from the item table

def read_lastfm_rows(path) -> list[tuple]:
    """(user, item, plays, timestamp, row) per line, with plain Python: the reference reader. The ids
    are integers (all spelled as integers, so prepare reads them as such: issue 32)."""
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [(int(u), int(i), p, int(t), row) for row, (u, i, p, t) in enumerate(reader)]


def reference_histories(rows, policy: str) -> dict:
    """The documented cleaning done naively: exact duplicates, time order with file-order ties,
    the repeat policy, users with fewer than 3 events dropped (no k-core)."""
    seen_rows, by_user = set(), {}
    for u, i, p, t, row in rows:
        if (u, i, p, t) not in seen_rows:
            seen_rows.add((u, i, p, t))
            by_user.setdefault(u, []).append((t, row, i))
    result = {}
    for user, events in by_user.items():
        items = [i for _, _, i in sorted(events)]
        if policy == "drop":
            items = list(dict.fromkeys(items))
        elif policy == "collapse":
            items = [x for k, x in enumerate(items) if k == 0 or items[k - 1] != x]
        if len(items) >= 3:
            result[user] = items
    return result


@pytest.mark.parametrize("policy", ["keep", "drop", "collapse"])
def test_lastfm_repeat_policies_match_a_naive_reference(lastfm_dir, tmp_path, policy):
    out = prepare(lastfm_dir / "interactions.tsv", tmp_path / policy, items=lastfm_dir / "items.tsv",
                  repeats=policy, min_count=0, cache_dir=None)
    data = load_prepared(out)
    got = {data.user_ids[u]: list(data.item_ids[data.history(u)]) for u in range(1, data.num_users + 1)}
    expected = reference_histories(read_lastfm_rows(lastfm_dir / "interactions.tsv"), policy)
    assert got == expected
    pairs = [(u, i) for u, items in got.items() for i in items]
    consecutive = sum(a == b for items in got.values() for a, b in zip(items, items[1:]))
    if policy == "drop":
        assert len(set(pairs)) == len(pairs)
    elif policy == "collapse":
        assert consecutive == 0 and len(set(pairs)) < len(pairs)  # later, non-consecutive repeats stay
    else:
        assert consecutive > 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["items"] == 2975 and stats["raw"]["rows"] == 64_286


def test_lastfm_names_with_quotes_are_read_verbatim(lastfm_dir, tmp_path):
    out = prepare(lastfm_dir / "interactions.tsv", tmp_path / "out", items=lastfm_dir / "items.tsv",
                  category_cols=["name"], category_sep="\x1f", min_count=5, cache_dir=None)
    vocabulary = json.loads((out / "features" / "bag_name_vocab.json").read_text())
    assert '"""Royce da 5\'9"""""""' in vocabulary


def test_lastfm_training_batches_hold_no_validation_or_test_item(lastfm_dir, tmp_path, check_train_batches):
    out = prepare(lastfm_dir / "interactions.tsv", tmp_path / "keep", repeats="keep", min_count=5, cache_dir=None)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["history_length"]["min"] >= 5
    dm = SequenceDataModule(data_dir=str(out), max_len=20, batch_size=256)
    check_train_batches(dm)
    # the held-out targets are the last two events of every user
    val, test = next(iter(dm.val_dataloader())), next(iter(dm.test_dataloader()))
    for row, user in enumerate(val["user"].tolist()):
        history = dm.dataset.history(user)
        assert (val["target"][row], test["target"][row]) == (history[-2], history[-1])
    counts = np.bincount(dm.dataset.seq_items, minlength=dm.num_items + 1)[1:]
    assert counts[counts > 0].min() >= 5
