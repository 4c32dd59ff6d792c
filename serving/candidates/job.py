"""Running a candidate job: the steps every runner shares, and the local runner with its writer thread.

:func:`run_job` is the part of a run that does not depend on where the parts are scored: take the
lock, stop at once when the output is already complete, record the job, skip the parts already
written, and write the manifest once every part is. The runner hands it the writing of the parts
left: :func:`generate_candidates` scores them here, one after another with :class:`PartScorer`,
and hands each to a writer thread, which writes it while the next part is read and scored;
``serving.ray_candidates`` scores them on a pool of Ray actors. A progress bar shows users per
second; the job ends with a one-line summary.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl

from recsys.atomic import reported_write_failures
from recsys.runtime import reuse_freed_memory
from serving.candidates.plan import PreparedJob, prepare_job
from serving.candidates.scoring import PartScorer
from serving.candidates.store import PART_COLUMN
from serving.sized_model import SizedRecommender

log = logging.getLogger(__name__)

#: writes the parts it is given (not yet written) whole; returns part -> counts
PartsWriter = Callable[[list[int]], dict[int, dict[str, int]]]


def run_job(prepared: PreparedJob, write_parts: PartsWriter, name: str, started: float) -> dict[str, Any]:
    """Write what ``prepared`` still lacks, by one run at a time, the parts by ``write_parts``; return
    the manifest plus ``elapsed_s`` (since ``started``; the file itself holds no timings, so that
    reruns give identical files). ``name`` starts the summary line logged at the end."""
    out = prepared.out
    # Past this point the input and options are valid: output may be written, by one run at a time.
    out.path.mkdir(parents=True, exist_ok=True)
    with out.one_run_at_a_time(), reported_write_failures(out.path):
        if out.complete():
            out.discard_staging()
            log.info("%s: already complete, nothing to do", out.manifest_path)
            return {**json.loads(out.manifest_path.read_text()), "elapsed_s": time.perf_counter() - started}
        out.start_writing(prepared.record)
        counts = out.finished_parts(prepared.num_parts)
        todo = [p for p in range(prepared.num_parts) if p not in counts]
        if todo:
            counts.update(write_parts(todo))
        manifest = out.finish(prepared.description(), counts, prepared.num_parts)
    elapsed = time.perf_counter() - started
    c = manifest["counts"]
    log.info(
        "%s: %d users (%d with the popular fallback, %d unknown item ids skipped), k=%d, %d rows in %d parts, "
        "%.1f s (%.0f users/s) -> %s",
        name, c["users"], c["fallback_users"], c["unknown_items_skipped"], prepared.k, c["rows"], c["parts"], elapsed,
        c["users"] / max(elapsed, 1e-9), out.manifest_path,
    )
    manifest["elapsed_s"] = elapsed  # for the caller only; the file stays free of timings
    return manifest


def generate_candidates(
    model: str | Path | SizedRecommender,
    input_path: str | Path,
    out: str | Path,
    k: int = 100,
    *,
    progress: bool = True,
    stage_seconds: dict[str, float] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Write the top-``k`` candidates of every user of ``input_path`` (in ``shard``) to ``out``.

    ``model`` is an export directory, or one already loaded with :func:`serving.load` (then
    ``device`` is the one it was loaded on). ``options`` are those of :func:`prepare_job`, with its
    defaults: ``user_col``, ``item_col``, ``time_col``, ``history_col``, ``shard``, ``batch_size``,
    ``exclude_seen``, ``users_per_part``, ``device``. Returns the manifest written to ``out``, plus
    ``elapsed_s`` (the file itself holds no timings, so that reruns give identical files). See the
    package docstring for the formats, resuming and sharding. Everything that can be checked before
    writing is checked first (the whole input is read once for that), so bad input leaves ``out``
    untouched. ``stage_seconds``, when given, receives the wall time spent reading parts into
    histories (``"read"``) and writing part files (``"write"``, in a thread overlapping the next
    part); the model's own ``stage_seconds`` hold encoding and search. The process keeps freed memory
    for reuse (:func:`recsys.runtime.reuse_freed_memory`): every batch allocates the same large score
    and state buffers again.
    """
    started = time.perf_counter()
    reuse_freed_memory()
    prepared = prepare_job(model, input_path, out, k, **options)
    stages = {} if stage_seconds is None else stage_seconds
    return run_job(prepared, lambda todo: _write_here(prepared, todo, progress, stages), "candidates", started)


def _write_here(
    prepared: PreparedJob, todo: list[int], progress: bool, stage_seconds: dict[str, float]
) -> dict[int, dict[str, int]]:
    """Score the parts in ``todo`` in this process, one after another, and write them in one writer
    thread: part p is written while part p + 1 is scored. Each part file is still written whole under
    a temporary name, and a failed write stops the job at the next part."""
    from tqdm.auto import tqdm

    out, num_parts = prepared.out, prepared.num_parts
    users_left = int(prepared.assign[PART_COLUMN].is_in(todo).sum())
    log.info(
        "%d users in shard %d/%d (of %d users, %d rows): %d of %d parts to write",
        len(prepared.assign), *out.shard, len(prepared.users), prepared.num_rows, len(todo), num_parts,
    )
    shard_rows = prepared.shard_rows()
    if num_parts > 1:
        out.ensure_staged(prepared.record, shard_rows)
    scorer = PartScorer(prepared.model, prepared.spec, prepared.k, prepared.batch_size, prepared.exclude_seen)
    stage_seconds.update(read=0.0, write=0.0)

    def write(frame: pl.DataFrame, counts: dict[str, int], part: int) -> dict[str, int]:
        started = time.perf_counter()
        out.write_part(frame, counts, part)
        stage_seconds["write"] += time.perf_counter() - started
        return counts

    counts: dict[int, dict[str, int]] = {}
    with (
        tqdm(total=len(prepared.assign), initial=len(prepared.assign) - users_left, unit="users",
             desc=f"candidates {out.shard[0]}/{out.shard[1]}", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="candidates-writer") as writer,
    ):
        written: dict[int, Future] = {}
        for p in todo:
            frame, part_counts = scorer.score(out.staged_part(p) if num_parts > 1 else shard_rows, bar)
            written[p] = writer.submit(write, frame, part_counts, p)
            for done in [q for q, future in written.items() if future.done()]:
                counts[done] = written.pop(done).result()  # a failed write stops the job here
        counts.update({q: future.result() for q, future in written.items()})
    stage_seconds["read"] = scorer.read_seconds
    return counts
