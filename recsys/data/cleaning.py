"""Cleaning an interaction log: exact duplicates, repeated (user, item) events, k-core, time order.

The input frame has the columns ``user_id``, ``item_id``, ``__time`` (a sortable key), ``__row`` (the
row number in the file), optionally ``weight`` and ``__row_hash`` (a hash of all the file's columns,
so that rows that differ only in a column the pipeline does not use are not duplicates). Every step keeps the rows in a deterministic time
order: by user, then time, ties broken by the original row order in the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from recsys.data.readers import ROW_HASH

__all__ = ["RepeatPolicy", "CleaningCounts", "clean_log", "k_core_mask"]

log = logging.getLogger(__name__)

#: what to do with repeated (user, item) events:
#: ``keep`` every event; ``drop`` all but the user's first event with the item; ``collapse`` runs
#: of consecutive events with the same item into their first event.
RepeatPolicy = Literal["keep", "drop", "collapse"]
REPEAT_POLICIES = ("keep", "drop", "collapse")

TIE_BREAK = "time ascending, ties broken by the row order in the interactions file"


@dataclass
class CleaningCounts:
    """How many rows each cleaning step removed (written to ``stats.json``)."""

    raw_rows: int = 0
    duplicate_rows: int = 0
    repeat_events: int = 0
    kcore_events: int = 0
    kcore_users: int = 0
    kcore_items: int = 0
    kcore_rounds: int = 0


def clean_log(
    log_frame: pl.DataFrame, *, repeats: RepeatPolicy, min_user_events: int, min_item_events: int
) -> tuple[pl.DataFrame, CleaningCounts]:
    """Drop exact duplicates, apply the repeat policy, k-core; return the kept rows in time order.

    The result has ``user_id``, ``item_id`` (original ids), ``weight`` if given, and is sorted by
    (user_id, time, file row).
    """
    counts = CleaningCounts(raw_rows=log_frame.height)
    # identical in every column of the file: the used columns plus a hash of all columns
    exact = [c for c in ("user_id", "item_id", "__time", "weight", ROW_HASH) if c in log_frame.columns]
    frame = log_frame.unique(subset=exact, keep="first", maintain_order=True)
    counts.duplicate_rows = log_frame.height - frame.height

    # dense codes in sorted-id order: cheap to sort and count with, whatever the id type
    frame = frame.with_columns(
        pl.col("user_id").rank("dense").cast(pl.Int64).alias("__u") - 1,
        pl.col("item_id").rank("dense").cast(pl.Int64).alias("__i") - 1,
    ).sort(["__u", "__time", "__row"])

    before = frame.height
    frame = frame.filter(_repeat_filter(repeats, frame["__i"].max() + 1))
    counts.repeat_events = before - frame.height

    users, items = frame["__u"].to_numpy(), frame["__i"].to_numpy()
    keep, counts.kcore_rounds = k_core_mask(users, items, min_user_events, min_item_events)
    counts.kcore_events = int((~keep).sum())
    counts.kcore_users = len(np.unique(users)) - len(np.unique(users[keep]))
    counts.kcore_items = len(np.unique(items)) - len(np.unique(items[keep]))
    frame = frame.filter(pl.Series(keep))
    log.info(
        "cleaning: %d rows -> %d events (duplicates %d, repeats %d, k-core %d events / %d users / %d items in %d rounds)",
        counts.raw_rows, frame.height, counts.duplicate_rows, counts.repeat_events,
        counts.kcore_events, counts.kcore_users, counts.kcore_items, counts.kcore_rounds,
    )
    return frame.select([c for c in ("user_id", "item_id", "weight") if c in frame.columns]), counts


def _repeat_filter(policy: RepeatPolicy, num_item_codes: int) -> pl.Expr:
    """Rows to keep under ``policy``, for a frame sorted by (user, time, row)."""
    if policy == "keep":
        return pl.lit(True)
    if policy == "drop":
        return (pl.col("__u") * num_item_codes + pl.col("__i")).is_first_distinct()
    if policy == "collapse":
        same_user = pl.col("__u") == pl.col("__u").shift(1)
        same_item = pl.col("__i") == pl.col("__i").shift(1)
        return ~(same_user & same_item).fill_null(False)
    raise ValueError(f"unknown repeat policy {policy!r}; expected one of {REPEAT_POLICIES}")


def k_core_mask(users: np.ndarray, items: np.ndarray, min_user_events: int, min_item_events: int) -> tuple[np.ndarray, int]:
    """Events to keep so that every kept user and item has enough kept events (a fixed point).

    Removing a sparse user can push an item below its threshold and the other way round, so the
    filter repeats until nothing changes. ``users`` and ``items`` are dense non-negative codes.
    Returns the mask and the number of rounds that removed something.
    """
    keep = np.ones(len(users), dtype=bool)
    rounds = 0
    while True:
        user_counts = np.bincount(users[keep], minlength=int(users.max(initial=-1)) + 1)
        item_counts = np.bincount(items[keep], minlength=int(items.max(initial=-1)) + 1)
        new_keep = keep & (user_counts[users] >= min_user_events) & (item_counts[items] >= min_item_events)
        if new_keep.sum() == keep.sum():
            return keep, rounds
        keep = new_keep
        rounds += 1
