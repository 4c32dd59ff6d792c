"""Batch candidate generation benchmark (bench/README.md §4): users per second per size.

For each catalogue size (10^5 and 10^6 items) and each Matryoshka size ``s``, the whole job
(``serving.candidates.generate_candidates``, k=100, seen items excluded) runs over a synthetic
interaction log, and its users per second are set against the floor set by arithmetic: exact
top-k over ``N`` items costs at least ``2 * N * s`` flops per user, so at the machine's float32
matrix-product rate ``R`` (measured in the same run, a square torch matmul) no job can do more than
``R / (2 N s)`` users per second. Alongside, ``search only`` times the export's retriever (faiss flat) alone on
random user vectors (k=100, no exclusion), to show how much of the job is the search itself.

Each run is checked complete: every input user exactly once in the output, with k rows each.

The exports come from the real export path (``serving.export.export_size``) applied to an
untrained model (nested LRU encoder, max_len 50, sizes 32..256) whose item tower reads synthetic
32-d features: an untrained model costs the same as a trained one. The log: users with 1 + a
geometric number of events (mean about 20, at most 200) over Zipf-popular items.

On a 2-core CPU the 10^6-item catalogue is run on a subsample of users (``--users-large``,
default 10^4; the table says how many): the floor per user is 10 times that of 10^5 items.

The job's time splits into encoding the histories (the nested LRU over ``max_len`` positions,
which ``serving.load`` pads every history to), searching the index, and the rest (reading,
grouping, writing: a few per cent); the table gives the first two as shares of the job's time.

Machines here are shared and noisy: compare figures within one run. Run:
``python bench/candidates.py`` (both catalogues at 10^5 / 10^4 users: about half an hour on a quiet
2-core machine, several times that on a loaded one) or, as for the recorded results,
``python bench/candidates.py --users 10000 --users-large 2000``; ``--items 100000 --sizes 32,256``
gives a quick look.
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

import faiss
import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys.item_features import ItemFeatures  # noqa: E402
from recsys.model import MatryoshkaRecommender  # noqa: E402
from serving.candidates import generate_candidates  # noqa: E402
from serving.export import export_size  # noqa: E402
from serving.sized_model import SizedRecommender, load  # noqa: E402
from recsys.atomic import write_json_atomically  # noqa: E402
from machine import cpu_model  # bench/machine.py (the script directory is on sys.path)

logger = logging.getLogger("bench.candidates")

SIZES = (32, 64, 128, 256)
FEATURE_DIM = 32
MAX_LEN = 50


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Median float32 GFLOP/s of an ``n x n`` by ``n x n`` torch matmul on this machine now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


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


def search_only_users_per_s(export: Path, k: int, batch: int, repeats: int = 3) -> float:
    """The export's retriever (faiss flat) alone: random user vectors, batches of ``batch``, no exclusion."""
    retriever = load(export).retriever
    queries = np.random.default_rng(0).standard_normal((batch, retriever.dim)).astype(np.float32)
    retriever.search(queries, k)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        retriever.search(queries, k)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


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
        model = SizedRecommender(exports[s])  # loaded here so that its stage timings can be read
        manifest = generate_candidates(
            model, log_path, out, args.k, batch_size=args.batch_size, users_per_part=args.users_per_part,
            progress=False,
        )
        elapsed = manifest["elapsed_s"]
        floor = rate * 1e9 / (2 * num_items * s)
        row = {
            "num_items": num_items,
            "size": s,
            "users": num_users,
            "events": events,
            "k": args.k,
            "parts": manifest["counts"]["parts"],
            "seconds": elapsed,
            "users_per_s": num_users / elapsed,
            "floor_users_per_s": floor,
            "fraction_of_floor": num_users / elapsed / floor,
            "encode_share": model.stage_seconds["encode"] / elapsed,
            "search_share": model.stage_seconds["search"] / elapsed,
            "search_only_users_per_s": search_only_users_per_s(exports[s], args.k, args.batch_size),
            **check_complete(out, num_users, args.k),
        }
        rows.append(row)
        logger.info(
            "N=%d s=%d: %.0f users/s (floor %.0f, %.0f%%; encode %.0f%%, search %.0f%% of the time), "
            "search only %.0f users/s, complete=%s",
            num_items, s, row["users_per_s"], floor, 100 * row["fraction_of_floor"], 100 * row["encode_share"],
            100 * row["search_share"], row["search_only_users_per_s"], row["complete"],
        )
        shutil.rmtree(out)
        shutil.rmtree(exports[s])
    return rows


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
    print("encode / search: share of the job's time spent encoding histories / searching the index")
    header = (
        f"{'items':>9} {'size':>5} {'users':>7} {'users/s':>9} {'floor':>9} {'of floor':>9} "
        f"{'encode':>7} {'search':>7} {'search only':>12} {'complete':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['num_items']:>9} {r['size']:>5} {r['users']:>7} {r['users_per_s']:>9.0f} {r['floor_users_per_s']:>9.0f} "
            f"{100 * r['fraction_of_floor']:>8.0f}% {100 * r['encode_share']:>6.0f}% {100 * r['search_share']:>6.0f}% "
            f"{r['search_only_users_per_s']:>12.0f} {str(r['complete']):>9}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="100000,1000000", help="catalogue sizes, comma-separated")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="Matryoshka sizes to export and run")
    parser.add_argument("--users", type=int, default=100_000, help="users for catalogues below 10^6 items")
    parser.add_argument("--users-large", type=int, default=10_000, help="users for catalogues of 10^6 items or more")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--users-per-part", type=int, default=25_000, help="so that the job writes several parts")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "candidates.json"))
    args = parser.parse_args()
    args.items = [int(x) for x in args.items.split(",")]
    args.sizes = [int(x) for x in args.sizes.split(",")]
    # force: an import (fbgemm_gpu, via torchrec) already called logging.info, which installs a
    # WARNING-level root handler that would swallow our INFO lines
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("serving").setLevel(logging.WARNING)

    rate = matmul_gflops()
    logger.info("float32 matmul: %.1f GFLOP/s", rate)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-candidates-") as tmp:
        for n in args.items:
            users = args.users if n < 1_000_000 else args.users_large
            rows += bench_catalogue(n, users, rate, args, Path(tmp))
    rate_after = matmul_gflops()
    print_table(rate, rows)
    print(f"(matmul rate re-measured at the end: {rate_after:.1f} GFLOP/s; the machine is shared)")
    result = {
        "benchmark": "batch candidate generation (bench/README.md §4)",
        "machine": machine_info(),
        "matmul_gflops": rate,
        "matmul_gflops_at_end": rate_after,
        "k": args.k,
        "batch_size": args.batch_size,
        "users_per_part": args.users_per_part,
        "argv": sys.argv[1:],
        "note": "users/s of the whole job (read, validate, split, encode, search, write); the 10^6-item rows "
        "use a subsample of users; floor = matmul rate / (2 * items * size)",
        "rows": rows,
    }
    out = write_json_atomically(args.out, result, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
