"""Batch candidate generation benchmark (bench/README.md §4): users per second per size, against the floor.

For each catalogue size (10^5 and 10^6 items) and each Matryoshka size ``s``, the whole job
(``serving.candidates.generate_candidates``, k=100, seen items excluded, the export's default
retriever: exact torch search) runs over a synthetic interaction log, and its users per second are
set against the floor set by arithmetic: exact top-k over ``N`` items costs at least ``2 * N * s``
flops per user, so at the machine's float32 matrix-product rate ``R`` (measured in the same run, a
square torch matmul) no job can do more than ``R / (2 N s)`` users per second. The floor counts
search flops only: encoding the histories (a 2-block LRU, about ``40 s^2`` flops per position) is
extra work of the same order at 10^5 items.

Each row records the split of the job's wall time: ``read`` (reading each part into histories),
``encode`` and ``search`` (inside the model), ``write`` (part files, in the writer thread that
overlaps the next part) and ``other`` (the rest: validating the input, listing users, the manifest).
Beside the job, ``search only`` times the two exact retrievers on the same random user vectors
(``--search-queries`` of them, k=100, no exclusion, median of ``--repeats``): torch exact
(``recsys/retrieval/exact.py``) and faiss flat (``IndexFlatIP``), and names the faster one, on
the device the job ran on.

Each run is checked complete: every input user exactly once in the output, with k rows each.

The exports come from the real export path (``recsys.export.export_size``) applied to an
untrained model (nested LRU encoder, max_len 50, sizes 32..256) whose item tower reads synthetic
32-d features: an untrained model costs the same as a trained one. The log: users with 1 + a
geometric number of events (mean about 20, at most 200) over Zipf-popular items.

Users are subsampled (``--users`` for 10^5 items, ``--users-large`` for 10^6; the JSON records
both): the floor per user at 10^6 items is 10 times that at 10^5.

With ``--device cuda`` the job, both search-only timings and the matrix-product rate of the floor
run on the GPU; ``seconds_per_million_users`` extrapolates a subsample's job to 10^6 users.

Machines here are shared and noisy: compare figures within one run, and read the load average
recorded with each row. Run: ``python bench/candidates.py`` (about 10 minutes on a quiet 2-core
machine); ``--items 100000 --sizes 32,256 --users 1000`` gives a quick look.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import torch

from recsys.item_features import ItemFeatures
from recsys.model import MatryoshkaRecommender
from serving.candidates import generate_candidates
from recsys.export import export_size
from serving.sized_model import SizedRecommender
from recsys.atomic import write_json_atomically
from baseline import unpack_commit  # bench/baseline.py (the script directory is on sys.path)
from machine import cpu_model, matmul_gflops  # bench/machine.py

logger = logging.getLogger("bench.candidates")

SIZES = (32, 64, 128, 256)
FEATURE_DIM = 32
MAX_LEN = 50


def write_log(path: Path, num_users: int, num_items: int, seed: int = 0) -> int:
    """A parquet log: ``num_users`` users, 1 + geometric(mean 19) events each (at most 200)."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(1 + rng.geometric(1 / 19, num_users), 200)
    users = np.repeat(np.arange(num_users, dtype=np.int64), lengths)
    items = np.minimum(rng.zipf(1.3, len(users)), num_items).astype(np.int64)  # item ids 1..N, popular first
    items = (items * 7919) % num_items + 1  # spread the popular ids over the catalogue
    times = rng.integers(0, 10_000_000, len(users))
    pl.DataFrame({"user_id": users, "item_id": items, "timestamp": times}).write_parquet(path)
    return len(users)


def make_exports(num_items: int, sizes: tuple[int, ...], out: Path, seed: int = 0) -> dict[int, Path]:
    """Export directories at every size from one untrained model over synthetic item features."""
    torch.manual_seed(seed)
    features = ItemFeatures(num_items=num_items, dense={"text": torch.randn(num_items + 1, FEATURE_DIM)})
    model = MatryoshkaRecommender(item_features=features, sizes=list(sizes), max_len=MAX_LEN).eval()
    counts = np.random.default_rng(seed).zipf(1.5, num_items).clip(max=10**6)
    catalogue = {"item_ids": list(range(1, num_items + 1)), "popularity": counts.tolist()}
    dirs = {}
    for s in sizes:
        start = time.perf_counter()
        dirs[s] = export_size(model, catalogue, s, out / f"d{s}", source={"bench": "synthetic, untrained"})
        logger.info("N=%d: exported size %d in %.1fs", num_items, s, time.perf_counter() - start)
    return dirs


