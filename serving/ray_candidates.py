"""``python -m serving.ray_candidates``: the batch candidate job of ``serving.candidates`` on Ray Data.

    pip install -e .[ray]
    python -m serving.ray_candidates --model EXPORT_DIR --input HISTORIES --k 100 --out OUT_DIR --actors 4

Same input, options, output files (``part-SSSSS-PPPPP.parquet``, ``manifest.json``), lock, job record
and resuming rules as ``python -m serving.candidates`` (docs/serving.md), whose steps this module
reuses (``prepare_job``, then ``run_job`` around the writing of the parts); only the scoring of the
parts, by the same ``PartScorer``, is spread over a pool of Ray actors:

1. on the driver, as the single-process job does: check the options, ``--out`` and the model, read
   and validate the whole input, list its users and assign them to parts (stable hash), take the
   lock ``.lock-SSSSS-of-NNNNN``, record the job, and split this shard's rows by part into the
   staging directory ``.staging-SSSSS`` (always, even for one part: the actors read their part there);
2. **read**: a Ray dataset of the parts not yet written (one row per part);
3. **map_batches** over a pool of ``--actors`` model actors (``ActorPoolStrategy``; each holds the model
   once, on a GPU when the cluster has GPUs: ``num_gpus`` per actor), one part per batch: read the
   part's rows from staging, build histories, encode and search (``PartScorer``, as the
   single-process job does), and **write** the part file whole (temporary name, then rename, by
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

from recsys.errors import exit_code_of  # noqa: E402
from serving.candidates import (  # noqa: E402
    CandidatesError,
    InputSpec,
    OutputDir,
    PartScorer,
    PreparedJob,
    job_options,
    prepare_job,
    resolve_device,
    run_job,
    summary_line,
)
from serving.sized_model import SizedRecommender  # noqa: E402

__all__ = ["generate_candidates_ray", "main"]

log = logging.getLogger("serving.ray_candidates")

#: for the tests, ``(marker file, part)``: the first actor to reach that part kills its own process
#: (once: it creates the marker file first), so that Ray restarts the actor and retries the part
_ACTOR_DIES_AT: tuple[str, int] | None = None


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise CandidatesError(
            "serving.ray_candidates needs Ray Data: pip install -e .[ray] (or use python -m serving.candidates)"
        ) from None
    return ray


class _PartActor:
    """A model actor: loads the export once, then scores (:class:`PartScorer`) and writes whole parts,
    one per batch."""

    def __init__(self, model_dir: str, device: str, spec: InputSpec, k: int, batch_size: int, exclude_seen: bool,
                 out: OutputDir, dies_at: tuple[str, int] | None):
        import torch

        from recsys.runtime import reuse_freed_memory

        reuse_freed_memory()  # as the local job does (serving/candidates/job.py)
        if device == "cuda" and not torch.cuda.is_available():
            device = "cpu"
        self.scorer = PartScorer(SizedRecommender(model_dir, device=device), spec, k, batch_size, exclude_seen)
        self.out, self.dies_at = out, dies_at

    def __call__(self, batch: dict) -> dict:
        results = []
        for part in (int(p) for p in batch["part"]):
            self._maybe_die(part)
            frame, counts = self.scorer.score(self.out.staged_part(part))
            self.out.write_part(frame, counts, part)
            results.append(json.dumps(counts, sort_keys=True))
        return {"part": batch["part"], "counts": results}

    def _maybe_die(self, part: int) -> None:
        """The test hook ``_ACTOR_DIES_AT``: die on its part, if no actor has yet."""
        if self.dies_at is None or part != self.dies_at[1]:
            return
        try:
            fd = os.open(self.dies_at[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
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
    device: str = "auto",
    actors: int = 2,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """:func:`serving.candidates.generate_candidates` with the parts scored by a pool of Ray actors.

    Same arguments and ``options`` (``model`` is an export directory), plus ``actors`` (the pool
    size), and where Ray runs (``ray_address``, or a local instance of ``num_cpus`` CPUs). Returns
    the manifest written, plus ``elapsed_s``. ``device``: ``auto`` puts each actor on a GPU when the
    Ray cluster has GPUs (``num_gpus`` 1 per actor, or a share when there are more actors than GPUs).
    """
    started = time.perf_counter()
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
        raise CandidatesError(f"actors must be a positive integer, got {actors!r}")
    if device not in ("auto", "cpu"):
        resolve_device(device)  # the same message as the single-process job for a bad --device
    ray = _import_ray()
    # the driver only checks and writes the manifest: its copy of the model stays on the CPU
    prepared = prepare_job(model, input_path, out, k, **options, device="cpu")

    def write_parts(todo: list[int]) -> dict[int, dict[str, int]]:
        prepared.out.ensure_staged(prepared.record, prepared.shard_rows())  # always: the actors read their part there
        log.info("%d of %d parts to write with %d Ray actors", len(todo), prepared.num_parts, actors)
        return _score_parts(ray, prepared, todo, actors, device, ray_address, num_cpus, progress)

    return run_job(prepared, write_parts, "ray candidates", started)


def _score_parts(ray, prepared: PreparedJob, todo: list[int], actors: int, device: str, address: str | None,
                 num_cpus: int | None, progress: bool) -> dict[int, dict[str, int]]:
    """read -> map_batches(score + write, actor pool) over the parts in ``todo``; part -> counts."""
    _start_ray(ray, address, num_cpus)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    gpus = 0.0 if device == "cpu" else float(ray.cluster_resources().get("GPU", 0))
    gpus_per_actor = 0.0 if gpus == 0 else (1.0 if gpus >= actors else gpus / actors)
    parts = ray.data.from_items([{"part": p} for p in todo], override_num_blocks=len(todo))
    scored = parts.map_batches(
        _PartActor,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor or None,
        fn_constructor_kwargs={
            "model_dir": str(prepared.model.directory.resolve()), "device": "cuda" if gpus_per_actor else "cpu",
            "spec": prepared.spec, "k": prepared.k, "batch_size": prepared.batch_size,
            "exclude_seen": prepared.exclude_seen,
            "out": OutputDir(prepared.out.path.resolve(), prepared.out.shard), "dies_at": _ACTOR_DIES_AT,
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
