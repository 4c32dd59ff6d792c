"""The preparation pipeline, ``prepare``: an interaction log and an item table in, a prepared-dataset directory out.

Steps, in order: check that the output is not, and does not hold, an input file; check the options
and every input file's columns (before any heavy work); read the
log and the item table; type the ids of CSV and TSV files (integers when every id is spelled as
one) and match the id types of all files; clean the log (exact duplicates, repeat policy,
iterated k-core, time order); build the user and item vocabularies (0 = padding); mark each user's
training part (leave-one-out: the last event is test, the one before validation); build the item
features; write everything into a temporary directory next to the output and put it in place at
the end (``recsys.atomic``), so that an error or a kill never leaves a partial output behind and an
overwritten output stays whole until the new one replaces it; last, when cleaning dropped events,
warn in one line how many, by which step and option (:func:`dropped_warning`).
``data/README.md`` documents the layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from recsys.atomic import TargetExists, atomic_directory, check_writable, reported_write_failures
from recsys.data.cleaning import REPEAT_POLICIES, TIE_BREAK, CleanLog, RepeatPolicy, clean_log
from recsys.data.errors import DataValidationError
from recsys.data.features import build_item_features
from recsys.data.readers import (
    ROW,
    ROW_HASH,
    check_columns,
    check_id_column,
    integer_spellings,
    is_text_table,
    read_columns,
    scan_table,
    unify_id_dtype,
)
from recsys.data.text_encoding import PACKAGED_TEXT_MODEL
from recsys.data.time_order import parse_order_key, parse_weight
from recsys.data.vectors import read_item_vectors

__all__ = ["FORMAT_VERSION", "MIN_HISTORY", "dropped_warning", "prepare"]

log = logging.getLogger(__name__)

#: version of the prepared-dataset layout, stored in stats.json
FORMAT_VERSION = 1
#: a user needs a training event, a validation event and a test event
MIN_HISTORY = 3
FEATURE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def prepare(
    interactions: str | Path,
    out: str | Path,
    *,
    items: str | Path | None = None,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    weight_col: str | None = None,
    items_id_col: str | None = None,
    text_cols: list[str] | None = None,
    text_model: str | None = None,
    category_cols: list[str] | None = None,
    category_sep: str = "|",
    vectors: dict[str, str | Path] | None = None,
    cold_items: bool = True,
    min_count: int = 5,
    repeats: RepeatPolicy = "drop",
    cold_start_fraction: float = 0.0,
    cold_start_seed: int = 0,
    cache_dir: str | Path | None = "data/.cache",
    overwrite: bool = False,
) -> Path:
    """Prepare a dataset directory from an interaction log (and optionally an item table).

    Args:
        interactions: the interaction log (``.csv``, ``.tsv`` or ``.parquet``).
        out: the directory to write; it must not exist unless ``overwrite``.
        items: the item table (same formats); its items stay in the catalogue even without
            interactions (cold start). Without it the catalogue is the interacted items.
        user_col, item_col: the log's id columns (integers or strings).
        time_col: a timestamp, a date/datetime, or an integer order such as ``seq``; None = the
            row order of the file.
        weight_col: an optional numeric column kept as ``weight``.
        items_id_col: the item table's id column (default: ``item_col``).
        text_cols: item-table columns joined (", ") into one text per item and encoded with
            ``text_model`` into the dense feature ``text``.
        text_model: a sentence-transformers name or local path; None = the packaged all-MiniLM-L6-v2.
        category_cols: multi-valued item-table columns (``category_sep``-separated) made into bags.
        vectors: feature name -> file of precomputed item vectors (parquet or npz).
        cold_items: keep the item table's items that have no interactions in the catalogue (they are
            ranked as candidates); False = the catalogue is the interacted items, as in published
            benchmarks, with the item table used only for features.
        min_count: k-core threshold for users and items, applied until nothing changes; users also
            need at least 3 events (train, validation, test).
        repeats: ``drop`` (default) keeps a user's first event with an item, ``collapse`` merges
            consecutive repeats, ``keep`` keeps all.
        cold_start_fraction: the cold-start protocol: this fraction of the interacted items (drawn
            with ``cold_start_seed``) is kept out of training entirely. Their events are removed
            from every history except where one is a user's last event, the test target; users
            left with fewer than 3 events are dropped. They stay in the catalogue, marked
            ``cold_start`` in ``items.parquet``, so the test ranks them among all items and the
            training never sees them, as candidates or targets. 0 = off.
        cache_dir: where text vectors are cached (None = no cache).
        overwrite: replace an existing ``out``.

    Returns:
        The output directory.
    """
    out = Path(out)
    interactions = Path(interactions)
    items = None if items is None else Path(items)
    items_id_col = items_id_col or item_col
    text_cols, category_cols = list(text_cols or []), list(category_cols or [])
    vector_files = {name: Path(p) for name, p in (vectors or {}).items()}
    _refuse_output_over_inputs(out, _input_files(interactions, items, vector_files))
    check_writable(out, "--out")  # a read-only place is one line before the long work, not after it
    _check_options(out, items, user_col, item_col, text_cols, category_cols, category_sep, vector_files, min_count, repeats, overwrite)
    if isinstance(cold_start_fraction, bool) or not isinstance(cold_start_fraction, (int, float)) or not 0 <= cold_start_fraction < 1:
        raise DataValidationError("--cold-start-fraction", f"must be a number in [0, 1), got {cold_start_fraction!r}")
    # a misnamed column fails here, before anything big is read
    check_columns(interactions, scan_table(interactions), _log_columns(user_col, item_col, time_col, weight_col), "the interaction log")
    if items is not None:
        check_columns(items, scan_table(items), _item_table_columns(items_id_col, text_cols, category_cols), "the item table")

    # a step-level progress bar: reading and cleaning a log of 10M+ events takes a while
    with tqdm(total=5, desc=f"preparing {out.name}", unit="step", leave=False,
              bar_format="{desc}: {n}/{total} steps{postfix} [{elapsed}]") as progress:
        progress.set_postfix_str("reading")
        log_frame = _read_log(interactions, user_col, item_col, time_col, weight_col)
        item_table = None if items is None else _read_item_table(items, items_id_col, text_cols, category_cols)
        item_vectors = {name: read_item_vectors(p, [items_id_col, item_col, "item_id", "id"]) for name, p in vector_files.items()}

        log_frame, item_table = _integer_ids_of_text_files(interactions, log_frame, items, item_table, bool(item_vectors))
        item_id_dtype = unify_id_dtype(
            [log_frame["item_id"]]
            + ([] if item_table is None else [item_table["item_id"]])
            + [v.ids for v in item_vectors.values()]
        )
        log_frame = log_frame.with_columns(_cast_ids(log_frame["item_id"], item_id_dtype))
        if item_table is not None:
            item_table = item_table.with_columns(_cast_ids(item_table["item_id"], item_id_dtype))
        for v in item_vectors.values():
            v.ids = _cast_ids(v.ids, item_id_dtype)

        progress.update()
        progress.set_postfix_str("cleaning")
        min_user_events = max(min_count, MIN_HISTORY)
        cleaned = clean_log(log_frame, repeats=repeats, min_user_events=min_user_events, min_item_events=max(min_count, 1))
        counts = cleaned.counts
        raw = {"rows": counts.raw_rows, "users": len(cleaned.user_vocab), "items": len(cleaned.item_vocab)}
        del log_frame
        if len(cleaned.users) == 0:
            raise DataValidationError(
                interactions, f"no events left after cleaning: no user has {min_user_events} events with items of {min_count}+ events"
            )

        cold_start = None
        if cold_start_fraction > 0:
            cleaned, cold_start = _hold_out_cold_start_items(cleaned, cold_start_fraction, cold_start_seed, min_user_events)
            if len(cleaned.users) == 0:
                raise DataValidationError("--cold-start-fraction", f"{cold_start_fraction} leaves no user with {MIN_HISTORY} events")

        progress.update()
        progress.set_postfix_str("vocabularies and split")
        indexed = _index_events(
            cleaned,
            item_table["item_id"] if item_table is not None and cold_items else None,
            keep_codes=None if cold_start is None else cold_start["codes"],
        )
        user_ids, catalogue_ids = indexed.user_ids, indexed.catalogue_ids
        history_lengths, train_counts, event_counts = indexed.history_lengths, indexed.train_counts, indexed.event_counts
        users = pl.DataFrame({"user": np.arange(1, len(user_ids) + 1, dtype=np.int32), "user_id": user_ids})
        catalogue = pl.DataFrame({"item": np.arange(1, len(catalogue_ids) + 1, dtype=np.int32), "item_id": catalogue_ids})
        interactions_out = indexed.events
        cold_start_mask = indexed.cold_start
        items_out = catalogue.with_columns(
            pl.Series("train_count", train_counts[1:].astype(np.int64)),
            pl.Series("cold_start", cold_start_mask[1:]),
        )
        del cleaned, indexed

        progress.update()
        progress.set_postfix_str("item features")
        item_rows = catalogue if item_table is None else catalogue.join(item_table, on="item_id", how="left", maintain_order="left")
        missing_from_table = 0 if item_table is None else int(item_rows[ROW].null_count())
        if missing_from_table:
            log.warning("%s: %d interacted items are not in the item table (they get no item-table features)", items, missing_from_table)
        features, feature_summary, bag_vocabularies = build_item_features(
            item_rows,
            train_counts > 0,
            text_cols=text_cols,
            text_model=text_model,
            cache_dir=cache_dir,
            category_cols=category_cols,
            category_sep=category_sep,
            vectors=item_vectors,
        )

        stats = {
            "format_version": FORMAT_VERSION,
            "users": len(user_ids),
            "items": len(catalogue_ids),
            "interactions": int(history_lengths.sum()),
            "interacted_items": int((event_counts[1:] > 0).sum()),
            "cold_items": int((event_counts[1:] == 0).sum()),
            "items_in_training": int((train_counts[1:] > 0).sum()),
            "train_interactions": int(train_counts.sum()),
            "history_length": {
                "min": int(history_lengths.min()),
                "median": float(np.median(history_lengths)),
                "mean": float(history_lengths.mean()),
                "max": int(history_lengths.max()),
            },
            "raw": raw,
            "dropped": {
                "duplicate_rows": counts.duplicate_rows,
                "repeat_events": counts.repeat_events,
                "kcore_events": counts.kcore_events,
                "kcore_users": counts.kcore_users,
                "kcore_items": counts.kcore_items,
            },
            "kcore_rounds": counts.kcore_rounds,
            "min_user_events": min_user_events,
            "items_missing_from_item_table": missing_from_table,
            "time_order": TIE_BREAK if time_col is not None else "the row order of the interactions file",
            "vocabulary_order": "ascending original id; index 0 is padding",
            "split": "leave-one-out per user: last event test, second-to-last validation, the rest train",
            "id_dtypes": {"user_id": str(user_ids.dtype), "item_id": str(catalogue_ids.dtype)},
            "options": {
                "user_col": user_col, "item_col": item_col, "time_col": time_col, "weight_col": weight_col,
                "items_id_col": items_id_col if items is not None else None, "text_cols": text_cols,
                "text_model": (text_model or PACKAGED_TEXT_MODEL) if text_cols else None,
                "category_cols": category_cols, "category_sep": category_sep,
                "vectors": {name: p.name for name, p in vector_files.items()},
                "cold_items": cold_items, "min_count": min_count, "repeats": repeats,
                "cold_start_fraction": cold_start_fraction, "cold_start_seed": cold_start_seed,
            },
            "sources": {
                "interactions": _describe_file(interactions),
                "items": None if items is None else _describe_file(items),
                "vectors": {name: _describe_file(p) for name, p in vector_files.items()},
            },
            "features": feature_summary,
        }
        if cold_start is not None:
            test_items = interactions_out.group_by("user").agg(pl.col("item").last())["item"].to_numpy()
            stats["cold_start"] = {
                "fraction": cold_start_fraction, "seed": cold_start_seed, "items": int(cold_start_mask.sum()),
                "test_users": int(cold_start_mask[test_items].sum()),
                "events_removed": cold_start["events_removed"], "users_dropped": cold_start["users_dropped"],
            }

        progress.update()
        progress.set_postfix_str("writing")
        _write_atomically(out, overwrite, interactions_out, users, items_out, features, bag_vocabularies, stats)
        progress.update()
        log.info("prepared %s: %d users, %d items, %d interactions", out, stats["users"], stats["items"], stats["interactions"])
    warning = dropped_warning(stats)
    if warning is not None:
        log.warning("%s", warning)
    return out


def dropped_warning(stats: dict) -> str | None:
    """One line saying what cleaning dropped from the log, by which step, and the option deciding
    each step; None when every row of the log became an event of the prepared data.

    Steps: exact duplicate rows (always), repeated (user, item) events (``--repeats``), the
    iterated k-core (``--min-count``; users need 3 events in any case), the cold-start hold-out
    (``--cold-start-fraction``). Ids that name no item are not a step: every item of the log is in
    the catalogue unless a step above removed all its events. ``stats`` is ``stats.json``'s content.
    """
    raw, dropped, options = stats["raw"], stats["dropped"], stats["options"]
    if raw["rows"] - stats["interactions"] <= 0:
        return None
    steps = []
    if dropped["duplicate_rows"]:
        steps.append(f"{_count(dropped['duplicate_rows'], 'exact duplicate row')} (identical in every column; always dropped)")
    if dropped["repeat_events"]:
        policy = options["repeats"]
        keeps = "--repeats keep keeps them" if policy == "collapse" else \
            "--repeats keep keeps them all, --repeats collapse all but back-to-back repeats"
        steps.append(f"{_count(dropped['repeat_events'], 'repeated (user, item) event')} by --repeats {policy} ({keeps})")
    if dropped["kcore_events"]:
        min_count, min_user = options["min_count"], stats["min_user_events"]
        users_need = f"{min_user} events" + (" (the least for train, validation and test)" if min_user > min_count else "")
        steps.append(
            f"{_count(dropped['kcore_events'], 'event')}, {_count(dropped['kcore_users'], 'user')} and "
            f"{_count(dropped['kcore_items'], 'item')} by the k-core filter (--min-count {min_count}: every user needs "
            f"{users_need} and every item {max(min_count, 1)}, counted again until none falls short; "
            "a lower --min-count keeps more)"
        )
    cold = stats.get("cold_start")
    if cold and (cold["events_removed"] or cold["users_dropped"]):
        steps.append(
            f"{_count(cold['events_removed'], 'event')} and {_count(cold['users_dropped'], 'user')} by --cold-start-fraction "
            f"{cold['fraction']} (the events of its {_count(cold['items'], 'held-out item')}, test targets aside; 0 turns it off)"
        )
    kept = stats["interactions"]
    return (
        f"prepare kept {kept:,} of the log's {_count(raw['rows'], 'row')} as events ({kept / raw['rows']:.0%}), "
        f"{stats['users']:,} of its {_count(raw['users'], 'user')} and {stats['interacted_items']:,} of its "
        f"{_count(raw['items'], 'item')}; dropped: {'; '.join(steps)}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


@dataclass
class _IndexedLog:
    """The cleaned log renumbered: ``events`` is the future ``interactions.parquet``."""

    events: pl.DataFrame  # user, item, pos (int32)[, weight], sorted by (user, pos)
    user_ids: pl.Series  # original id of user index 1..U
    catalogue_ids: pl.Series  # original id of item index 1..N
    history_lengths: np.ndarray  # (U,)
    train_counts: np.ndarray  # (N + 1,) events per item in the training parts
    event_counts: np.ndarray  # (N + 1,) events per item
    cold_start: np.ndarray  # (N + 1,) bool, the items held out of training (cold_start_fraction)


def _hold_out_cold_start_items(cleaned: CleanLog, fraction: float, seed: int, min_user_events: int) -> tuple[CleanLog, dict]:
    """Remove a random ``fraction`` of the interacted items from the log but for users' last events.

    Returns the log left (users with fewer than ``min_user_events`` events dropped whole) and
    ``{"codes": the held-out item codes, "events_removed", "users_dropped"}``.
    """
    interacted = np.flatnonzero(np.bincount(cleaned.items, minlength=len(cleaned.item_vocab)))
    rng = np.random.default_rng(seed)
    codes = np.sort(rng.choice(interacted, size=int(round(fraction * len(interacted))), replace=False))
    held = np.zeros(len(cleaned.item_vocab), dtype=bool)
    held[codes] = True
    last = np.ones(len(cleaned.users), dtype=bool)  # events are grouped by user in time order
    last[:-1] = cleaned.users[1:] != cleaned.users[:-1]
    keep = ~held[cleaned.items] | last
    enough = np.bincount(cleaned.users[keep], minlength=len(cleaned.user_vocab)) >= min_user_events
    users_before = int((np.bincount(cleaned.users, minlength=len(cleaned.user_vocab)) > 0).sum())
    kept = keep & enough[cleaned.users]
    left = dataclasses.replace(
        cleaned,
        users=cleaned.users[kept],
        items=cleaned.items[kept],
        weight=None if cleaned.weight is None else cleaned.weight[kept],
    )
    return left, {
        "codes": codes,
        "events_removed": int(len(kept) - kept.sum()),
        "users_dropped": users_before - int(enough.sum()),
    }


def _index_events(cleaned: CleanLog, item_table_ids: pl.Series | None, keep_codes: np.ndarray | None = None) -> _IndexedLog:
    """Vocabularies (sorted original ids, 0 = padding), positions and the leave-one-out split.

    Cleaning codes are positions in the sorted vocabularies of the raw log, so renumbering the kept
    codes keeps the sorted order. The catalogue is the kept items, the cold-start items
    ``keep_codes`` (whether or not a test event of theirs is left) and every item-table item.
    """
    user_kept = np.bincount(cleaned.users, minlength=len(cleaned.user_vocab)) > 0
    user_ids = cleaned.user_vocab.filter(pl.Series(user_kept))
    user_index = np.cumsum(user_kept)[cleaned.users]
    item_kept = np.bincount(cleaned.items, minlength=len(cleaned.item_vocab)) > 0
    if keep_codes is not None:
        item_kept[keep_codes] = True
    interacted_ids = cleaned.item_vocab.filter(pl.Series(item_kept))
    catalogue_ids = interacted_ids
    if item_table_ids is not None:
        catalogue_ids = pl.concat([interacted_ids, item_table_ids]).unique().sort()
    item_of_code = np.zeros(len(cleaned.item_vocab), dtype=np.int64)
    item_of_code[item_kept] = catalogue_ids.search_sorted(interacted_ids).to_numpy() + 1
    item_index = item_of_code[cleaned.items]

    # events are in (user, time) order already: a position is the distance to the user's first event
    history_lengths = np.bincount(user_index, minlength=len(user_ids) + 1)[1:]
    starts = np.cumsum(history_lengths) - history_lengths
    position = np.arange(len(user_index)) - np.repeat(starts, history_lengths)
    in_train_part = position < np.repeat(history_lengths - 2, history_lengths)
    events = pl.DataFrame({
        "user": user_index.astype(np.int32),
        "item": item_index.astype(np.int32),
        "pos": position.astype(np.int32),
        **({} if cleaned.weight is None else {"weight": cleaned.weight}),
    })
    cold_start = np.zeros(len(catalogue_ids) + 1, dtype=bool)
    if keep_codes is not None:
        cold_start[item_of_code[keep_codes]] = True
    return _IndexedLog(
        cold_start=cold_start,
        events=events,
        user_ids=user_ids,
        catalogue_ids=catalogue_ids,
        history_lengths=history_lengths,
        train_counts=np.bincount(item_index[in_train_part], minlength=len(catalogue_ids) + 1),
        event_counts=np.bincount(item_index, minlength=len(catalogue_ids) + 1),
    )


# -- checks -----------------------------------------------------------------------------------------


def _check_options(out, items, user_col, item_col, text_cols, category_cols, category_sep, vector_files, min_count, repeats, overwrite):
    if repeats not in REPEAT_POLICIES:
        raise DataValidationError("--repeats", f"unknown repeat policy {repeats!r}; expected one of {', '.join(REPEAT_POLICIES)}")
    if min_count < 0:
        raise DataValidationError("--min-count", f"must be 0 or more, got {min_count}")
    if user_col == item_col:
        raise DataValidationError("--user-col", f"the user and item columns must differ, both are {user_col!r}")
    if (text_cols or category_cols) and items is None:
        raise DataValidationError("--items", "--text-cols and --category-cols need an item table (--items)")
    if category_cols and not category_sep:
        raise DataValidationError("--category-sep", "must not be empty")
    for name in list(vector_files) + category_cols:
        if not FEATURE_NAME.match(name):
            raise DataValidationError("--vectors/--category-cols", f"feature name {name!r} must be letters, digits and _")
    if text_cols and "text" in vector_files:
        raise DataValidationError("--vectors", "the feature name 'text' is taken by --text-cols")
    if len(set(category_cols)) != len(category_cols):
        raise DataValidationError("--category-cols", f"a column is named twice: {category_cols}")
    if out.exists() and not overwrite:
        raise DataValidationError(out, "the output directory already exists; remove it or pass --overwrite")


def _input_files(interactions: Path, items: Path | None, vector_files: dict[str, Path]) -> dict[str, Path]:
    """Every input file, by the option that gave it."""
    files = {"--interactions": interactions, **({} if items is None else {"--items": items})}
    return files | {f"--vectors {name}": path for name, path in vector_files.items()}


def _refuse_output_over_inputs(out: Path, inputs: dict[str, Path]) -> None:
    """The output directory must not be, nor hold, an input file: replacing it would delete the input.

    Compared by what the paths lead to (``os.path.samefile``), so symbolic links, ``..`` and other
    spellings of one place are caught; an input given as a link counts both as the link and its target."""
    if not out.exists():
        return
    for option, path in inputs.items():
        if not path.exists():
            continue  # reported as missing later; nothing of it can be deleted
        if any(os.path.samefile(out, p) for p in _places_of(path) if p.exists()):
            if os.path.samefile(out, path):
                what = f"is the input file given by {option}"
            else:
                what = f"holds the input file {path} (given by {option})"
            raise DataValidationError("--out", f"{out} {what}; writing the output there would delete it; choose another directory")


def _places_of(path: Path) -> list[Path]:
    """The file and the directories above it, both as given (its last part unresolved: a link) and resolved."""
    entry = path.parent.resolve() / path.name
    resolved = path.resolve()
    return [entry, *entry.parents, resolved, *resolved.parents]


def _log_columns(user_col, item_col, time_col, weight_col) -> list[tuple[str, str | None]]:
    return [("--user-col", user_col), ("--item-col", item_col), ("--time-col", time_col), ("--weight-col", weight_col)]


def _item_table_columns(id_col, text_cols, category_cols) -> list[tuple[str, str | None]]:
    return [("--items-id-col", id_col)] + [("--text-cols", c) for c in text_cols] + [("--category-cols", c) for c in category_cols]


def _read_log(path: Path, user_col: str, item_col: str, time_col: str | None, weight_col: str | None) -> pl.DataFrame:
    """The log as ``user_id, item_id, __time, __row, __row_hash[, weight]``, every value checked."""
    table = read_columns(path, _log_columns(user_col, item_col, time_col, weight_col), "the interaction log", row_hash=True)
    check_id_column(path, table, user_col, "user")
    check_id_column(path, table, item_col, "item")
    time_key = table[ROW].cast(pl.Int64).alias("__time") if time_col is None else parse_order_key(path, table, time_col)
    columns = [table[user_col].alias("user_id"), table[item_col].alias("item_id"), time_key, table[ROW], table[ROW_HASH]]
    if weight_col is not None:
        columns.append(parse_weight(path, table, weight_col).alias("weight"))
    return pl.DataFrame(columns)


def _read_item_table(path: Path, id_col: str, text_cols: list[str], category_cols: list[str]) -> pl.DataFrame:
    """The item table as ``item_id, __row``, the text and category columns; ids unique."""
    table = read_columns(path, _item_table_columns(id_col, text_cols, category_cols), "the item table")
    check_id_column(path, table, id_col, "item")
    duplicated = table.filter(pl.col(id_col).is_duplicated())
    if duplicated.height:
        first = duplicated[id_col][0]
        rows = duplicated.filter(pl.col(id_col) == first)[ROW].to_list()
        raise DataValidationError(path, f"item id {first!r} occurs more than once in column {id_col!r} (rows {', '.join(str(r + 1) for r in rows[:5])})")
    extra = [c for c in dict.fromkeys(text_cols + category_cols) if c != id_col]
    return table.select(pl.col(id_col).alias("item_id"), pl.col(ROW), *[pl.col(c) for c in extra])


def _integer_ids_of_text_files(
    interactions: Path, log_frame: pl.DataFrame, items: Path | None, item_table: pl.DataFrame | None, typed_item_ids: bool
) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Ids keep the type they had in the user's files; CSV and TSV have none, so there it is read off the ids.

    A CSV or TSV file delivers every id as text. User ids of a text log become Int64 when every one
    is the usual spelling of an integer (``"42"``; not ``"007"``, ``"+7"``, ``"7.0"``:
    :func:`~recsys.data.readers.integer_spellings`). Item ids likewise, when every file they come
    from is text (the log, the item table) and all of them are integer spellings; a typed file
    among them (a parquet log or item table, vector files: ``typed_item_ids``) decides instead, by
    :func:`~recsys.data.readers.unify_id_dtype`, as before. So integer ids come back as integers
    (``recommend``, the REST answers, candidate files), while a catalogue with one id like
    ``"007"`` keeps every id as text, spelled as in the file.
    """
    if is_text_table(interactions) and integer_spellings(log_frame["user_id"]):
        log_frame = log_frame.with_columns(pl.col("user_id").cast(pl.Int64))
    text_sources = is_text_table(interactions) and (items is None or is_text_table(items)) and not typed_item_ids
    item_columns = [log_frame["item_id"]] + ([] if item_table is None else [item_table["item_id"]])
    if text_sources and all(integer_spellings(ids) for ids in item_columns):
        log_frame = log_frame.with_columns(pl.col("item_id").cast(pl.Int64))
        if item_table is not None:
            item_table = item_table.with_columns(pl.col("item_id").cast(pl.Int64))
    return log_frame, item_table


def _cast_ids(ids: pl.Series, dtype: pl.DataType) -> pl.Series:
    return ids if ids.dtype == dtype else ids.cast(dtype)


# -- output -----------------------------------------------------------------------------------------


def _describe_file(path: Path) -> dict:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": digest}


def _write_atomically(out: Path, overwrite: bool, interactions, users, items, features, bag_vocabularies, stats) -> None:
    """Write into a temporary sibling directory, then put it in place of ``out`` (``recsys.atomic``:
    an existing ``out`` stays whole until the new one replaces it); clean up on any error."""
    try:
        with reported_write_failures(out), atomic_directory(out, overwrite=overwrite) as partial:
            interactions.write_parquet(partial / "interactions.parquet")
            users.write_parquet(partial / "users.parquet")
            items.write_parquet(partial / "items.parquet")
            features.save(partial / "features")
            for name, vocabulary in bag_vocabularies.items():
                (partial / "features" / f"bag_{name}_vocab.json").write_text(json.dumps(vocabulary, ensure_ascii=False), encoding="utf-8")
            (partial / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    except TargetExists:
        raise DataValidationError(out, "the output directory already exists; remove it or pass --overwrite") from None
