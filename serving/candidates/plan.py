"""What a candidate job computes, decided before anything is scored: the input, its users, their shards and parts.

Input
-----
``--input`` is one ``.parquet``, ``.csv`` or ``.tsv`` file, or a directory of ``.parquet`` files
(read in file-name order), in one of two shapes:

- an **interaction log** (the default): one row per event with a user column, an item column and a
  time-or-order column (``--user-col user_id --item-col item_id --time-col timestamp``). A user's
  history is their items in time order, ties broken by the order of the rows in the file. The time
  column takes what ``python -m recsys.data prepare`` takes: integers (Unix time or an order such as
  ``seq``), floats, dates, datetimes, or text holding one of those. ``--time-col none`` orders by
  file row alone.
- a **history table** (``--history-col history``): one row per user, a user column and a list
  column of item ids, oldest first (parquet only: CSV has no list type). An empty or null list is a
  user with no history.

CSV and TSV are read as text, like ``prepare`` reads them (TSV with quoting off): user ids that are
all canonical integers become integers, others stay strings; item ids name the export's items by
the one rule of ``serving/item_ids.py``, as in ``serving.load`` and the REST endpoint (the text
``"7"`` is the integer item ``7``, ``"007"`` is not; the integer ``7`` is the text item ``"7"``). Ids the
catalogue lacks are skipped and counted (``unknown_items_skipped``), never fatal. Null or blank user
or item ids, an unparsable time, a repeated header line, a user listed twice in a history table, a
missing column, an empty file, an unknown export directory or ``k`` above the catalogue size are
errors, reported (file, column, row or value) before anything is written. The input is read and
checked by ``recsys/data/readers.py``, as ``prepare`` reads its log, with the same messages.

Users, shards and parts
-----------------------
The input never sits in memory whole. Users are split into parts of about ``--users-per-part``
users (default 100,000) by a stable hash of the user id; peak memory is one part's events, the
list of distinct user ids and the model. The job first streams over the input in chunks of 10^6
rows (polars ``collect_batches``) to validate every row and list the distinct users, and hashes
the file for the manifest.

``--shard i/n`` (0 <= i < n) processes only the users whose hash falls in shard ``i`` of ``n``; the
``n`` shards together cover every user exactly once. The hash is CRC-32 of the user id's text form
(``zlib.crc32(str(user_id).encode("utf-8"))``): shard ``h % n``, part ``(h // n) % parts``. It does
not depend on the polars, Python or numpy version, nor on whether ids came as integers or text.
"""

from __future__ import annotations

import hashlib
import logging
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.data.readers import (
    ROW,
    check_input_schema,
    checked_chunks,
    input_files,
    integer_spellings,
    reject_repeated_users,
    scan_input,
)
from recsys.export_dir import MANIFEST, sha256_of
from serving.candidates.errors import CandidatesError
from serving.candidates.store import FALLBACK, FORMAT, PART_COLUMN, OutputDir
from serving.sized_model import SizedRecommender

log = logging.getLogger(__name__)

#: rows per chunk when streaming over the input to validate it
_CHUNK_ROWS = 1_000_000


@dataclass(frozen=True)
class InputSpec:
    """Where the histories are and which columns hold them.

    ``history_col`` set: a history table (user, list of items). Otherwise an interaction log
    (user, item, time); ``time_col=None`` orders each user's events by file row only.
    """

    path: Path
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str | None = "timestamp"
    history_col: str | None = None

    @property
    def kind(self) -> str:
        return "histories" if self.history_col else "log"

    @property
    def what(self) -> str:
        """The table's name in error messages (as ``prepare`` names its interaction log)."""
        return "the history table" if self.history_col else "the interaction log"

    def id_columns(self) -> dict[str, str]:
        """Id column -> its role, for the readers' checks."""
        return {self.user_col: "user"} if self.history_col else {self.user_col: "user", self.item_col: "item"}

    def list_columns(self) -> dict[str, str]:
        return {self.history_col: "history"} if self.history_col else {}

    def columns(self) -> dict[str, str | None]:
        """Role -> column (``time`` may be None)."""
        if self.history_col:
            return {"user": self.user_col, "history": self.history_col}
        return {"user": self.user_col, "item": self.item_col, "time": self.time_col}

    def columns_read(self) -> list[str]:
        """The columns the job reads from the input."""
        return [c for c in self.columns().values() if c is not None]


