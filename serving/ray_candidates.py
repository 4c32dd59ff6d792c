"""``python -m serving.ray_candidates``: the batch candidate job of ``serving.candidates`` on Ray Data.

    pip install -e .[ray]
    python -m serving.ray_candidates --model EXPORT_DIR --input HISTORIES --k 100 --out OUT_DIR --actors 4

Same input, options, output files (``part-SSSSS-PPPPP.parquet``, ``manifest.json``), lock, job record
and resuming rules as ``python -m serving.candidates`` (docs/serving.md), which this module reuses
step by step; only the scoring of the parts is spread over a pool of Ray actors:

1. on the driver, as the single-process job does: check the options, ``--out`` and the model, read
   and validate the whole input, list its users and assign them to parts (stable hash), take the
   lock ``.lock-SSSSS-of-NNNNN``, record the job, and split this shard's rows by part into the
   staging directory ``.staging-SSSSS`` (always, even for one part: the actors read their part there);
2. **read**: a Ray dataset of the parts not yet written (one row per part);
3. **map_batches** over a pool of ``--actors`` model actors (``ActorPoolStrategy``; each holds the model
   once, on a GPU when the cluster has GPUs: ``num_gpus`` per actor), one part per batch: read the
   part's rows from staging, build histories, encode and search (the same code as the
   single-process job), and **write** the part file whole (temporary name, then rename, by
   ``recsys/atomic.py``) under its deterministic name; the batch returns the part's counts;
4. on the driver: the manifest, once every part is written, and the staging directory removed.

Exactly-once: a part's name, its users and their order depend only on the input, the model and the
options, and a part file appears only whole. Ray Data restarts a killed actor and retries its part
(``max_restarts`` / ``max_task_retries``); a part the dead actor had already renamed into place is
complete, and a retry writes the same bytes over it. If the driver dies, the rerun of the same
command skips the parts that exist and writes the rest. With the same ``--batch-size``, device and
library versions, a rerun gives **byte-identical** part files; against the single-process job the
users, ranks and items are identical and the scores equal up to float rounding (an actor uses one
thread by default and may sum in another order), which is why the part files are compared by
content, not bytes, across the two jobs.

Ray Data's own ``write_parquet`` is not used for the parts: its file names come from its block
layout, and the part files must carry this job's names and counts metadata.

Without ``--ray-address`` a local Ray instance is started with ``--num-cpus`` CPUs (all by default).
"""

from __future__ import annotations

import sys

from recsys.console import help_asked
from serving.cli import candidates_parser

_EXTRA_HELP = {
    "--actors": "model actors (the size of the Ray actor pool)",
    "--ray-address": "Ray cluster to join (ray.init address); default: start a local instance",
    "--num-cpus": "CPUs of the local Ray instance (null: all)",
}


def ray_candidates_parser(doc: str):
    parser = candidates_parser(doc)
    parser.prog = "python -m serving.ray_candidates"
    parser.add_argument("--actors", type=int, default=2, help=_EXTRA_HELP["--actors"])
    parser.add_argument("--ray-address", type=str, default=None, help=_EXTRA_HELP["--ray-address"])
    parser.add_argument("--num-cpus", type=int, default=None, help=_EXTRA_HELP["--num-cpus"])
    return parser


if __name__ == "__main__" and help_asked(sys.argv[1:]):
    ray_candidates_parser(__doc__).parse_args()

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from recsys.atomic import reported_write_failures  # noqa: E402
from recsys.errors import exit_code_of  # noqa: E402
from serving.candidates import (  # noqa: E402
    CandidatesError,
    _complete,
    _discard_staging,
    _Job,
    _one_run_at_a_time,
    _resolve_device,
    _shard_frame,
    ensure_staged,
    finish,
    finished_parts,
    job_options,
    prepare_job,
    staged_part,
    start_writing,
    summary_line,
    write_part,
)
from serving.sized_model import SizedRecommender  # noqa: E402

__all__ = ["generate_candidates_ray", "main"]

log = logging.getLogger("serving.ray_candidates")


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise CandidatesError(
            "serving.ray_candidates needs Ray Data: pip install -e .[ray] (or use python -m serving.candidates)"
        ) from None
    return ray


class _PartScorer:
    """A model actor: loads the export once, then scores and writes whole parts, one per batch."""

    def __init__(self, model_dir: str, spec, out: str, k: int, shard, batch_size: int, exclude_seen: bool,
                 users_per_part: int, device: str, fail_once: str | None = None, fail_part: int | None = None):
        import torch

        from recsys.runtime import reuse_freed_memory

        reuse_freed_memory()  # as the local job does (serving/candidates.py)
        if device == "cuda" and not torch.cuda.is_available():
            device = "cpu"
        model = SizedRecommender(model_dir, device=device)
        self.runner = _Job(model, spec, Path(out), k, tuple(shard), batch_size, exclude_seen, users_per_part)
        self.fail_once, self.fail_part = fail_once, fail_part

    def __call__(self, batch: dict) -> dict:
        results = []
        for part in (int(p) for p in batch["part"]):
            self._maybe_die(part)
            source = staged_part(self.runner, part).collect()
            users = source[self.runner.spec.user_col].unique().sort()  # every user of the part has a row
            frame, counts = self.runner.compute_part(users, source.lazy())
            write_part(frame, counts, self.runner.part_path(part))
            results.append(json.dumps(counts, sort_keys=True))
        return {"part": batch["part"], "counts": results}

    def _maybe_die(self, part: int) -> None:
        """For the tests: the first actor to reach ``fail_part`` kills its own process (once)."""
        if self.fail_once is None or part != self.fail_part:
            return
        try:
            fd = os.open(self.fail_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)


