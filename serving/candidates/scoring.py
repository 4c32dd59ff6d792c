"""Scoring one part: its input rows become histories, and its users their top-k candidates.

:class:`PartScorer` is the one way a part is scored, by both runners: the local job in its own
process (``job.py``), the Ray job in each model actor (``serving/ray_candidates.py``). A part's rows
are read alone and turned into histories; its users are scored in batches of ``--batch-size``
(users of similar history length together: each batch is encoded over its real positions only,
then searched exactly with blocked matrix products and a streaming top-k,
``recsys/retrieval/exact.py``). Seen items are excluded by default (``--no-exclude-seen`` keeps
them), so a user gets ``k`` rows, or fewer when fewer than ``k`` items are left. A user none of
whose items the catalogue knows gets the **fallback**: the ``k`` most popular items of the
training data, scored by their training counts.
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl

from recsys.data.readers import ROW
from recsys.data.time_order import parse_order_key
from serving.candidates.plan import InputSpec
from serving.sized_model import SizedRecommender

_ORDER = "__order"


class PartScorer:
    """Scores one part at a time: :meth:`score` turns a part's input rows into the candidate rows
    of its users and the part's counts, and writes nothing."""

    def __init__(self, model: SizedRecommender, spec: InputSpec, k: int, batch_size: int, exclude_seen: bool):
        self.model, self.spec, self.k, self.batch_size, self.exclude_seen = model, spec, k, batch_size, exclude_seen
        self.item_ids = pl.Series("item_id", model.item_ids)
        #: wall time spent reading parts into histories
        self.read_seconds = 0.0

    def score(self, rows: pl.LazyFrame, bar=None) -> tuple[pl.DataFrame, dict[str, int]]:
        """The candidates of every user with a row in ``rows`` (one part's input rows), users in
        ascending order, each with their ranks in order; and the part's counts. ``bar`` (a progress
        bar), when given, advances by the users scored."""
        started = time.perf_counter()
        source = rows.collect()
        users = source[self.spec.user_col].unique().sort()
        histories, unknown = self._histories(users, source)
        self.read_seconds += time.perf_counter() - started
        frame = self._candidates(users, histories, bar)
        counts = {
            "users": len(users),
            "fallback_users": sum(1 for h in histories if not h),
            "unknown_items_skipped": unknown,
            "rows": frame.height,
        }
        return frame, counts

    # -- reading one part ---------------------------------------------------------------------

    def _events(self, source: pl.DataFrame) -> pl.DataFrame:
        """(user, item row or null, order keys...) for the part's rows, oldest first per user; item
        ids name rows by the one rule of ``serving/item_ids.py``, as in ``serving.load``."""
        s = self.spec
        if s.history_col:
            events = (
                source.select(s.user_col, s.history_col)
                .filter(pl.col(s.history_col).list.len() > 0)
                .explode(s.history_col)
                .with_row_index(_ORDER)
                .select(s.user_col, pl.col(s.history_col).alias("__item"), _ORDER)
            )
            order = [_ORDER]
        else:
            events = source.select(s.user_col, pl.col(s.item_col).alias("__item"), ROW)
            order = [ROW]
            if s.time_col is not None and source.height:
                events = events.with_columns(parse_order_key(s.path, source, s.time_col).alias(_ORDER))
                order = [_ORDER, ROW]
        events = events.with_columns(self.model.item_lookup.rows(events["__item"]).alias("__item_row"))
        return events.sort([s.user_col, *order])

    def _histories(self, users: pl.Series, source: pl.DataFrame) -> tuple[list[list[int]], int]:
        """Item rows of each user's history (users in the given order) and the unknown-id count."""
        events = self._events(source)
        unknown = int(events["__item_row"].null_count())
        grouped = (
            events.drop_nulls("__item_row")
            .group_by(self.spec.user_col, maintain_order=True)
            .agg(pl.col("__item_row"))
        )
        table = pl.DataFrame({self.spec.user_col: users}).join(
            grouped, on=self.spec.user_col, how="left", maintain_order="left"
        )
        histories = [r if r is not None else [] for r in table["__item_row"].to_list()]
        return histories, unknown

    # -- scoring ------------------------------------------------------------------------------

    def _candidates(self, users: pl.Series, histories: list[list[int]], bar) -> pl.DataFrame:
        """Top-k rows of every user, batched by history length, returned in the users' order.

        Batching users of similar history length matters for speed: a search that excludes seen
        items fetches ``k`` plus the longest history of the batch for every user of the batch, so
        one long history in a batch of short ones slows all of them.
        """
        top = np.full((len(histories), self.k), -1, dtype=np.int64)
        score = np.full((len(histories), self.k), -np.inf, dtype=np.float32)
        by_length = np.argsort(np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories)), kind="stable")
        for start in range(0, len(histories), self.batch_size):
            chosen = by_length[start : start + self.batch_size]
            batch_top, batch_score = self.model.recommend_rows(
                [histories[i] for i in chosen], self.k, exclude_seen=self.exclude_seen
            )
            top[chosen], score[chosen] = batch_top, batch_score
            if bar is not None:
                bar.update(len(chosen))
        valid = top > 0  # -1: fewer than k unseen items were left
        user_index, _ = np.nonzero(valid)
        return pl.DataFrame(
            {
                "user_id": users.gather(user_index).alias("user_id"),
                "rank": pl.Series(valid.cumsum(axis=1)[valid], dtype=pl.Int32),
                "item_id": self.item_ids.gather(top[valid] - 1),
                "score": pl.Series(score[valid], dtype=pl.Float32),
            }
        )
