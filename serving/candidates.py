"""``python -m serving.candidates``: the nightly batch job, histories in, top-K candidates out.

    python -m serving.candidates --model EXPORT_DIR --input HISTORIES --k 100 --out OUT_DIR

``EXPORT_DIR`` is one size written by ``python -m recsys.export`` (e.g. ``exports/d64``): the job
runs at the size the team chose by picking that directory.

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

Output
------
``OUT_DIR`` receives parquet files ``part-SSSSS-PPPPP.parquet`` (shard ``S``, part ``P``) with the
columns ``user_id``, ``rank`` (1 = best), ``item_id`` (original ids, of the catalogue's type: see
``serving/item_ids.py``) and ``score`` (float32), sorted
by user then rank; read them all with ``polars.scan_parquet("OUT_DIR/part-*.parquet")``. Every input
user appears in exactly one part, with ``k`` rows, or fewer when fewer than ``k`` items are left
after removing the ones they have seen. Seen items are excluded by default
(``--no-exclude-seen`` keeps them). A user none of whose items the catalogue knows gets the
**fallback**: the ``k`` most popular items of the training data, scored by their training counts.

Last, the job writes ``manifest.json`` (``manifest-SSSSS-of-NNNNN.json`` for one shard of several):
the model (directory, size, number of items, its ``source``, the sha256 of its manifest), the input
(path, shape, columns, sha256), ``k``, ``exclude_seen``, the shard, the counts (``users``,
``fallback_users``, ``unknown_items_skipped``, ``rows``, ``parts``) and each part's users, rows and
sha256. The manifest is written after every part, so **its presence means the job finished**.

How a large input is read
-------------------------
The input never sits in memory whole. Users are split into parts of about ``--users-per-part``
users (default 100,000) by a stable hash of the user id; peak memory is one part's events, the
list of distinct user ids and the model. The job first streams over the input in chunks of 10^6
rows (polars ``collect_batches``) to validate every row and list the distinct users, and hashes
the file for the manifest. When there is more than one part, one streaming polars pass (a join
with the user-to-part table, sunk with ``PartitionBy``) splits this shard's rows into a staging
directory ``OUT_DIR/.staging-SSSSS`` with one hive partition per part (its record
``.staging-SSSSS.json``, the job it was split for, is written once it is complete and removed
before it is deleted), deleted at the end. Each
part is then read alone, turned into histories, scored in batches of ``--batch-size`` users (users
of similar history length together: each batch is encoded over its real positions only, then
searched exactly with blocked matrix products and a streaming top-k, ``recsys/retrieval/exact.py``)
and handed to a writer thread, which writes it while the next part is read and scored.

Resuming and idempotence
------------------------
Each part is written to a temporary name and renamed when complete, so a part file is always
whole. Run the same command again after a crash or a kill and it skips the parts that exist and
writes the rest; the end result has every input user exactly once. The assignment of users to
parts, the order of users in a part (ascending id) and of their candidates (rank) depend only on
the input, the model and the options, so running the job twice gives the same files. (Another
``--batch-size``, device or sharding batches users differently, which can change scores in the last
float bits, and with them the order of near-tied items; never which users are there.) A job file
``OUT_DIR/.job-SSSSS-of-NNNNN.json`` records the model, input checksum and options: a rerun with a
different model, input, ``k`` or part size into the same ``OUT_DIR`` is refused (use a new
``--out``). Running again after completion checks the parts against the manifest and does nothing
(a part deleted since is written again). A rerun trusts nothing unfinished: a staging directory
without its record, or with another job's, is split again; a part file or manifest that cannot be
read is written again.

One run per shard at a time: while it writes, a run holds ``OUT_DIR/.lock-SSSSS-of-NNNNN`` with
``fcntl.flock``; a second run of the same shard into the same ``OUT_DIR`` stops at once with one
line (before reading its input when the first already holds the lock). The system releases the
lock when the process ends, killed or not, so a lock file is never stale and is left in place. (On
a network file system, Linux's NFS client implements ``flock`` with NFS locks, which work across
machines.) ``--out`` is checked first: a file, a place inside a file, or a directory this process
cannot write into stops the job before the input is read; a disk that fills up midway stops it
with one line (``cannot write there: No space left on device``), and the rerun resumes.

Many machines, many GPUs
------------------------
``--shard i/n`` (0 <= i < n) processes only the users whose hash falls in shard ``i`` of ``n``; the
``n`` shards together cover every user exactly once. The hash is CRC-32 of the user id's text form
(``zlib.crc32(str(user_id).encode("utf-8"))``): shard ``h % n``, part ``(h // n) % parts``. It does
not depend on the polars, Python or numpy version, nor on whether ids came as integers or text.
With any job runner (Slurm array, Kubernetes indexed job, a shell loop), start ``n`` tasks that
each run ``--shard $INDEX/n``, all writing into the same ``OUT_DIR`` on a shared file system (names
never collide) or into their own directories; the job is complete when all ``n`` manifests exist.
On one machine with several GPUs, run one process per GPU: ``CUDA_VISIBLE_DEVICES=$i python -m
serving.candidates ... --shard $i/$n``. The encoder runs on the GPU when one is present
(``--device``) and ``serving.load`` uses the faiss GPU index when the GPU build of faiss is
installed. (Lightning's ``Trainer.predict`` with a ``BasePredictionWriter`` writing one file per
rank is another way to fan out over GPUs; this job does not need it, since shards are independent.)

A progress bar shows users per second; the job ends with a one-line summary.
"""

