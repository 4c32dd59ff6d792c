"""Retrieval benchmark (bench/README.md §3): faiss indexes and funnel search per Matryoshka size.

For catalogues of 10^4, 10^5 and 10^6 items and each size ``s`` in (32, 64, 128, 256):

- per index kind (flat, ivf_flat, hnsw, ivf_pq, default settings of ``recsys.retrieval.IndexSpec``):
  build time, latency per batch of 256 queries at k=100 (median over repeats), recall@100 of the
  exact *full-size* top-100 (what the size-s model loses, truncation plus index) and of the exact
  size-s top-100 (what the index alone loses);
- the funnel: shortlist with a prefix (32 or 64 dims), re-rank at 256; recall@100 of the exact
  full-size top-100 and speed-up against exact full-size faiss flat search;
- faiss flat against the plain ``torch.topk(q @ Z.T)`` baseline.

Item matrices: no trained tower exists for 10^6 items, so they come from a Matryoshka-like tower
over synthetic features: clustered 384-d "text" vectors with a decaying spectrum and lognormal
popularity norms, mapped to D=256 by ``recsys.nn.nested.PrefixProjection`` whose rows are set to the
features' principal directions in decreasing variance. That is the optimal nested linear map (each
prefix keeps the most variance any s-dim projection can), so prefixes behave like a trained
Matryoshka tower's: small sizes are coarse but informative. Users are noisy averages of a few items
of one cluster (a short history).

``--device gpu`` puts every faiss index that faiss can move (flat, IVF-flat, IVF-PQ; HNSW stays on
the CPU) on GPU 0 after its CPU build (``build_s`` is the build, ``place_s`` the move), and runs
``torch.topk(q @ Z.T)`` (and the exact truth) on the GPU; the funnel's re-rank stays on the CPU, as
in serving.

Machines here are shared and noisy: compare figures within one run. Run:
``python bench/retrieval.py`` (all three catalogues, about an hour on 2 busy cores) or e.g.
``python bench/retrieval.py --catalogues 10000,100000`` for a quick look.
"""

from __future__ import annotations

import os

# The machines these run on are shared: idle OpenMP threads that spin instead of sleeping made
# faiss' k-means several times slower under load. Must be set before faiss and torch load libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from recsys.atomic import write_json_atomically
from machine import cpu_model  # bench/machine.py (the script directory is on sys.path)
from recsys.retrieval.faiss_index import is_gpu_index
from recsys.retrieval import (
    KINDS,
    FaissRetriever,
    FunnelRetriever,
    FunnelSpec,
    IndexSpec,
    gpu_available,
    recall_at_k,
    torch_topk,
)

try:
    from recsys.nn.nested import PrefixProjection
except ImportError:  # the benchmark also runs without the model code
    PrefixProjection = None

logger = logging.getLogger("bench.retrieval")

FEATURE_DIM = 384
WIDTH = 256


# ---------------------------------------------------------------------------------------------
# Synthetic Matryoshka-like item matrices
# ---------------------------------------------------------------------------------------------


class SyntheticCatalogue:
    """Clustered 384-d features with a decaying spectrum, generated block by block (10^6 rows fit)."""

    def __init__(self, num_items: int, seed: int = 0) -> None:
        self.num_items = num_items
        self.rng = np.random.default_rng(seed)
        self.num_clusters = max(32, num_items // 250)
        # within-cluster spread; with the spectrum below, exact search at 32/64/128 dims finds about
        # 0.65/0.85/0.95 of the full-size top-100: informative prefixes, but not lossless
        self.noise = 2.0
        spectrum = (1.0 + np.arange(FEATURE_DIM)) ** -0.3
        self.mixing = (self.rng.standard_normal((FEATURE_DIM, FEATURE_DIM)) * spectrum).astype(np.float32)
        # cluster centres and per-item noise live in a latent space, then get mixed: the features'
        # covariance has a decaying spectrum, as sentence-encoder vectors do
        self.centres = self.rng.standard_normal((self.num_clusters, FEATURE_DIM)).astype(np.float32)
        self.assignment = self.rng.integers(0, self.num_clusters, num_items)
        self.norms = np.exp(0.25 * self.rng.standard_normal(num_items)).astype(np.float32)

    def features(self, rows: np.ndarray) -> np.ndarray:
        latent = self.centres[self.assignment[rows]] + self.noise * self.rng.standard_normal(
            (len(rows), FEATURE_DIM), dtype=np.float32
        )
        return (latent @ self.mixing) * self.norms[rows, None]

    def user_features(self, num_users: int, history: int = 5) -> np.ndarray:
        clusters = self.rng.integers(0, self.num_clusters, num_users)
        latent = self.centres[clusters][:, None, :] + self.noise * self.rng.standard_normal(
            (num_users, history, FEATURE_DIM), dtype=np.float32
        )
        latent = latent.mean(axis=1) + 0.3 * self.rng.standard_normal((num_users, FEATURE_DIM), dtype=np.float32)
        return latent @ self.mixing


def principal_directions(sample: np.ndarray, dim: int) -> np.ndarray:
    """Top-``dim`` principal directions of ``sample`` (rows), in decreasing variance: ``(dim, F)``."""
    centred = sample - sample.mean(axis=0)
    cov = centred.T.astype(np.float64) @ centred / len(centred)
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1][:dim]
    return eigvecs[:, order].T.astype(np.float32)


