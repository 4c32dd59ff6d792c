"""Benchmark: wall time and peak memory of ``prepare`` on MovieLens-1M and on a streamed synthetic log.

    .venv/bin/python bench/prepare.py [--events 10000000] [--repeats 3] [--workdir DIR]

Each measurement runs in a fresh child process, so its peak resident memory (``ru_maxrss``) is its
own; the child also reports its memory right before the work (interpreter + imports), so the
pipeline's own footprint is the difference. For the synthetic log, "one copy" is the log's size as
three int64 columns (user, item, timestamp), the unit for "a few copies in memory". Prints a table
and writes ``bench/results/prepare.json`` with the machine and thread counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recsys.atomic import write_json_atomically

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "bench" / "results" / "prepare.json"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_config(events: int):
    from recsys.data.synthetic import SyntheticConfig

    mean_history = 30
    return SyntheticConfig(
        num_users=events // mean_history, num_items=max(500, events // 100), num_clusters=200,
        mean_history=mean_history, vector_dim=32, seed=0, chunk_users=20_000,
    )


# -- jobs, each run inside its own child process ---------------------------------------------------------


def job_ml1m(workdir: Path, events: int) -> dict:
    from recsys.data import prepare

    before = current_rss_mb()
    start = time.perf_counter()
    prepare(DATASETS / "ml-1m" / "interactions.parquet", workdir / "ml-1m", items=DATASETS / "ml-1m" / "items.csv",
            time_col="seq", category_cols=["genres"], cache_dir=None, overwrite=True)
    seconds = time.perf_counter() - start
    stats = json.loads((workdir / "ml-1m" / "stats.json").read_text())
    return {"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(), "events": stats["interactions"]}


def job_generate(workdir: Path, events: int) -> dict:
    from recsys.data import write_synthetic

    before = current_rss_mb()
    start = time.perf_counter()
    files = write_synthetic(synthetic_config(events), workdir / "synthetic-raw")
    seconds = time.perf_counter() - start
    import polars as pl

    rows = pl.scan_parquet(files.interactions).select(pl.len()).collect().item()
    return {"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(), "events": rows,
            "file_mb": files.interactions.stat().st_size / 2**20}


def job_prepare_synthetic(workdir: Path, events: int) -> dict:
    from recsys.data import prepare
    from recsys.data.synthetic import SyntheticFiles

    raw = workdir / "synthetic-raw"
    files = SyntheticFiles(raw / "interactions.parquet", raw / "items.parquet", raw / "vectors.parquet")
    before = current_rss_mb()
    start = time.perf_counter()
    prepare(out=workdir / "synthetic", **files.prepare_kwargs(), cache_dir=None, overwrite=True)
    seconds = time.perf_counter() - start
    stats = json.loads((workdir / "synthetic" / "stats.json").read_text())
    rows = stats["raw"]["rows"]
    return {"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(), "events": rows,
            "kept_events": stats["interactions"], "one_copy_mb": rows * 3 * 8 / 2**20}


JOBS = {"ml1m": job_ml1m, "generate": job_generate, "prepare_synthetic": job_prepare_synthetic}


def run_child(job: str, workdir: Path, events: int) -> dict:
    command = [sys.executable, __file__, "--child", job, "--workdir", str(workdir), "--events", str(events)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import polars as pl
    import torch

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "polars": pl.__version__,
        "polars_threads": pl.thread_pool_size(), "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],  # the machine is shared: a high load means noisy times
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="size of the synthetic log")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is reported)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--child", choices=sorted(JOBS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(JOBS[args.child](args.workdir, args.events)))
        return

    load_at_start = os.getloadavg()[0]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        plan = [("generate", 1), ("prepare_synthetic", args.repeats)]
        if (DATASETS / "ml-1m").is_dir():
            plan.insert(0, ("ml1m", args.repeats))
        else:
            print(f"MovieLens-1M not found under {DATASETS}: skipped")
        results = {}
        for job, runs in plan:
            measured = [run_child(job, workdir, args.events) for _ in range(runs)]
            summary = {k: v for k, v in measured[0].items() if k not in ("seconds", "peak_rss_mb", "rss_before_mb")}
            summary.update({
                "runs": runs,
                "seconds_median": statistics.median(m["seconds"] for m in measured),
                "seconds_all": [round(m["seconds"], 3) for m in measured],
                "peak_rss_mb": max(m["peak_rss_mb"] for m in measured),
                "rss_before_mb": statistics.median(m["rss_before_mb"] for m in measured),
            })
            summary["own_peak_mb"] = summary["peak_rss_mb"] - summary["rss_before_mb"]
            if "one_copy_mb" in summary:
                summary["own_peak_in_copies"] = summary["own_peak_mb"] / summary["one_copy_mb"]
            results[job] = summary
            print(f"{job:>18}: {summary['seconds_median']:7.2f} s (median of {runs})   peak RSS {summary['peak_rss_mb']:7.0f} MB"
                  f"   own {summary['own_peak_mb']:7.0f} MB   events {summary['events']:,}"
                  + (f"   = {summary['own_peak_in_copies']:.1f} copies of the log" if "own_peak_in_copies" in summary else ""))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {"benchmark": "prepare", "events": args.events, "machine": {**machine(), "load_average_1m_at_start": load_at_start},
              "results": results,
              "note": "wall time of prepare() only (imports excluded); peak RSS of the child process; "
                      "own = peak minus RSS right before the work; one copy = the raw log as 3 int64 columns"}
    write_json_atomically(RESULTS, report, indent=2)
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
