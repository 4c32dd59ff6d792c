"""Overhead of the Ray Data candidate job against the single-process job, at 10^5 users.

The same synthetic log and export as ``bench/candidates.py`` (its ``write_log`` and
``make_exports``: an untrained nested-LRU model, Zipf-popular items, 1 + geometric(mean 19) events
per user), one size, k=100, seen items excluded. Both jobs write the same parts (``--users-per-part``)
from the same input; each is run ``--repeats`` times into a fresh directory, alternating, and the
median is kept:

- ``single``: ``serving.candidates.generate_candidates`` in this process (torch's threads: all CPUs);
- ``ray``: ``serving.ray_candidates.generate_candidates_ray`` with ``--actors`` model actors on a local
  Ray instance of all CPUs (one CPU, so one torch thread, per actor), started once before the timings
  (``ray_init_s`` is reported apart: a cluster is started once for many jobs).

``overhead_s`` = ray - single; the Ray job also pays the actors' start (each imports torch and loads
the model) and always splits the input into staging, which the single-process job skips for one part.
Both outputs are checked: the same users, ranks and items.

Run under ``flock /tmp/bench.lock``; the load average is recorded with each run. Quick look:
``python bench/ray_candidates.py --users 5000 --repeats 1``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

import ray

from candidates import make_exports, write_log  # (bench/candidates.py)
from recsys.atomic import write_json_atomically
from serving.candidates import generate_candidates
from serving.ray_candidates import _start_ray, generate_candidates_ray

logger = logging.getLogger("bench.ray_candidates")


def _table(out: Path) -> pl.DataFrame:
    return pl.read_parquet(str(out / "part-*.parquet")).select("user_id", "rank", "item_id").sort("user_id", "rank")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--users-per-part", type=int, default=25_000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ray_candidates.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("serving").setLevel(logging.WARNING)

    runs = {"single": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="bench-ray-candidates-") as tmp:
        work = Path(tmp)
        export = make_exports(args.items, (args.size,), work / "exports")[args.size]
        log_path = work / "log.parquet"
        events = write_log(log_path, args.users, args.items)
        started = time.perf_counter()
        _start_ray(ray, None, None)
        ray_init_s = time.perf_counter() - started
        common = dict(users_per_part=args.users_per_part, device="cpu", progress=False)
        tables = {}
        for r in range(args.repeats):
            for name in ("single", "ray"):
                out = work / f"out-{name}-{r}"
                load = os.getloadavg()
                if name == "single":
                    manifest = generate_candidates(export, log_path, out, args.k, **common)
                else:
                    manifest = generate_candidates_ray(export, log_path, out, args.k, actors=args.actors, **common)
                runs[name].append({"seconds": manifest["elapsed_s"], "load_average_before": load,
                                   "load_average_after": os.getloadavg()})
                logger.info("%s run %d: %.1f s (load %.1f)", name, r, manifest["elapsed_s"], load[0])
                tables[name] = _table(out)
                shutil.rmtree(out)
        same = tables["single"].equals(tables["ray"])
        ray.shutdown()

    single = statistics.median(run["seconds"] for run in runs["single"])
    ray_s = statistics.median(run["seconds"] for run in runs["ray"])
    result = {
        "benchmark": "Ray Data candidate job against the single-process job (bench/ray_candidates.py)",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "polars": pl.__version__, "ray": ray.__version__,
                    "load_average_at_end": os.getloadavg()},
        "argv": sys.argv[1:],
        "users": args.users, "events": events, "items": args.items, "size": args.size, "k": args.k,
        "users_per_part": args.users_per_part, "parts": -(-args.users // args.users_per_part), "actors": args.actors,
        "ray_init_s": ray_init_s,
        "single_s": single, "ray_s": ray_s, "overhead_s": ray_s - single, "ray_over_single": ray_s / single,
        "single_users_per_s": args.users / single, "ray_users_per_s": args.users / ray_s,
        "same_candidates": same,
        "runs": runs,
        "note": "medians of `repeats` runs of each job, alternating, on CPU; ray_init_s (a local Ray instance) is "
        "not in ray_s; the machine is shared: read the load averages",
    }
    print(f"single {single:.1f} s, ray {ray_s:.1f} s ({args.actors} actors), overhead {ray_s - single:+.1f} s, "
          f"ray init {ray_init_s:.1f} s, same candidates: {same}")
    print(f"wrote {write_json_atomically(args.out, result, indent=2)}")


if __name__ == "__main__":
    main()
