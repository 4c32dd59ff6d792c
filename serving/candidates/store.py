"""The output directory of a candidate job (``--out``): part files, staging, the lock, resuming and the manifest.

Output
------
``OUT_DIR`` receives parquet files ``part-SSSSS-PPPPP.parquet`` (shard ``S``, part ``P``) with the
columns ``user_id``, ``rank`` (1 = best), ``item_id`` (original ids, of the catalogue's type: see
``serving/item_ids.py``) and ``score`` (float32), sorted by user then rank; read them all with
``polars.scan_parquet("OUT_DIR/part-*.parquet")``. Every input user appears in exactly one part
(``plan.py``), with ``k`` rows or fewer (``scoring.py``). Each part file holds its counts in its
parquet metadata (``PART_METADATA_KEY``), read back when resuming.

Last, the job writes ``manifest.json`` (``manifest-SSSSS-of-NNNNN.json`` for one shard of several):
the model (directory, size, number of items, its ``source``, the sha256 of its manifest), the input
(path, shape, columns, sha256), ``k``, ``exclude_seen``, the shard, the counts (``users``,
``fallback_users``, ``unknown_items_skipped``, ``rows``, ``parts``) and each part's users, rows and
sha256. The manifest is written after every part, so **its presence means the job finished**.

Staging
-------
When there is more than one part, one streaming polars pass (a join with the user-to-part table,
sunk with ``PartitionBy``) splits this shard's rows into a staging directory ``OUT_DIR/.staging-SSSSS``
with one hive partition per part, from which each part is then read alone. Its record
``.staging-SSSSS.json``, the job it was split for, is written once it is complete and removed before
it is deleted; the directory is deleted at the end.

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

One run per shard at a time
---------------------------
While it writes, a run holds ``OUT_DIR/.lock-SSSSS-of-NNNNN`` with ``fcntl.flock``; a second run of
the same shard into the same ``OUT_DIR`` stops at once with one line (before reading its input when
the first already holds the lock). The system releases the lock when the process ends, killed or
not, so a lock file is never stale and is left in place. (On a network file system, Linux's NFS
client implements ``flock`` with NFS locks, which work across machines.) ``--out`` is checked
first: a file, a place inside a file, or a directory this process cannot write into stops the job
before the input is read; a disk that fills up midway stops it with one line (``cannot write there:
No space left on device``), and the rerun resumes.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

try:
    import fcntl
except ImportError:  # not POSIX: no lock; run each shard in one process at a time
    fcntl = None

from recsys.atomic import FileLock, atomic_directory, atomic_file, check_writable, write_json_atomically
from recsys.export_dir import MANIFEST, sha256_of
from serving.candidates.errors import CandidatesError

log = logging.getLogger(__name__)

FORMAT = "serving.candidates/1"
#: key of the per-part counts in each part file's parquet metadata (read back when resuming)
PART_METADATA_KEY = "serving.candidates.counts"
FALLBACK = "the k most popular items of the training data, scored by their training counts"
#: the part of each user (the plan's assignment) and of each staged row (the staging's hive key)
PART_COLUMN = "__part"

#: every name a job writes into ``--out``; anything else there is someone else's
_OWN_NAME = re.compile(
    r"part-\d{5}-\d{5}\.parquet|manifest(-\d{5}-of-\d{5})?\.json|\.(job|lock)-\d{5}-of-\d{5}(\.json)?"
    r"|\.staging-\d{5}(\.tmp|\.json)?|\..+\.tmp"
)


@dataclass(frozen=True)
class OutputDir:
    """The files one shard of a job owns in ``--out`` (``path``), and every step that touches them."""

    path: Path
    shard: tuple[int, int]

    @property
    def tag(self) -> str:
        """``SSSSS``: the shard's index, as the part and staging names spell it."""
        return f"{self.shard[0]:05d}"

    @property
    def _shard_name(self) -> str:
        return f"{self.shard[0]:05d}-of-{self.shard[1]:05d}"

    @property
    def manifest_path(self) -> Path:
        return self.path / (MANIFEST if self.shard[1] == 1 else f"manifest-{self._shard_name}.json")

    @property
    def job_path(self) -> Path:
        """The job record: what a rerun into this ``--out`` must match."""
        return self.path / f".job-{self._shard_name}.json"

    @property
    def lock_path(self) -> Path:
        return self.path / f".lock-{self._shard_name}"

    @property
    def staging(self) -> Path:
        return self.path / f".staging-{self.tag}"

    @property
    def staged(self) -> Path:
        """The record of the staging directory: the job it was split for."""
        return self.path / f".staging-{self.tag}.json"

    def part_path(self, part: int) -> Path:
        return self.path / f"part-{self.tag}-{part:05d}.parquet"

    # -- before the input is read ---------------------------------------------------------------

    def check_can_write(self) -> None:
        """Fail at once, before the model is loaded and the input read, when ``--out`` cannot be
        written or another run of this shard writes into it."""
        check_writable(self.path)
        if fcntl is None or not self.lock_path.is_file():
            return
        with open(self.lock_path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._running() from None

    def check_resumable(self, job: dict[str, Any]) -> None:
        """Refuse a directory that holds other files, another sharding, or this shard of another job."""
        if not self.path.is_dir():
            return
        foreign = sorted(p.name for p in self.path.iterdir() if not _OWN_NAME.fullmatch(p.name))
        if foreign:
            raise CandidatesError(
                f"--out {self.path} holds files this job did not write ({', '.join(foreign[:5])}); "
                "use an empty or new directory"
            )
        n = self.shard[1]
        others = sorted(p.name for p in self.path.glob(".job-*.json") if not p.name.endswith(f"-of-{n:05d}.json"))
        if others:
            raise CandidatesError(
                f"--out {self.path} holds output split into another number of shards ({others[0]}); use a new --out"
            )
        if self.job_path.is_file():
            try:
                previous = json.loads(self.job_path.read_text())
            except ValueError:
                raise CandidatesError(
                    f"{self.job_path}: not readable, so the output there cannot be resumed; use a new --out"
                ) from None
            changed = [key for key in job if previous.get(key) != job[key]]
            if changed:
                key = changed[0]
                raise CandidatesError(
                    f"--out {self.path} holds output of a different job ({key}: {previous.get(key)!r} there, "
                    f"{job[key]!r} now); use a new --out or delete that directory"
                )

    # -- while writing -------------------------------------------------------------------------

    @contextmanager
    def one_run_at_a_time(self) -> Iterator[None]:
        """Hold the lock file of this shard while writing (:class:`recsys.atomic.FileLock`: the system
        releases it when the process ends, killed or not, so a lock is never stale); a second run fails at once."""
        lock = FileLock(self.lock_path)
        if not lock.acquire():
            raise self._running()
        try:
            yield
        finally:
            lock.release()

    def _running(self) -> CandidatesError:
        i, n = self.shard
        which = "" if n == 1 else f" of shard {i}/{n}"
        return CandidatesError(
            f"--out {self.path}: another run{which} is writing there (it holds {self.lock_path.name}); "
            "wait for it to end or use another --out"
        )

    def complete(self) -> bool:
        """True when the manifest exists and every part it lists is there, unchanged (else the
        manifest is removed, and so is a changed part, to be written again)."""
        if not self.manifest_path.is_file():
            return False
        try:
            listed = json.loads(self.manifest_path.read_text())["parts"]
            parts = [(self.path / entry["file"], entry["sha256"]) for entry in listed]
        except (ValueError, KeyError, TypeError):
            log.warning("%s cannot be read: writing the output again", self.manifest_path)
            self.manifest_path.unlink()
            return False
        for path, sha256 in parts:
            if not path.is_file() or sha256_of(path) != sha256:
                log.warning("%s is missing or changed since the manifest was written: regenerating it", path)
                path.unlink(missing_ok=True)
                self.manifest_path.unlink()
                return False
        return True

    def start_writing(self, job: dict[str, Any]) -> None:
        """Record the job and remove what an interrupted run left half-written."""
        _write_json(self.job_path, job)
        for leftover in self.path.glob(f".part-{self.tag}-*.tmp"):
            leftover.unlink()
        shutil.rmtree(self.path / f".staging-{self.tag}.tmp", ignore_errors=True)

    def finished_parts(self, num_parts: int) -> dict[int, dict[str, int]]:
        """Part -> counts of the parts already written whole (a part that cannot be read is removed)."""
        counts = {p: _part_counts(self.part_path(p)) for p in range(num_parts)}
        return {p: c for p, c in counts.items() if c is not None}

    def ensure_staged(self, job: dict[str, Any], shard_rows: pl.LazyFrame) -> None:
        """Split the shard's rows (with their part) into the staging directory, unless one whole and
        split for this job is there already (a staging directory is trusted or discarded, never patched)."""
        if self._staged_for(job):
            return
        self.discard_staging()
        log.info("splitting the input by part into %s", self.staging)
        # siblings=False: other shards, maybe on other hosts, write into the same directory
        with atomic_directory(self.staging, siblings=False) as tmp:
            shard_rows.sink_parquet(pl.PartitionBy(tmp, key=PART_COLUMN, include_key=False), mkdir=True)
        _write_json(self.staged, job)

    def _staged_for(self, job: dict[str, Any]) -> bool:
        """Whether the staging directory is there, whole, and was split for this job: its record is
        written only after it is complete, and removed before it is deleted."""
        if not (self.staging.is_dir() and self.staged.is_file()):
            return False
        try:
            return json.loads(self.staged.read_text()) == json.loads(json.dumps(job, default=str))
        except ValueError:
            return False

    def staged_part(self, part: int) -> pl.LazyFrame:
        """The input rows of one part, read back from the staging directory."""
        return pl.scan_parquet(self.staging, hive_partitioning=True).filter(pl.col(PART_COLUMN) == part)

    def discard_staging(self) -> None:
        self.staged.unlink(missing_ok=True)  # first: a half-deleted staging directory is never trusted
        shutil.rmtree(self.staging, ignore_errors=True)

    def write_part(self, frame: pl.DataFrame, counts: dict[str, int], part: int) -> None:
        """Write one part file whole (temporary name, then rename), its counts in its metadata."""
        _write_part(frame, counts, self.part_path(part))

    def finish(self, description: dict[str, Any], counts: dict[int, dict[str, int]], num_parts: int) -> dict[str, Any]:
        """Write the manifest (``description`` of the job, then the counts and the parts) once every
        part is written, drop the staging directory; return the manifest."""
        missing = [p for p in range(num_parts) if p not in counts]
        if missing:
            raise RuntimeError(f"parts {missing[:5]} of {self.path} were not written")
        parts = [
            {"file": self.part_path(p).name, **counts[p], "sha256": sha256_of(self.part_path(p))} for p in range(num_parts)
        ]
        keys = ("users", "fallback_users", "unknown_items_skipped", "rows")
        total = {key: sum(part[key] for part in parts) for key in keys}
        manifest = {**description, "counts": {**total, "parts": num_parts}, "parts": parts}
        _write_json(self.manifest_path, manifest)
        self.discard_staging()
        return manifest


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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_json_atomically(path, data, indent=2, sort_keys=True, default=str)