def search_only(export: Path, k: int, num_queries: int, repeats: int, device: str) -> dict:
    """Users per second of torch exact search and of a faiss flat index over the export's item
    matrix, on the same random user vectors (median of ``repeats`` after a warm-up)."""
    from recsys.retrieval import ExactRetriever

    model = SizedRecommender(export, device=device)
    items = model.item_matrix[1:]
    queries = torch.from_numpy(np.random.default_rng(0).standard_normal((num_queries, items.shape[1])).astype(np.float32))
    exact = ExactRetriever(items)
    flat = faiss.IndexFlatIP(items.shape[1])
    flat.add(items.cpu().numpy())
    if device == "cuda" and hasattr(faiss, "StandardGpuResources"):
        flat = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, flat)
    runs = {
        "torch_exact": lambda: exact.search(queries.to(items.device), k),
        "faiss_flat": lambda: flat.search(queries.numpy(), k),
    }
    rates = {}
    for name, run in runs.items():
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        rates[name] = num_queries / statistics.median(times)
    return {
        "search_only_torch_exact_users_per_s": rates["torch_exact"],
        "search_only_faiss_flat_users_per_s": rates["faiss_flat"],
        "faster_exact_retriever": max(rates, key=rates.get),
    }


def check_complete(out: Path, num_users: int, k: int) -> dict:
    """Every input user exactly once, ranks 1..k each (the log leaves k unseen items for everybody)."""
    per_user = (
        pl.scan_parquet(str(out / "part-*.parquet"))
        .group_by("user_id")
        .agg(pl.len().alias("rows"), pl.col("rank").min().alias("first"), pl.col("rank").max().alias("last"))
        .collect()
    )
    ok = (
        per_user.height == num_users
        and per_user["user_id"].is_between(0, num_users - 1).all()
        and (per_user["rows"] == k).all()
        and (per_user["first"] == 1).all()
        and (per_user["last"] == k).all()
    )
    return {"complete": bool(ok), "distinct_users_out": per_user.height, "rows_out": int(per_user["rows"].sum())}


def bench_catalogue(num_items: int, num_users: int, rate: float, args, work: Path) -> list[dict]:
    exports = make_exports(num_items, tuple(args.sizes), work / f"exports-{num_items}")
    log_path = work / f"log-{num_items}.parquet"
    events = write_log(log_path, num_users, num_items)
    logger.info("N=%d: log of %d users, %d events", num_items, num_users, events)
    rows = []
    for s in args.sizes:
        out = work / f"out-{num_items}-d{s}"
        model = SizedRecommender(exports[s], device=args.device)  # loaded here so that its stage timings can be read
        assert type(model.retriever).__name__ == "ExactRetriever", "the export's default retriever"
        stages: dict[str, float] = {}
        load_before = os.getloadavg()
        manifest = generate_candidates(
            model, log_path, out, args.k, batch_size=args.batch_size, users_per_part=args.users_per_part,
            progress=False, stage_seconds=stages,
        )
        elapsed = manifest["elapsed_s"]
        floor = rate * 1e9 / (2 * num_items * s)
        split = {
            "read_s": stages["read"],
            "encode_s": model.stage_seconds["encode"],
            "search_s": model.stage_seconds["search"],
            "write_s": stages["write"],
        }
        split["other_s"] = elapsed - split["read_s"] - split["encode_s"] - split["search_s"]  # write overlaps
        row = {
            "num_items": num_items,
            "size": s,
            "users": num_users,
            "events": events,
            "k": args.k,
            "parts": manifest["counts"]["parts"],
            "seconds": elapsed,
            "users_per_s": num_users / elapsed,
            "seconds_per_million_users": elapsed / num_users * 1e6,  # the whole job, extrapolated from the subsample
            "floor_users_per_s": floor,
            "fraction_of_floor": num_users / elapsed / floor,
            "search_fraction_of_floor": num_users / split["search_s"] / floor,
            **split,
            "encode_share": split["encode_s"] / elapsed,
            "search_share": split["search_s"] / elapsed,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            **check_complete(out, num_users, args.k),
            **search_only(exports[s], args.k, args.search_queries, args.repeats, args.device),
        }
        rows.append(row)
        logger.info(
            "N=%d s=%d: %.0f users/s (floor %.0f, %.0f%%; read %.1fs encode %.1fs search %.1fs write %.1fs other %.1fs), "
            "search only: torch %.0f, faiss flat %.0f users/s, complete=%s",
            num_items, s, row["users_per_s"], floor, 100 * row["fraction_of_floor"], split["read_s"], split["encode_s"],
            split["search_s"], split["write_s"], split["other_s"], row["search_only_torch_exact_users_per_s"],
            row["search_only_faiss_flat_users_per_s"], row["complete"],
        )
        shutil.rmtree(out)
        shutil.rmtree(exports[s])
    return rows


