"""A synthetic interaction log with structure a sequence model can learn, deterministic by seed.

The world: items belong to latent clusters and have Zipf-like popularity. Each item has a dense
"text-like" vector (its cluster's centre plus noise) and ``|``-separated tags drawn mostly from its
cluster's tags, so features tell a model which items are alike. Each warm item has a successor in its
cluster (the clusters' items form cycles). A user prefers a few clusters; every next event is, with
fixed probabilities, the current item's successor (a Markov structure an encoder can pick up), a
popular item of the current item's cluster, or a popular item of one of the user's clusters. Some
catalogue items are never interacted with (cold start): they have features but no events.

Users are generated in chunks of ``chunk_users`` with one random stream per chunk, so a log of tens of
millions of events streams out as polars DataFrames without being held in memory; the log depends on
``(seed, chunk_users)`` and on the other fields, nothing else. :func:`write_synthetic` writes the log
and the item side as files that go through the very same ``prepare`` as user data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from recsys.data.errors import DataValidationError

__all__ = ["SyntheticConfig", "SyntheticCatalogue", "SyntheticFiles", "iter_interaction_chunks", "write_synthetic", "prepared_synthetic"]

log = logging.getLogger(__name__)

#: start of the synthetic clock (2020-01-01, Unix seconds)
EPOCH = 1_577_836_800


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and structure of a synthetic log.

    Args:
        num_users: users in the log.
        num_items: items in the catalogue, cold-start items included.
        num_clusters: latent item clusters.
        mean_history: mean number of events per user (history lengths are ``min_history`` plus a
            geometric tail, so a few users are much more active than most).
        min_history: fewest events per user (5 survives the default 5-core).
        vector_dim: width of the text-like item vector.
        vector_noise: standard deviation of the noise around the cluster centres (centres have unit
            scale per dimension).
        tags_per_cluster: tags owned by each cluster; every item gets 1 to 3 tags.
        tag_noise: probability that a tag is drawn from all tags instead of the item's cluster's.
        clusters_per_user: clusters a user prefers.
        successor_prob: probability that the next event is the current item's successor.
        same_cluster_prob: probability that it is a popular item of the current item's cluster;
            otherwise it is a popular item of one of the user's clusters.
        zipf_exponent: popularity of the item of rank r is proportional to ``r ** -zipf_exponent``.
        cold_fraction: fraction of the catalogue never interacted with.
        seed: the random seed.
        chunk_users: users generated per chunk (per random stream).
    """

    num_users: int = 1000
    num_items: int = 500
    num_clusters: int = 10
    mean_history: float = 30.0
    min_history: int = 5
    vector_dim: int = 32
    vector_noise: float = 0.5
    tags_per_cluster: int = 4
    tag_noise: float = 0.1
    clusters_per_user: int = 2
    successor_prob: float = 0.5
    same_cluster_prob: float = 0.3
    zipf_exponent: float = 1.0
    cold_fraction: float = 0.05
    seed: int = 0
    chunk_users: int = 20_000

    def __post_init__(self) -> None:
        positive = ("num_users", "num_items", "num_clusters", "min_history", "vector_dim", "tags_per_cluster", "clusters_per_user", "chunk_users")
        for name in positive:
            if getattr(self, name) < 1:
                raise DataValidationError(None, f"SyntheticConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.num_clusters > self.num_items:
            raise DataValidationError(None, f"SyntheticConfig.num_clusters ({self.num_clusters}) must not exceed num_items ({self.num_items})")
        if self.clusters_per_user > self.num_clusters:
            raise DataValidationError(None, f"SyntheticConfig.clusters_per_user ({self.clusters_per_user}) must not exceed num_clusters")
        if self.mean_history < self.min_history:
            raise DataValidationError(None, f"SyntheticConfig.mean_history ({self.mean_history}) must be at least min_history ({self.min_history})")
        for name in ("successor_prob", "same_cluster_prob", "cold_fraction", "tag_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataValidationError(None, f"SyntheticConfig.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.successor_prob + self.same_cluster_prob > 1.0:
            raise DataValidationError(None, "SyntheticConfig.successor_prob + same_cluster_prob must not exceed 1")

    @property
    def expected_events(self) -> int:
        return int(round(self.num_users * self.mean_history))


class SyntheticCatalogue:
    """The item side of the world: clusters, popularity, successors, cold items, features.

    Item ``k`` (0-based) has the original id ``k + 1``.
    """

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        rng = np.random.default_rng([config.seed, 0])
        n, c = config.num_items, config.num_clusters
        self.cluster = rng.permutation(np.arange(n) % c)
        self.popularity = (rng.permutation(n) + 1.0) ** -config.zipf_exponent
        self.cold = rng.random(n) < config.cold_fraction
        for k in range(c):  # every cluster keeps at least one warm item
            members = np.flatnonzero(self.cluster == k)
            if self.cold[members].all():
                self.cold[members[0]] = False
        # successors: a random cycle through each cluster's warm items
        self.successor = np.arange(n)
        for k in range(c):
            cycle = rng.permutation(np.flatnonzero((self.cluster == k) & ~self.cold))
            self.successor[cycle] = np.roll(cycle, -1)
        # per-cluster popularity sampling: cumulative weights, cluster k's segment spans [k, k + 1)
        self.by_cluster = np.lexsort((np.arange(n), self.cluster))
        weights = np.where(self.cold, 0.0, self.popularity)[self.by_cluster]
        sorted_clusters = self.cluster[self.by_cluster]
        totals = np.bincount(sorted_clusters, weights=weights, minlength=c)
        within = np.cumsum(weights) - np.repeat(np.cumsum(totals) - totals, np.bincount(sorted_clusters, minlength=c))
        self.cumulative = sorted_clusters + within / totals[sorted_clusters]
        self.segment_end = np.cumsum(np.bincount(sorted_clusters, minlength=c))
        self.segment_start = self.segment_end - np.bincount(sorted_clusters, minlength=c)

    def sample_in_clusters(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per entry of ``clusters``, drawn by popularity among the cluster's warm items."""
        u = 1.0 - rng.random(len(clusters))  # in (0, 1]: never lands on a zero-weight (cold) item
        position = np.searchsorted(self.cumulative, clusters + u, side="left")
        # guard against float rounding at a segment's ends
        position = np.clip(position, self.segment_start[clusters], self.segment_end[clusters] - 1)
        return self.by_cluster[position]

    @cached_property
    def vectors(self) -> np.ndarray:
        """float32 ``(num_items, vector_dim)``: cluster centre plus Gaussian noise."""
        rng = np.random.default_rng([self.config.seed, 1])
        centres = rng.standard_normal((self.config.num_clusters, self.config.vector_dim))
        noise = rng.standard_normal((self.config.num_items, self.config.vector_dim)) * self.config.vector_noise
        return (centres[self.cluster] + noise).astype(np.float32)

    @cached_property
    def tags(self) -> list[str]:
        """``|``-separated tags per item, mostly from the item's cluster's own tags."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 2])
        n, per = cfg.num_items, cfg.tags_per_cluster
        own = self.cluster[:, None] * per + rng.integers(0, per, (n, 3))
        anywhere = rng.integers(0, cfg.num_clusters * per, (n, 3))
        chosen = np.where(rng.random((n, 3)) < cfg.tag_noise, anywhere, own)
        counts = rng.integers(1, 4, n)
        return ["|".join(dict.fromkeys(f"tag{t:03d}" for t in row[:k])) for row, k in zip(chosen.tolist(), counts)]

    def item_table(self) -> pl.DataFrame:
        """``item_id`` (Int64) and ``tags`` for the whole catalogue, cold items included."""
        return pl.DataFrame({"item_id": np.arange(1, self.config.num_items + 1, dtype=np.int64), "tags": self.tags})

    def vector_table(self) -> pl.DataFrame:
        """``item_id`` and ``vector`` (a fixed-size float32 array) for the whole catalogue."""
        vectors = pl.Series("vector", self.vectors).cast(pl.Array(pl.Float32, self.config.vector_dim))
        return pl.DataFrame({"item_id": np.arange(1, self.config.num_items + 1, dtype=np.int64)}).with_columns(vectors)


def iter_interaction_chunks(config: SyntheticConfig, catalogue: SyntheticCatalogue | None = None) -> Iterator[pl.DataFrame]:
    """The log as DataFrames of ``user_id``, ``item_id``, ``timestamp`` (Int64, seconds), per user chunk."""
    catalogue = catalogue or SyntheticCatalogue(config)
    for chunk, first_user in enumerate(range(0, config.num_users, config.chunk_users)):
        num_users = min(config.chunk_users, config.num_users - first_user)
        yield _user_chunk(config, catalogue, chunk, first_user, num_users)


def _user_chunk(config: SyntheticConfig, catalogue: SyntheticCatalogue, chunk: int, first_user: int, num_users: int) -> pl.DataFrame:
    rng = np.random.default_rng([config.seed, 100, chunk])
    tail = config.mean_history - config.min_history
    lengths = config.min_history + (rng.geometric(1.0 / (tail + 1.0), num_users) - 1 if tail > 0 else 0)
    lengths = np.asarray(lengths, dtype=np.int64)
    preferred = np.argsort(rng.random((num_users, config.num_clusters)), axis=1)[:, : config.clusters_per_user]
    # walk the users longest first, so that the users still active at step t are a prefix
    by_length = np.argsort(-lengths, kind="stable")
    lengths, preferred = lengths[by_length], preferred[by_length]
    active_at = np.searchsorted(-lengths, -np.arange(int(lengths.max())), side="right")  # users with length > t

    def preferred_cluster(users: np.ndarray) -> np.ndarray:
        return preferred[users, rng.integers(0, config.clusters_per_user, len(users))]

    sequences = np.zeros((num_users, len(active_at)), dtype=np.int64)
    current = catalogue.sample_in_clusters(preferred_cluster(np.arange(num_users)), rng)
    sequences[:, 0] = current
    for t in range(1, len(active_at)):
        n = active_at[t]
        current = current[:n]
        draw = rng.random(n)
        follow = draw < config.successor_prob
        stay = ~follow & (draw < config.successor_prob + config.same_cluster_prob)
        move = ~follow & ~stay
        clusters = catalogue.cluster[current]
        clusters[move] = preferred_cluster(np.flatnonzero(move))
        current = np.where(follow, catalogue.successor[current], 0)
        current[~follow] = catalogue.sample_in_clusters(clusters[~follow], rng)
        sequences[:n, t] = current

    valid = np.arange(sequences.shape[1])[None, :] < lengths[:, None]
    gaps = rng.integers(60, 86_400, sequences.shape)
    times = EPOCH + rng.integers(0, 365 * 86_400, num_users)[:, None] + np.cumsum(gaps, axis=1)
    user_ids = first_user + 1 + by_length
    frame = pl.DataFrame({
        "user_id": np.broadcast_to(user_ids[:, None], sequences.shape)[valid],
        "item_id": sequences[valid] + 1,
        "timestamp": times[valid],
    })
    return frame.sort("user_id", maintain_order=True)


@dataclass(frozen=True)
class SyntheticFiles:
    """Paths of a written synthetic dataset, and the ``prepare`` arguments that read it."""

    interactions: Path
    items: Path
    vectors: Path

    def prepare_kwargs(self) -> dict:
        return {
            "interactions": self.interactions,
            "items": self.items,
            "user_col": "user_id",
            "item_col": "item_id",
            "time_col": "timestamp",
            "category_cols": ["tags"],
            "vectors": {"text": self.vectors},
        }


def write_synthetic(config: SyntheticConfig, out_dir: str | Path) -> SyntheticFiles:
    """Write ``interactions.parquet``, ``items.parquet`` (id + tags) and ``vectors.parquet``.

    The log is streamed: each user chunk goes to its own parquet part, and polars' streaming engine
    merges the parts into one file, so memory stays at about one chunk whatever the log's size.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    catalogue = SyntheticCatalogue(config)
    files = SyntheticFiles(out_dir / "interactions.parquet", out_dir / "items.parquet", out_dir / "vectors.parquet")
    parts = out_dir / f".parts-{uuid.uuid4().hex[:8]}"
    parts.mkdir()
    try:
        num_chunks = -(-config.num_users // config.chunk_users)
        for k, frame in enumerate(tqdm(iter_interaction_chunks(config, catalogue), total=num_chunks, desc="synthetic log", unit="chunk")):
            frame.write_parquet(parts / f"part-{k:06d}.parquet")
        pl.scan_parquet(parts / "*.parquet").sink_parquet(files.interactions)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    catalogue.item_table().write_parquet(files.items)
    catalogue.vector_table().write_parquet(files.vectors)
    log.info("synthetic log written to %s (%d users, %d catalogue items)", out_dir, config.num_users, config.num_items)
    return files


def prepared_synthetic(config: SyntheticConfig, cache_dir: str | Path) -> Path:
    """The prepared directory of the synthetic log ``config`` under ``cache_dir``, made if missing.

    The directory name is a hash of the config, so a changed config never reads a stale dataset.
    Several processes (DDP ranks) may call this at once: each writes its own temporary files, the
    first finished ``prepare`` wins the rename and the others use its result (same seed, same data).
    """
    from recsys.data.pipeline import FORMAT_VERSION, prepare

    key = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **asdict(config)}, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(cache_dir) / f"synthetic-{key}"
    if (out / "stats.json").is_file():
        return out
    raw = Path(cache_dir) / f".raw-{key}-{uuid.uuid4().hex[:8]}"
    try:
        files = write_synthetic(config, raw)
        prepare(out=out, **files.prepare_kwargs(), cache_dir=None)
    except DataValidationError:
        if not (out / "stats.json").is_file():  # not just another process finishing first
            raise
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    return out