from __future__ import annotations

import sys

from recsys.console import help_asked
from serving.cli import candidates_parser

if __name__ == "__main__" and help_asked(sys.argv[1:]):  # answered before torch is imported (seconds)
    candidates_parser(__doc__).parse_args()

# the imports below take seconds (torch), so the help comes first
import hashlib
import json
import logging
import re
import shutil
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

try:
    import fcntl
except ImportError:  # not POSIX: no lock; run each shard in one process at a time
    fcntl = None

from recsys.atomic import (
    FileLock,
    atomic_directory,
    atomic_file,
    check_writable,
    reported_write_failures,
    write_json_atomically,
)
from recsys.data.readers import (
    ROW,
    check_input_schema,
    checked_chunks,
    input_files,
    integer_spellings,
    reject_repeated_users,
    scan_input,
)
from recsys.data.time_order import parse_order_key
from recsys.errors import UserError, exit_code_of
from recsys.runtime import reuse_freed_memory
from recsys.export_dir import MANIFEST, sha256_of
from serving.sized_model import SizedRecommender

__all__ = ["CandidatesError", "InputSpec", "generate_candidates", "stable_user_hash", "parse_shard", "main"]

log = logging.getLogger("serving.candidates")  # not __name__: that is "__main__" under `python -m`

FORMAT = "serving.candidates/1"
#: key of the per-part counts in each part file's parquet metadata (read back when resuming)
PART_METADATA_KEY = "serving.candidates.counts"
FALLBACK = "the k most popular items of the training data, scored by their training counts"
#: rows per chunk when streaming over the input to validate it
_CHUNK_ROWS = 1_000_000
_PART_COLUMN = "__part"
_ORDER = "__order"


class CandidatesError(UserError, ValueError):
    """Bad options or an output directory the job cannot use (bad input files raise
    :class:`recsys.data.errors.DataValidationError`; a bad export, :class:`serving.ExportError`)."""


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
        if self.history_col:
            return {"user": self.user_col, "history": self.history_col}
        return {"user": self.user_col, "item": self.item_col, "time": self.time_col}


