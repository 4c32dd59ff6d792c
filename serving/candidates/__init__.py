"""``python -m serving.candidates``: the nightly batch job, histories in, top-K candidates out.

    python -m serving.candidates --model EXPORT_DIR --input HISTORIES --k 100 --out OUT_DIR

``EXPORT_DIR`` is one size written by ``python -m recsys.export`` (e.g. ``exports/d64``): the job
runs at the size the team chose by picking that directory. ``HISTORIES`` is an interaction log or a
history table (``plan.py``); ``OUT_DIR`` receives parquet part files ``part-SSSSS-PPPPP.parquet``
(``user_id``, ``rank``, ``item_id``, ``score``) and, last, ``manifest.json``, whose presence means
the job finished (``store.py``). Bad input is reported before anything is written; a killed job
resumes where it stopped when run again, and running it twice gives the same files.

Many machines, many GPUs
------------------------
``--shard i/n`` (0 <= i < n) processes only the users whose hash falls in shard ``i`` of ``n``; the
``n`` shards together cover every user exactly once, on any machine (``plan.py``). With any job
runner (Slurm array, Kubernetes indexed job, a shell loop), start ``n`` tasks that each run
``--shard $INDEX/n``, all writing into the same ``OUT_DIR`` on a shared file system (names never
collide) or into their own directories; the job is complete when all ``n`` manifests exist. On one
machine with several GPUs, run one process per GPU: ``CUDA_VISIBLE_DEVICES=$i python -m
serving.candidates ... --shard $i/$n``. The encoder runs on the GPU when one is present
(``--device``) and ``serving.load`` uses the faiss GPU index when the GPU build of faiss is
installed. (Lightning's ``Trainer.predict`` with a ``BasePredictionWriter`` writing one file per
rank is another way to fan out over GPUs; this job does not need it, since shards are independent.)
``serving.ray_candidates`` runs the same job with the parts scored on a pool of Ray actors.

The package, one idea a module
------------------------------
- ``plan.py``: the input (:class:`InputSpec`), the stable user hash, shards and parts, the
  validation pass, and :func:`prepare_job`: what to compute, decided before anything is scored;
- ``store.py``: the output directory (:class:`OutputDir`): part files, staging, the lock (one run
  per shard at a time), resuming, the manifest;
- ``scoring.py``: :class:`PartScorer`, the one way both runners score a part;
- ``job.py``: :func:`run_job`, the steps every runner shares, and the local runner
  :func:`generate_candidates` with its writer thread;
- ``command.py``: :func:`main`, the command line (``__main__.py`` answers ``--help`` first).

The names below are imported on first use, so that ``--help`` answers before torch is imported.
"""

from __future__ import annotations

import importlib

#: each public name -> the module of this package that defines it
_HOMES = {
    "CandidatesError": "errors",
    "InputSpec": "plan",
    "PreparedJob": "plan",
    "parse_shard": "plan",
    "prepare_job": "plan",
    "resolve_device": "plan",
    "stable_user_hash": "plan",
    "FALLBACK": "store",
    "FORMAT": "store",
    "OutputDir": "store",
    "PART_METADATA_KEY": "store",
    "PartScorer": "scoring",
    "generate_candidates": "job",
    "run_job": "job",
    "job_options": "command",
    "main": "command",
    "summary_line": "command",
    "time_column_of": "command",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