# -- stable assignment of users to shards and parts ------------------------------------------------


def stable_user_hash(user_ids: Iterable[Any]) -> np.ndarray:
    """CRC-32 of each id's text form, as uint32: the same on every machine and library version.

    polars' and Python's built-in hashes are seeded or may change between versions; a shard must
    name the same users wherever and whenever it runs. Integer ids hash as their decimal text, so
    ``7`` and ``"7"`` land in the same shard (CSV input arrives as text).
    """
    return np.fromiter((zlib.crc32(str(u).encode("utf-8")) for u in user_ids), dtype=np.uint32)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
        raise CandidatesError(f"--shard must be i/n with 0 <= i < n, e.g. 0/4; got {text!r}")
    return int(match[1]), int(match[2])


def _assign(users: pl.Series, shard: tuple[int, int], users_per_part: int) -> tuple[pl.DataFrame, int]:
    """This shard's users with their part, and the number of parts."""
    h = stable_user_hash(users.cast(pl.String).to_list()).astype(np.int64)
    i, n = shard
    mine = h % n == i
    num_parts = max(1, -(-int(mine.sum()) // users_per_part))
    table = pl.DataFrame(
        {users.name: users.filter(pl.Series(mine)), PART_COLUMN: ((h[mine] // n) % num_parts).astype(np.int32)}
    )
    return table, num_parts


# -- reading and validating the input ------------------------------------------------------------------


def _input_sha256(path: Path) -> str:
    """sha256 of the file, or of the names and contents of a directory's parquet files in order."""
    if path.is_file():
        return sha256_of(path)
    digest = hashlib.sha256()
    for file in input_files(path):
        digest.update(file.name.encode() + b"\0" + sha256_of(file).encode())
    return digest.hexdigest()


def _check_schema(spec: InputSpec, frame: pl.LazyFrame) -> pl.Schema:
    options = {"user": "--user-col", "item": "--item-col", "time": "--time-col", "history": "--history-col"}
    columns = [(options[role], column) for role, column in spec.columns().items()]
    return check_input_schema(spec.path, frame, columns, spec.what, spec.id_columns(), spec.list_columns())


def _distinct_users(spec: InputSpec, frame: pl.LazyFrame) -> tuple[pl.Series, int]:
    """Validate the whole input in streaming chunks; return its distinct users and its row count."""
    time_col = None if spec.history_col else spec.time_col
    chunks = checked_chunks(
        spec.path, frame, spec.columns_read(), spec.what, spec.id_columns(), spec.list_columns(), time_col,
        chunk_rows=_CHUNK_ROWS,
    )
    parts: list[pl.Series] = []
    rows = 0
    for chunk in chunks:
        rows += chunk.height
        parts.append(chunk[spec.user_col].unique())
        if len(parts) > 16:  # keep the list of distinct users compact as we go
            parts = [pl.concat(parts).unique()]
    users = pl.concat(parts).unique().sort()
    if spec.history_col and len(users) < rows:
        reject_repeated_users(spec.path, frame, spec.user_col)
    return users, rows


# -- the job, checked and planned ----------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; ``cpu`` and ``cuda[:N]`` as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise CandidatesError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        raise CandidatesError(f"--device {device}: no CUDA GPU is usable here (use auto or cpu)")
    return device


@dataclass
class PreparedJob:
    """A job checked and ready to write: the model loaded, the input validated, its users listed
    and assigned to parts. Nothing is written yet."""

    model: SizedRecommender
    spec: InputSpec
    out: OutputDir
    k: int
    batch_size: int
    exclude_seen: bool
    #: the job record (``.job-SSSSS-of-NNNNN.json``): the model, input and options a rerun must match
    record: dict[str, Any]
    #: the whole input, scanned (never collected whole)
    frame: pl.LazyFrame
    #: its distinct users, ascending
    users: pl.Series
    #: this shard's users and their part (``PART_COLUMN``)
    assign: pl.DataFrame
    num_parts: int
    num_rows: int

    def shard_rows(self) -> pl.LazyFrame:
        """This shard's input rows (numbered in file order) with their part."""
        user_col = self.spec.user_col
        frame = self.frame.select(self.spec.columns_read()).with_row_index(ROW)
        frame = frame.with_columns(pl.col(user_col).cast(self.users.dtype))
        return frame.join(self.assign.lazy(), on=user_col, how="inner")

    def description(self) -> dict[str, Any]:
        """What the manifest says of the job: the model, the input and the options."""
        m, record = self.model.manifest, self.record
        return {
            "format": FORMAT,
            "model": {
                "dir": str(self.model.directory.resolve()),
                "size": self.model.size,
                "num_items": m["num_items"],
                "source": m.get("source"),
                "manifest_sha256": record["model_manifest_sha256"],
            },
            "input": {
                "path": str(self.spec.path.resolve()), "kind": self.spec.kind, "columns": self.spec.columns(),
                "sha256": record["input_sha256"],
            },
            **{key: record[key] for key in ("k", "exclude_seen", "shard", "users_per_part")},
            "fallback": FALLBACK,
        }


def prepare_job(
    model: str | Path | SizedRecommender,
    input_path: str | Path,
    out: str | Path,
    k: int = 100,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    history_col: str | None = None,
    shard: tuple[int, int] | str = (0, 1),
    batch_size: int = 1024,
    exclude_seen: bool = True,
    users_per_part: int = 100_000,
    device: str = "auto",
) -> PreparedJob:
    """Everything a job checks before it writes (options, ``out``, the model, the whole input), with
    nothing written: the first step of both runners (``serving.candidates``, ``serving.ray_candidates``)."""
    shard = parse_shard(shard) if isinstance(shard, str) else tuple(shard)
    parse_shard(f"{shard[0]}/{shard[1]}")
    for name, value in (("k", k), ("batch_size", batch_size), ("users_per_part", users_per_part)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CandidatesError(f"{name} must be a positive integer, got {value!r}")
    output = OutputDir(Path(out), shard)
    output.check_can_write()  # before the model is loaded and the whole input read
    if isinstance(model, SizedRecommender):
        recommender = model
    else:
        recommender = SizedRecommender(model, device=resolve_device(device))
    model_dir = recommender.directory
    if k > len(recommender.item_ids):
        raise CandidatesError(f"k={k} exceeds the catalogue of {model_dir} ({len(recommender.item_ids)} items)")
    spec = InputSpec(Path(input_path), user_col, item_col, time_col, history_col)

    frame = scan_input(spec.path)
    _check_schema(spec, frame)
    log.info("reading %s to validate it and list its users", spec.path)
    users, num_rows = _distinct_users(spec, frame)
    if integer_spellings(users):  # text user ids that are all integers ("7", not "007"): integers, as prepare reads them
        users = users.cast(pl.Int64)
    assign, num_parts = _assign(users, shard, users_per_part)
    record = {
        "format": FORMAT,
        "model_manifest_sha256": sha256_of(model_dir / MANIFEST),
        "input_sha256": _input_sha256(spec.path),
        "input_kind": spec.kind,
        "columns": spec.columns(),
        "k": k,
        "exclude_seen": exclude_seen,
        "shard": {"index": shard[0], "count": shard[1]},
        "users_per_part": users_per_part,
    }
    output.check_resumable(record)
    return PreparedJob(recommender, spec, output, k, batch_size, exclude_seen, record, frame, users, assign, num_parts,
                       num_rows)
