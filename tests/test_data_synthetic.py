"""The synthetic log: deterministic by seed, streamable in chunks, with the structure it promises."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.data.synthetic import SyntheticCatalogue, SyntheticConfig, iter_interaction_chunks, write_synthetic

CONFIG = SyntheticConfig(num_users=900, num_items=300, num_clusters=6, mean_history=25, vector_dim=16, chunk_users=250, seed=11)


def full_log(config: SyntheticConfig) -> pl.DataFrame:
    return pl.concat(list(iter_interaction_chunks(config)))


def test_same_seed_same_log_and_features():
    a, b = SyntheticCatalogue(CONFIG), SyntheticCatalogue(CONFIG)
    assert full_log(CONFIG).equals(full_log(CONFIG))
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert a.tags == b.tags


def test_another_seed_another_log():
    other = SyntheticConfig(**{**CONFIG.__dict__, "seed": 12})
    assert not full_log(CONFIG).equals(full_log(other))
    assert not np.array_equal(SyntheticCatalogue(CONFIG).vectors, SyntheticCatalogue(other).vectors)


def test_streams_in_chunks_covering_every_user():
    chunks = list(iter_interaction_chunks(CONFIG))
    assert len(chunks) == 4  # 900 users, 250 per chunk
    log = pl.concat(chunks)
    assert log.schema == pl.Schema({"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64})
    assert log["user_id"].unique().sort().to_list() == list(range(1, 901))
    lengths = log.group_by("user_id").len()["len"]
    assert lengths.min() >= CONFIG.min_history
    assert abs(lengths.mean() - CONFIG.mean_history) < 0.1 * CONFIG.mean_history
    assert log.select((pl.col("timestamp").diff().over("user_id") > 0).fill_null(True).all()).item()


def test_cold_items_are_in_the_catalogue_but_never_interacted():
    catalogue = SyntheticCatalogue(CONFIG)
    items = set(full_log(CONFIG)["item_id"].to_list())
    cold = set((np.flatnonzero(catalogue.cold) + 1).tolist())
    assert cold and not (items & cold)
    assert catalogue.item_table()["item_id"].to_list() == list(range(1, CONFIG.num_items + 1))
    assert catalogue.vector_table()["vector"].dtype == pl.Array(pl.Float32, CONFIG.vector_dim)


def test_transitions_follow_the_promised_structure():
    catalogue = SyntheticCatalogue(CONFIG)
    log = full_log(CONFIG)
    users, items = log["user_id"].to_numpy(), log["item_id"].to_numpy() - 1
    same_user = users[1:] == users[:-1]
    previous, following = items[:-1][same_user], items[1:][same_user]
    successor_rate = (catalogue.successor[previous] == following).mean()
    assert abs(successor_rate - CONFIG.successor_prob) < 0.05
    same_cluster = (catalogue.cluster[previous] == catalogue.cluster[following]).mean()
    assert same_cluster > CONFIG.successor_prob + CONFIG.same_cluster_prob
    # popularity is skewed: the top 10% of items take far more than 10% of the events
    counts = np.sort(np.bincount(items, minlength=CONFIG.num_items))[::-1]
    assert counts[: CONFIG.num_items // 10].sum() > 0.3 * counts.sum()


def test_features_are_correlated_with_clusters():
    catalogue = SyntheticCatalogue(CONFIG)
    v = catalogue.vectors / np.linalg.norm(catalogue.vectors, axis=1, keepdims=True)
    cosine = v @ v.T
    same = catalogue.cluster[:, None] == catalogue.cluster[None, :]
    np.fill_diagonal(same, False)
    different = catalogue.cluster[:, None] != catalogue.cluster[None, :]
    assert cosine[same].mean() > cosine[different].mean() + 0.3
    tag_cluster = [[int(t[3:]) // CONFIG.tags_per_cluster for t in tags.split("|")] for tags in catalogue.tags]
    own = np.mean([c == catalogue.cluster[k] for k, clusters in enumerate(tag_cluster) for c in clusters])
    assert own > 0.8


def test_written_files_hold_the_streamed_log(tmp_path):
    files = write_synthetic(CONFIG, tmp_path)
    assert pl.read_parquet(files.interactions).equals(full_log(CONFIG))
    assert pl.read_parquet(files.items).equals(SyntheticCatalogue(CONFIG).item_table())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interactions.parquet", "items.parquet", "vectors.parquet"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_users", 0, "num_users must be at least 1"),
        ("num_clusters", 1000, "num_clusters"),
        ("mean_history", 2.0, "mean_history"),
        ("successor_prob", 0.8, "must not exceed 1"),
        ("cold_fraction", 1.5, "cold_fraction must lie in"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**{field: value})