def _start_ray(ray, address: str | None, num_cpus: int | None) -> None:
    """Join ``address`` or start a local instance whose workers import this same code."""
    if ray.is_initialized():
        return
    if address is None:
        # local workers inherit the environment: make them import the serving package the driver runs
        root = str(Path(__file__).resolve().parents[1])
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False)


def generate_candidates_ray(
    model: str | Path,
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
    actors: int = 2,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    _fail_once: str | Path | None = None,
    _fail_part: int | None = None,
) -> dict[str, Any]:
    """:func:`serving.candidates.generate_candidates` with the parts scored by a pool of Ray actors.

    Same arguments (``model`` is an export directory), plus ``actors`` (the pool size), and where
    Ray runs (``ray_address``, or a local instance of ``num_cpus`` CPUs). Returns the manifest
    written, plus ``elapsed_s``. ``device``: ``auto`` puts each actor on a GPU when the Ray cluster
    has GPUs (``num_gpus`` 1 per actor, or a share when there are more actors than GPUs).
    """
    started = time.perf_counter()
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
        raise CandidatesError(f"actors must be a positive integer, got {actors!r}")
    if device not in ("auto", "cpu"):
        _resolve_device(device)  # the same message as the single-process job for a bad --device
    ray = _import_ray()
    # the driver only checks and writes the manifest: its copy of the model stays on the CPU
    prepared = prepare_job(
        model, input_path, out, k, user_col=user_col, item_col=item_col, time_col=time_col, history_col=history_col,
        shard=shard, batch_size=batch_size, exclude_seen=exclude_seen, users_per_part=users_per_part, device="cpu",
    )
    runner, job, num_parts = prepared.runner, prepared.job, prepared.num_parts
    out = runner.out
    out.mkdir(parents=True, exist_ok=True)
    with _one_run_at_a_time(out, runner.shard), reported_write_failures(out):
        if _complete(runner.manifest_path, out):
            _discard_staging(runner)
            log.info("%s: already complete, nothing to do", runner.manifest_path)
            return {**json.loads(runner.manifest_path.read_text()), "elapsed_s": time.perf_counter() - started}
        start_writing(runner, job)
        counts = finished_parts(runner, num_parts)
        todo = [p for p in range(num_parts) if p not in counts]
        if todo:
            ensure_staged(runner, job, _shard_frame(runner, prepared.frame, prepared.users, prepared.assign))
            log.info("%d of %d parts to write with %d Ray actors", len(todo), num_parts, actors)
            counts.update(_score_parts(ray, runner, todo, actors, device, ray_address, num_cpus, progress,
                                       _fail_once, _fail_part))
        manifest = finish(runner, job, counts, num_parts)
    c = manifest["counts"]
    elapsed = time.perf_counter() - started
    log.info("ray candidates: %d users, %d rows in %d parts, %.1f s -> %s",
             c["users"], c["rows"], c["parts"], elapsed, runner.manifest_path)
    manifest["elapsed_s"] = elapsed
    return manifest


def _score_parts(ray, runner: _Job, todo: list[int], actors: int, device: str, address: str | None,
                 num_cpus: int | None, progress: bool, fail_once, fail_part) -> dict[int, dict[str, int]]:
    """read -> map_batches(score + write, actor pool) over the parts in ``todo``; part -> counts."""
    _start_ray(ray, address, num_cpus)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    gpus = 0.0 if device == "cpu" else float(ray.cluster_resources().get("GPU", 0))
    gpus_per_actor = 0.0 if gpus == 0 else (1.0 if gpus >= actors else gpus / actors)
    parts = ray.data.from_items([{"part": p} for p in todo], override_num_blocks=len(todo))
    scored = parts.map_batches(
        _PartScorer,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor or None,
        fn_constructor_kwargs={
            "model_dir": str(runner.model.directory.resolve()), "spec": runner.spec, "out": str(runner.out.resolve()),
            "k": runner.k, "shard": runner.shard, "batch_size": runner.batch_size,
            "exclude_seen": runner.exclude_seen, "users_per_part": runner.users_per_part,
            "device": "cuda" if gpus_per_actor else "cpu",
            "fail_once": None if fail_once is None else str(fail_once), "fail_part": fail_part,
        },
    )
    done = {int(row["part"]): json.loads(row["counts"]) for row in scored.take_all()}
    # counts as the part files record them (a retried part may be reported twice: same values)
    return {p: done[p] for p in todo if p in done}


def main(argv: list[str] | None = None) -> int:
    args = ray_candidates_parser(__doc__).parse_args(argv)
    options = job_options(args)

    def run() -> None:
        manifest = generate_candidates_ray(
            args.model, args.input, args.out, args.k, **options,
            actors=args.actors, ray_address=args.ray_address, num_cpus=args.num_cpus,
        )
        print(summary_line(manifest, args.out))

    return exit_code_of(run)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    sys.exit(main())