# ---------------------------------------------------------------------------------------------
# Stable assignment of users to shards and parts
# ---------------------------------------------------------------------------------------------


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
        {users.name: users.filter(pl.Series(mine)), _PART_COLUMN: ((h[mine] // n) % num_parts).astype(np.int32)}
    )
    return table, num_parts


# ---------------------------------------------------------------------------------------------
# Reading and validating the input
# ---------------------------------------------------------------------------------------------


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
    columns = [c for c in spec.columns().values() if c is not None]
    time_col = None if spec.history_col else spec.time_col
    chunks = checked_chunks(
        spec.path, frame, columns, spec.what, spec.id_columns(), spec.list_columns(), time_col, chunk_rows=_CHUNK_ROWS
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


# ---------------------------------------------------------------------------------------------
# One part: histories -> candidates
# ---------------------------------------------------------------------------------------------


def _write_part(frame: pl.DataFrame, counts: dict[str, int], path: Path) -> None:
    """Write a part under a temporary name, then rename it (``recsys.atomic``): a part file is always complete."""
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp, metadata={PART_METADATA_KEY: json.dumps(counts, sort_keys=True)})


def _part_counts(path: Path) -> dict[str, int] | None:
    """The counts a finished part file holds in its metadata; None when there is no part, or one
    that cannot be read (it is removed, to be written again)."""
    if not path.is_file():
        return None
    try:
        return json.loads(pl.read_parquet_metadata(path)[PART_METADATA_KEY])
    except (KeyError, ValueError, pl.exceptions.PolarsError, OSError):
        log.warning("%s is not a whole part written by this job: writing it again", path)
        path.unlink()
        return None


class _Job:
    """One run of the job for one shard: everything the steps share."""

    def __init__(
        self,
        model: SizedRecommender,
        spec: InputSpec,
        out: Path,
        k: int,
        shard: tuple[int, int],
        batch_size: int,
        exclude_seen: bool,
        users_per_part: int,
    ):
        self.model, self.spec, self.out, self.k = model, spec, out, k
        self.shard, self.batch_size, self.exclude_seen, self.users_per_part = shard, batch_size, exclude_seen, users_per_part
        i, n = shard
        self.tag = f"{i:05d}"
        self.manifest_path = out / (MANIFEST if n == 1 else f"manifest-{i:05d}-of-{n:05d}.json")
        self.job_path = out / f".job-{i:05d}-of-{n:05d}.json"
        self.staging = out / f".staging-{self.tag}"
        self.staged = out / f".staging-{self.tag}.json"  # the job the staging directory was split for
        self.item_ids = pl.Series("item_id", model.item_ids)
        #: wall time reading parts into histories and writing part files (the writer thread's, overlapped)
        self.stage_seconds = {"read": 0.0, "write": 0.0}

    def part_path(self, part: int) -> Path:
        return self.out / f"part-{self.tag}-{part:05d}.parquet"

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

    def compute_part(self, users: pl.Series, source: pl.LazyFrame, bar=None) -> tuple[pl.DataFrame, dict[str, int]]:
        """One part's candidate rows (users in the given order) and its counts; writes nothing."""
        started = time.perf_counter()
        histories, unknown = self._histories(users, source.collect())
        self.stage_seconds["read"] += time.perf_counter() - started
        frame = self._candidates(users, histories, bar)
        counts = {
            "users": len(users),
            "fallback_users": sum(1 for h in histories if not h),
            "unknown_items_skipped": unknown,
            "rows": frame.height,
        }
        return frame, counts

    def run_part(self, part: int, users: pl.Series, source: pl.LazyFrame, bar, writer) -> Future:
        """Compute one part's candidates here; hand the file to ``writer`` (one thread), so that it
        is written while the next part is read and scored. The future gives the part's counts."""
        frame, counts = self.compute_part(users, source, bar)
        return writer.submit(self._write, frame, counts, self.part_path(part))

    def _write(self, frame: pl.DataFrame, counts: dict[str, int], path: Path) -> dict[str, int]:
        started = time.perf_counter()
        _write_part(frame, counts, path)
        self.stage_seconds["write"] += time.perf_counter() - started
        return counts


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

_OWN_NAME = re.compile(
    r"part-\d{5}-\d{5}\.parquet|manifest(-\d{5}-of-\d{5})?\.json|\.(job|lock)-\d{5}-of-\d{5}(\.json)?"
    r"|\.staging-\d{5}(\.tmp|\.json)?|\..+\.tmp"
)


def _lock_path(out: Path, shard: tuple[int, int]) -> Path:
    return out / f".lock-{shard[0]:05d}-of-{shard[1]:05d}"


def _running(out: Path, shard: tuple[int, int]) -> CandidatesError:
    which = "" if shard[1] == 1 else f" of shard {shard[0]}/{shard[1]}"
    return CandidatesError(
        f"--out {out}: another run{which} is writing there (it holds {_lock_path(out, shard).name}); "
        "wait for it to end or use another --out"
    )


def _refuse_if_running(out: Path, shard: tuple[int, int]) -> None:
    """Fail at once, before the input is read, when another run of this shard writes into ``out``."""
    lock = _lock_path(out, shard)
    if fcntl is None or not lock.is_file():
        return
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _running(out, shard) from None


@contextmanager
def _one_run_at_a_time(out: Path, shard: tuple[int, int]) -> Iterator[None]:
    """Hold the lock file of this shard while writing (:class:`recsys.atomic.FileLock`: the system
    releases it when the process ends, killed or not, so a lock is never stale); a second run fails at once."""
    lock = FileLock(_lock_path(out, shard))
    if not lock.acquire():
        raise _running(out, shard)
    try:
        yield
    finally:
        lock.release()


def _check_out_dir(out: Path, job_path: Path, job: dict[str, Any]) -> None:
    """Refuse a directory that holds other files, another sharding, or this shard of another job."""
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _OWN_NAME.fullmatch(p.name))
    if foreign:
        raise CandidatesError(
            f"--out {out} holds files this job did not write ({', '.join(foreign[:5])}); use an empty or new directory"
        )
    n = job["shard"]["count"]
    others = sorted(p.name for p in out.glob(".job-*.json") if not p.name.endswith(f"-of-{n:05d}.json"))
    if others:
        raise CandidatesError(f"--out {out} holds output split into another number of shards ({others[0]}); use a new --out")
    if job_path.is_file():
        try:
            previous = json.loads(job_path.read_text())
        except ValueError:
            raise CandidatesError(f"{job_path}: not readable, so the output there cannot be resumed; use a new --out") from None
        changed = [key for key in job if previous.get(key) != job[key]]
        if changed:
            key = changed[0]
            raise CandidatesError(
                f"--out {out} holds output of a different job ({key}: {previous.get(key)!r} there, {job[key]!r} now); "
                "use a new --out or delete that directory"
            )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_json_atomically(path, data, indent=2, sort_keys=True, default=str)


def _complete(manifest_path: Path, out: Path) -> bool:
    """True when the manifest exists and every part it lists is there, unchanged (else the
    manifest is removed, and so is a changed part, to be written again)."""
    if not manifest_path.is_file():
        return False
    try:
        parts = [(out / entry["file"], entry["sha256"]) for entry in json.loads(manifest_path.read_text())["parts"]]
    except (ValueError, KeyError, TypeError):
        log.warning("%s cannot be read: writing the output again", manifest_path)
        manifest_path.unlink()
        return False
    for path, sha256 in parts:
        if not path.is_file() or sha256_of(path) != sha256:
            log.warning("%s is missing or changed since the manifest was written: regenerating it", path)
            path.unlink(missing_ok=True)
            manifest_path.unlink()
            return False
    return True


def _resolve_device(device: str) -> str:
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
    """A job checked and ready to write: the input validated, its users listed and assigned to parts."""

    runner: _Job
    job: dict[str, Any]
    frame: pl.LazyFrame
    users: pl.Series
    assign: pl.DataFrame
    num_parts: int
    num_rows: int

    def part_users(self, part: int) -> pl.Series:
        """The users of one part, ascending (their order in the part file)."""
        return self.assign.filter(pl.col(_PART_COLUMN) == part)[self.runner.spec.user_col].sort()


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
    """Everything :func:`generate_candidates` checks before it writes (options, ``out``, the model,
    the whole input), with nothing written; also the first step of ``serving.ray_candidates``."""
    shard = parse_shard(shard) if isinstance(shard, str) else tuple(shard)
    parse_shard(f"{shard[0]}/{shard[1]}")
    for name, value in (("k", k), ("batch_size", batch_size), ("users_per_part", users_per_part)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CandidatesError(f"{name} must be a positive integer, got {value!r}")
    out = Path(out)
    check_writable(out)  # before the model is loaded and the whole input read
    _refuse_if_running(out, shard)
    if isinstance(model, SizedRecommender):
        recommender = model
    else:
        recommender = SizedRecommender(model, device=_resolve_device(device))
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
    job = {
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
    runner = _Job(recommender, spec, out, k, shard, batch_size, exclude_seen, users_per_part)
    _check_out_dir(out, runner.job_path, job)
    return PreparedJob(runner, job, frame, users, assign, num_parts, num_rows)


def generate_candidates(
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
    progress: bool = True,
    stage_seconds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Write the top-``k`` candidates of every user of ``input_path`` (in ``shard``) to ``out``.

    ``model`` is an export directory, or one already loaded with :func:`serving.load` (then
    ``device`` is the one it was loaded on). Returns the manifest written to ``out``, plus ``elapsed_s`` (the file itself holds no timings,
    so that reruns give identical files). See the module docstring for the formats, resuming and
    sharding. Everything that can be checked before writing is checked first (the whole input is
    read once for that), so bad input leaves ``out`` untouched. ``stage_seconds``, when given, receives
    the wall time spent reading parts into histories (``"read"``) and writing part files
    (``"write"``, in a thread overlapping the next part); the model's own ``stage_seconds`` hold
    encoding and search. The process keeps freed memory for reuse (:func:`recsys.runtime.reuse_freed_memory`):
    every batch allocates the same large score and state buffers again.
    """
    started = time.perf_counter()
    reuse_freed_memory()
    prepared = prepare_job(
        model, input_path, out, k, user_col=user_col, item_col=item_col, time_col=time_col, history_col=history_col,
        shard=shard, batch_size=batch_size, exclude_seen=exclude_seen, users_per_part=users_per_part, device=device,
    )
    runner, job, frame, users, assign, num_parts, num_rows = (
        prepared.runner, prepared.job, prepared.frame, prepared.users, prepared.assign, prepared.num_parts, prepared.num_rows
    )
    out, shard, k = runner.out, runner.shard, runner.k

    # Past this point the input and options are valid: output may be written, by one run at a time.
    out.mkdir(parents=True, exist_ok=True)
    with _one_run_at_a_time(out, shard), reported_write_failures(out):
        if _complete(runner.manifest_path, out):
            _discard_staging(runner)
            log.info("%s: already complete, nothing to do", runner.manifest_path)
            return {**json.loads(runner.manifest_path.read_text()), "elapsed_s": time.perf_counter() - started}
        manifest = _write_candidates(runner, job, frame, users, assign, num_parts, num_rows, progress)
    if stage_seconds is not None:
        stage_seconds.update(runner.stage_seconds)
    elapsed = time.perf_counter() - started
    c = manifest["counts"]
    log.info(
        "candidates: %d users (%d with the popular fallback, %d unknown item ids skipped), k=%d, %d rows in %d parts, "
        "%.1f s (%.0f users/s) -> %s",
        c["users"], c["fallback_users"], c["unknown_items_skipped"], k, c["rows"], c["parts"], elapsed,
        c["users"] / max(elapsed, 1e-9), runner.manifest_path,
    )
    manifest["elapsed_s"] = elapsed  # for the caller only; the file stays free of timings
    return manifest


def _write_candidates(
    runner: _Job, job: dict, frame: pl.LazyFrame, users: pl.Series, assign: pl.DataFrame, num_parts: int, num_rows: int,
    progress: bool,
) -> dict[str, Any]:
    """Write the parts not yet written (whole files only), then the manifest; return the manifest."""
    from tqdm.auto import tqdm

    shard, user_col = runner.shard, runner.spec.user_col
    start_writing(runner, job)
    shard_frame = _shard_frame(runner, frame, users, assign)
    counts = finished_parts(runner, num_parts)
    todo = [p for p in range(num_parts) if p not in counts]
    if todo:
        log.info(
            "%d users in shard %d/%d (of %d users, %d rows): %d of %d parts to write",
            len(assign), *shard, len(users), num_rows, len(todo), num_parts,
        )
    if todo and num_parts > 1:
        ensure_staged(runner, job, shard_frame)
    done_users = sum(c["users"] for c in counts.values())
    with tqdm(
        total=len(assign), initial=done_users, unit="users", desc=f"candidates {shard[0]}/{shard[1]}", disable=not progress
    ) as bar:
        # one writer thread: part p is written while part p + 1 is computed; each part file is still
        # written whole under a temporary name, and the manifest only after every write has finished
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="candidates-writer") as writer:
            written = {}
            for p in todo:
                part_users = assign.filter(pl.col(_PART_COLUMN) == p)[user_col].sort()
                if num_parts > 1:
                    source = staged_part(runner, p)
                else:
                    source = shard_frame
                written[p] = runner.run_part(p, part_users, source, bar, writer)
                for done in [q for q, future in written.items() if future.done()]:
                    counts[done] = written.pop(done).result()  # a failed write stops the job here
            counts.update({q: future.result() for q, future in written.items()})
    return finish(runner, job, counts, num_parts)


def start_writing(runner: _Job, job: dict[str, Any]) -> None:
    """Record the job in ``out`` and remove what an interrupted run left half-written."""
    _write_json(runner.job_path, job)
    for leftover in runner.out.glob(f".part-{runner.tag}-*.tmp"):
        leftover.unlink()
    shutil.rmtree(runner.out / f".staging-{runner.tag}.tmp", ignore_errors=True)


def _shard_frame(runner: _Job, frame: pl.LazyFrame, users: pl.Series, assign: pl.DataFrame) -> pl.LazyFrame:
    """This shard's input rows (numbered in file order) with their part."""
    user_col = runner.spec.user_col
    columns = [c for c in runner.spec.columns().values() if c is not None]
    frame = frame.select(columns).with_row_index(ROW).with_columns(pl.col(user_col).cast(users.dtype))
    return frame.join(assign.lazy(), on=user_col, how="inner")


def finished_parts(runner: _Job, num_parts: int) -> dict[int, dict[str, int]]:
    """Part -> counts of the parts already written whole (a part that cannot be read is removed)."""
    counts: dict[int, dict[str, int]] = {}
    for p in range(num_parts):
        part_counts = _part_counts(runner.part_path(p))
        if part_counts is not None:
            counts[p] = part_counts
    return counts


def ensure_staged(runner: _Job, job: dict[str, Any], shard_frame: pl.LazyFrame) -> None:
    """Split the shard's rows by part into the staging directory, unless one whole and split for
    this job is there already (a staging directory is trusted or discarded, never patched)."""
    if not _staged_for(runner, job):
        _discard_staging(runner)
        _stage(shard_frame, runner.staging)
        _write_json(runner.staged, job)


def staged_part(runner: _Job, part: int) -> pl.LazyFrame:
    """The input rows of one part, read back from the staging directory."""
    return pl.scan_parquet(runner.staging, hive_partitioning=True).filter(pl.col(_PART_COLUMN) == part)


def write_part(frame: pl.DataFrame, counts: dict[str, int], path: Path) -> None:
    """Write one part file whole (temporary name, then rename), its counts in its metadata."""
    _write_part(frame, counts, path)


def finish(runner: _Job, job: dict[str, Any], counts: dict[int, dict[str, int]], num_parts: int) -> dict[str, Any]:
    """Write the manifest once every part is written, drop the staging directory; return the manifest."""
    missing = [p for p in range(num_parts) if p not in counts]
    if missing:
        raise RuntimeError(f"parts {missing[:5]} of {runner.out} were not written")
    manifest = _manifest(runner, job, runner.model, runner.spec, counts, num_parts)
    _write_json(runner.manifest_path, manifest)
    _discard_staging(runner)
    return manifest


def _staged_for(runner: _Job, job: dict[str, Any]) -> bool:
    """Whether the staging directory is there, whole, and was split for this job: its record
    ``.staging-SSSSS.json`` is written only after it is complete, and removed before it is deleted."""
    if not (runner.staging.is_dir() and runner.staged.is_file()):
        return False
    try:
        return json.loads(runner.staged.read_text()) == json.loads(json.dumps(job, default=str))
    except ValueError:
        return False


def _discard_staging(runner: _Job) -> None:
    runner.staged.unlink(missing_ok=True)  # first: a half-deleted staging directory is never trusted
    shutil.rmtree(runner.staging, ignore_errors=True)


def _stage(shard_frame: pl.LazyFrame, staging: Path) -> None:
    """Split this shard's rows by part into ``staging`` with one streaming pass (hive partitions)."""
    log.info("splitting the input by part into %s", staging)
    # siblings=False: other shards, maybe on other hosts, write into the same directory
    with atomic_directory(staging, siblings=False) as tmp:
        shard_frame.sink_parquet(pl.PartitionBy(tmp, key=_PART_COLUMN, include_key=False), mkdir=True)


def _manifest(runner: _Job, job: dict, recommender: SizedRecommender, spec: InputSpec, counts: dict, num_parts: int) -> dict:
    parts = [
        {"file": runner.part_path(p).name, **counts[p], "sha256": sha256_of(runner.part_path(p))} for p in range(num_parts)
    ]
    total = {key: sum(part[key] for part in parts) for key in ("users", "fallback_users", "unknown_items_skipped", "rows")}
    m = recommender.manifest
    return {
        "format": FORMAT,
        "model": {
            "dir": str(recommender.directory.resolve()),
            "size": recommender.size,
            "num_items": m["num_items"],
            "source": m.get("source"),
            "manifest_sha256": job["model_manifest_sha256"],
        },
        "input": {
            "path": str(spec.path.resolve()), "kind": spec.kind, "columns": spec.columns(), "sha256": job["input_sha256"],
        },
        "k": job["k"],
        "exclude_seen": job["exclude_seen"],
        "shard": job["shard"],
        "users_per_part": job["users_per_part"],
        "fallback": FALLBACK,
        "counts": {**total, "parts": num_parts},
        "parts": parts,
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def time_column_of(value: str | None) -> str | None:
    """``--time-col`` as the job takes it: empty or "none" means no column (order by file row)."""
    return None if value in (None, "", "none", "None") else value


def summary_line(manifest: dict, out: str | Path) -> str:
    """The one line a finished job prints (``serving.candidates`` and ``serving.ray_candidates``)."""
    c = manifest["counts"]
    return (f"{c['users']} users, {c['fallback_users']} with the popular fallback, {c['unknown_items_skipped']} unknown "
            f"item ids skipped, {c['rows']} rows in {c['parts']} parts, {manifest.get('elapsed_s', 0):.1f} s -> {out}")


def job_options(args) -> dict:
    """The keyword options both candidate jobs take, from their shared command line."""
    return {
        "user_col": args.user_col, "item_col": args.item_col, "time_col": time_column_of(args.time_col),
        "history_col": args.history_col, "shard": args.shard, "batch_size": args.batch_size,
        "exclude_seen": args.exclude_seen, "users_per_part": args.users_per_part, "device": args.device,
    }


def main(argv: list[str] | None = None) -> int:
    args = candidates_parser(__doc__).parse_args(argv)
    options = job_options(args)

    def run() -> None:
        manifest = generate_candidates(args.model, args.input, args.out, args.k, **options)
        print(summary_line(manifest, args.out))

    return exit_code_of(run)


if __name__ == "__main__":
    # force: importing torchrec (through fbgemm_gpu) calls logging.info, which installs a
    # WARNING-level root handler that would swallow this job's INFO lines
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every CPU variant it tries
    sys.exit(main())