def make_tower(catalogue: SyntheticCatalogue):
    """A nested input projection R^384 -> R^256 whose prefixes keep the most variance."""
    sample_rows = np.arange(min(catalogue.num_items, 50_000))
    basis = principal_directions(catalogue.features(sample_rows), WIDTH)
    if PrefixProjection is not None:
        tower = PrefixProjection(FEATURE_DIM, (32, 64, 128, 256), bias=False)
        with torch.no_grad():
            tower.weight.copy_(torch.from_numpy(basis))

        def apply(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return tower(torch.from_numpy(x)).numpy()

        return apply, "recsys.nn.nested.PrefixProjection (PCA-initialised)"
    return (lambda x: x @ basis.T), "numpy PCA projection"


def make_item_matrix(num_items: int, num_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    catalogue = SyntheticCatalogue(num_items, seed)
    tower, tower_name = make_tower(catalogue)
    z = np.empty((num_items, WIDTH), dtype=np.float32)
    for start in range(0, num_items, 100_000):
        rows = np.arange(start, min(num_items, start + 100_000))
        z[rows] = tower(catalogue.features(rows))
    queries = tower(catalogue.user_features(num_queries)).astype(np.float32)
    return z, np.ascontiguousarray(queries), tower_name


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch allocations, thread pools
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_info(threads: int, device: str) -> dict:
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "gpu" else None,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_1m": os.getloadavg()[0],  # other users' work on this shared machine
    }


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def hnsw_allowed(n: int, size: int, args) -> bool:
    """HNSW builds at 10^6 items take 15+ minutes per size on a busy 2-core machine."""
    return n < 1_000_000 or size in args.hnsw_sizes_at_1m


def sweep(retriever: FaissRetriever, queries, k, repeats, truth_full, truth_same, n) -> list[dict]:
    """Recall and latency of an approximate index over its search-time knob (nprobe, ef_search)."""
    spec = retriever.spec
    if spec.kind in ("ivf_flat", "ivf_pq"):
        name, values = "nprobe", sorted({max(1, spec.nlist // f) for f in (32, 16, 8, 4)})
    elif spec.kind == "hnsw":
        name, values = "ef_search", [128, 256, 512]
    else:
        return []
    default = getattr(spec, name)
    rows_out = []
    for value in values:
        # a retriever applies its own settings before every search: one per value, sharing the index
        probe = retriever.with_search_settings(**{name: value})
        latency = median_time(lambda: probe.search(queries, k), repeats)
        _, rows = probe.search(queries, k)
        rows_out.append({
            "size": queries.shape[1], "kind": spec.kind, "param": name, "value": value,
            "default": value == default, "latency_ms": 1e3 * latency,
            "recall_full": recall_at_k(rows, truth_full), "recall_same_size": recall_at_k(rows, truth_same),
        })
        logger.info("N=%d s=%d %s %s=%d: %.1fms recall same-size %.3f", n, queries.shape[1], spec.kind, name,
                    value, rows_out[-1]["latency_ms"], rows_out[-1]["recall_same_size"])
    return rows_out


def bench_catalogue(n: int, args) -> dict:
    k, repeats = args.k, (args.repeats if n < 1_000_000 else max(1, args.repeats // 2))
    t0 = time.perf_counter()
    z, queries, tower_name = make_item_matrix(n, args.queries, seed=args.seed)
    logger.info("N=%d: item matrix in %.1fs (%s)", n, time.perf_counter() - t0, tower_name)
    result = {
        "num_items": n, "tower": tower_name, "repeats": repeats,
        "indexes": [], "sweeps": [], "funnel": [], "torch_vs_faiss": [],
    }

    device = torch.device("cuda" if args.device == "gpu" else "cpu")

    def on_device(x: np.ndarray) -> torch.Tensor:  # torch_topk runs where its queries are
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)

    z_t, queries_t = on_device(z), on_device(queries)
    _, truth_full = torch_topk(queries_t, z_t, k)

    exact_index = None
    prefix_indexes = {}
    for s in args.sizes:
        zs, qs = np.ascontiguousarray(z[:, :s]), np.ascontiguousarray(queries[:, :s])
        zs_t, qs_t = on_device(zs), on_device(qs)
        _, truth_s = torch_topk(qs_t, zs_t, k)
        for kind in args.kinds:
            if kind == "hnsw" and not hnsw_allowed(n, s, args):
                continue
            spec = IndexSpec(kind).resolve(n, s)
            start = time.perf_counter()
            index = FaissRetriever.build(zs, spec)
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            index = index.on_device(args.device)
            place_s = time.perf_counter() - start
            latency = median_time(lambda: index.search(qs, k), repeats)
            _, rows = index.search(qs, k)
            row = {
                "size": s,
                "kind": kind,
                "spec": spec.to_dict(),
                "build_s": build_s,
                "place_s": place_s,
                "on_gpu": is_gpu_index(index.index),
                "latency_ms": 1e3 * latency,
                "recall_full": recall_at_k(rows, truth_full),
                "recall_same_size": recall_at_k(rows, truth_s),
            }
            result["indexes"].append(row)
            result["sweeps"].extend(sweep(index, qs, k, repeats, truth_full, truth_s, n))
            if s in args.funnel_prefixes and kind in args.funnel_index_kinds:
                prefix_indexes[s, kind] = (index, build_s)  # the funnel's stage 0 is this very index
            logger.info("N=%d s=%d %-8s build %.1fs latency %.1fms recall full %.3f same-size %.3f",
                        n, s, kind, build_s, row["latency_ms"], row["recall_full"], row["recall_same_size"])
            if kind == "flat":
                torch_latency = median_time(lambda: torch_topk(qs_t, zs_t, k), repeats)
                result["torch_vs_faiss"].append({
                    "size": s,
                    "faiss_flat_ms": row["latency_ms"],
                    "torch_topk_ms": 1e3 * torch_latency,
                    "torch_over_faiss": torch_latency / latency,
                })
                if s == WIDTH:
                    exact_index = index
            del index

    if exact_index is None:  # flat at full size was not in the run: build it for the funnel
        exact_index = FaissRetriever.build(z, IndexSpec("flat")).on_device(args.device)

    def time_exact() -> tuple[float, float]:
        return (median_time(lambda: exact_index.search(queries, k), repeats),
                median_time(lambda: torch_topk(queries_t, z_t, k), repeats))

    # Exact full-size search is timed right before and right after the funnel runs, so that the
    # speed-ups compare figures taken side by side (the machine's load drifts over a long run).
    exact_before = time_exact()

    for prefix in args.funnel_prefixes:
        for prefix_kind in args.funnel_index_kinds:
            prefix_spec = IndexSpec(prefix_kind)
            if prefix_kind == "hnsw" and not hnsw_allowed(n, prefix, args):
                continue
            if (prefix, prefix_kind) not in prefix_indexes:
                start = time.perf_counter()
                index = FaissRetriever.build(np.ascontiguousarray(z[:, :prefix]), prefix_spec).on_device(args.device)
                prefix_indexes[prefix, prefix_kind] = (index, time.perf_counter() - start)
            prefix_index, build_s = prefix_indexes.pop((prefix, prefix_kind))
            for shortlist in args.funnel_shortlists:
                funnel = FunnelRetriever(z, FunnelSpec(prefix, shortlist, WIDTH, index=prefix_spec), prefix_index)
                latency = median_time(lambda: funnel.search(queries, k), repeats)
                _, rows = funnel.search(queries, k)
                row = {
                    "settings": funnel.to_dict(),
                    "prefix": prefix,
                    "prefix_index": prefix_kind,
                    "shortlist": shortlist,
                    "rerank_dims": [WIDTH],
                    "prefix_index_build_s": build_s,
                    "latency_ms": 1e3 * latency,
                    "recall_full": recall_at_k(rows, truth_full),
                }
                result["funnel"].append(row)
                logger.info("N=%d funnel %d(%s)->%d shortlist %d: %.1fms recall %.3f",
                            n, prefix, prefix_kind, WIDTH, shortlist, row["latency_ms"], row["recall_full"])
            del funnel, prefix_index
    exact_after = time_exact()
    exact_faiss = (exact_before[0] + exact_after[0]) / 2
    exact_torch = (exact_before[1] + exact_after[1]) / 2
    for row in result["funnel"]:
        row["speedup_vs_exact_faiss_flat"] = 1e3 * exact_faiss / row["latency_ms"]
        row["speedup_vs_exact_torch_topk"] = 1e3 * exact_torch / row["latency_ms"]
    result["exact_full_faiss_flat_ms"] = 1e3 * exact_faiss
    result["exact_full_torch_topk_ms"] = 1e3 * exact_torch
    result["exact_full_timings_ms_before_after"] = [1e3 * t for t in (*exact_before, *exact_after)]
    return result


def print_tables(results: list[dict], k: int) -> None:
    for res in results:
        n = res["num_items"]
        print(f"\n== N = {n:,} items, batch of queries, k={k}, median of {res['repeats']} ==")
        print(f"{'size':>5} {'index':>9} {'build s':>9} {'ms/batch':>10} {'R@k full':>9} {'R@k same-s':>11}")
        for r in res["indexes"]:
            print(f"{r['size']:>5} {r['kind']:>9} {r['build_s']:>9.2f} {r['latency_ms']:>10.1f} "
                  f"{r['recall_full']:>9.3f} {r['recall_same_size']:>11.3f}")
        print("\nsearch-time knob sweep (default marked *)")
        print(f"{'size':>5} {'index':>9} {'knob':>14} {'ms/batch':>10} {'R@k full':>9} {'R@k same-s':>11}")
        for r in res["sweeps"]:
            knob = f"{r['param']}={r['value']}" + ("*" if r["default"] else "")
            print(f"{r['size']:>5} {r['kind']:>9} {knob:>14} {r['latency_ms']:>10.1f} "
                  f"{r['recall_full']:>9.3f} {r['recall_same_size']:>11.3f}")
        print(f"\nfunnel -> re-rank at {WIDTH}; exact full-size search, timed alongside: faiss flat "
              f"{res['exact_full_faiss_flat_ms']:.1f} ms/batch, torch.topk {res['exact_full_torch_topk_ms']:.1f} ms/batch")
        print(f"{'prefix':>6} {'index':>9} {'shortlist':>9} {'ms/batch':>10} {'R@k full':>9} "
              f"{'x faiss flat':>13} {'x torch.topk':>13}")
        for r in res["funnel"]:
            print(f"{r['prefix']:>6} {r['prefix_index']:>9} {r['shortlist']:>9} {r['latency_ms']:>10.1f} "
                  f"{r['recall_full']:>9.3f} {r['speedup_vs_exact_faiss_flat']:>12.2f}x "
                  f"{r['speedup_vs_exact_torch_topk']:>12.2f}x")
        print(f"\n{'size':>5} {'faiss flat ms':>14} {'torch.topk ms':>14} {'torch/faiss':>12}")
        for r in res["torch_vs_faiss"]:
            print(f"{r['size']:>5} {r['faiss_flat_ms']:>14.1f} {r['torch_topk_ms']:>14.1f} {r['torch_over_faiss']:>12.2f}")


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogues", type=int_list, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--sizes", type=int_list, default=[32, 64, 128, 256])
    parser.add_argument("--kinds", type=lambda t: t.split(","), default=list(KINDS))
    parser.add_argument("--hnsw-sizes-at-1m", type=int_list, default=[32],
                        help="HNSW builds at 10^6 items take 15+ minutes per size on 2 busy cores: only these sizes")
    parser.add_argument("--funnel-prefixes", type=int_list, default=[32, 64])
    parser.add_argument("--funnel-shortlists", type=int_list, default=[200, 400, 800, 1600])
    parser.add_argument("--funnel-index-kinds", type=lambda t: t.split(","), default=["flat", "hnsw"])
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: faiss indexes and torch exact search on GPU 0 (HNSW stays on the CPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "retrieval.json")
    args = parser.parse_args(argv)
    for kind in args.kinds + args.funnel_index_kinds:
        if kind not in KINDS:
            parser.error(f"unknown index kind {kind!r}; choose from {list(KINDS)}")

    # force: importing the model code may already have configured the root logger
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    if args.device == "gpu" and not (gpu_available() and torch.cuda.is_available()):
        parser.error("--device gpu: needs a CUDA GPU and the GPU build of faiss")
    machine_at_start = machine_info(args.threads, args.device)
    results = [bench_catalogue(n, args) for n in args.catalogues]
    print_tables(results, args.k)
    report = {
        "benchmark": "retrieval",
        "machine": machine_at_start,
        "load_average_1m_at_end": os.getloadavg()[0],
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    write_json_atomically(args.out, report, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