def run_baseline(rev: str) -> dict:
    """This benchmark as commit ``rev`` had it, over that commit's packages, with this run's
    arguments (less ``--baseline`` and ``--out``), in a process of its own; returns its JSON with
    the commit."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--baseline", "--out"):
            skip = True
        elif not arg.startswith(("--baseline=", "--out=")):
            argv.append(arg)
    with tempfile.TemporaryDirectory(prefix="bench-candidates-baseline-") as tmp:
        short = unpack_commit(rev, ["recsys", "serving", "bench"], Path(tmp))
        out = Path(tmp) / "baseline.json"
        logger.info("baseline: commit %s, %s", short, " ".join(argv))
        subprocess.run([sys.executable, str(Path(tmp) / "bench" / "candidates.py"), *argv, "--out", str(out)], check=True,
                       cwd=tmp, env={**os.environ, "PYTHONPATH": tmp})
        return {"commit": short, **json.loads(out.read_text()), "argv": argv}  # its --out was temporary


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "polars": pl.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_table(rate: float, rows: list[dict]) -> None:
    print(f"\nfloat32 matmul rate: {rate:.1f} GFLOP/s (floor = rate / (2 * items * size) users/s)")
    print("seconds of the job: read, encode, search, write (overlapped), other; search only: torch exact / faiss flat users/s")
    header = (
        f"{'items':>9} {'size':>5} {'users':>6} {'users/s':>8} {'floor':>7} {'of floor':>8} "
        f"{'read':>5} {'encode':>6} {'search':>6} {'write':>5} {'other':>5} {'torch':>7} {'faiss':>7} {'complete':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['num_items']:>9} {r['size']:>5} {r['users']:>6} {r['users_per_s']:>8.0f} {r['floor_users_per_s']:>7.0f} "
            f"{100 * r['fraction_of_floor']:>7.0f}% {r['read_s']:>5.1f} {r['encode_s']:>6.1f} {r['search_s']:>6.1f} "
            f"{r['write_s']:>5.1f} {r['other_s']:>5.1f} {r['search_only_torch_exact_users_per_s']:>7.0f} "
            f"{r['search_only_faiss_flat_users_per_s']:>7.0f} {str(r['complete']):>8}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="100000,1000000", help="catalogue sizes, comma-separated")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="Matryoshka sizes to export and run")
    parser.add_argument("--users", type=int, default=2000, help="users (a subsample) for catalogues below 10^6 items")
    parser.add_argument("--users-large", type=int, default=500, help="users (a subsample) for catalogues of 10^6 items or more")
    parser.add_argument("--search-queries", type=int, default=128, help="random user vectors for the search-only timings")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of each search-only measurement (median)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--users-per-part", type=int, default=1000, help="so that the job writes several parts (its writer thread overlaps them)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "candidates.json"))
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="first run the same benchmark with the packages (recsys, serving, bench) of commit REV, "
                             "in a process of its own; its rows go into this run's JSON as `baseline`")
    args = parser.parse_args()
    args.items = [int(x) for x in args.items.split(",")]
    args.sizes = [int(x) for x in args.sizes.split(",")]
    for name in ("users", "users_large", "search_queries", "repeats", "k", "batch_size", "users_per_part"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.device not in ("auto", "cpu", "cuda"):
        parser.error(f"--device must be auto, cpu or cuda, got {args.device!r}")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    # force: an import (fbgemm_gpu, via torchrec) already called logging.info, which installs a
    # WARNING-level root handler that would swallow our INFO lines
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("serving").setLevel(logging.WARNING)

    baseline = run_baseline(args.baseline) if args.baseline else None
    rate = matmul_gflops(device=args.device)  # the floor is the device's: on a GPU its float32 rate
    logger.info("float32 matmul on %s: %.1f GFLOP/s", args.device, rate)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-candidates-") as tmp:
        for n in args.items:
            users = args.users if n < 1_000_000 else args.users_large
            rows += bench_catalogue(n, users, rate, args, Path(tmp))
    rate_after = matmul_gflops(device=args.device)
    print_table(rate, rows)
    print(f"(matmul rate re-measured at the end: {rate_after:.1f} GFLOP/s; the machine is shared)")
    result = {
        "benchmark": "batch candidate generation (bench/README.md §4)",
        "machine": machine_info(),
        "matmul_gflops": rate,
        "matmul_gflops_at_end": rate_after,
        "device": args.device,
        "k": args.k,
        "batch_size": args.batch_size,
        "users_subsample": {"below_10^6_items": args.users, "10^6_items_or_more": args.users_large},
        "search_queries": args.search_queries,
        "repeats": args.repeats,
        "users_per_part": args.users_per_part,
        "argv": sys.argv[1:],
        "note": "users/s of the whole job (read, validate, split, encode, search, write), each job run once; "
        "users are a subsample (users_subsample); floor = matmul rate / (2 * items * size); write_s overlaps "
        "the next part in a writer thread; search-only rates are medians of `repeats` over `search_queries` "
        "random user vectors",
        "rows": rows,
    }
    if baseline is not None:
        result["baseline"] = baseline
    out = write_json_atomically(args.out, result, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
