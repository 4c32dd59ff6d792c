"""Funnel search on a trained tower's item matrix (bench/README.md §3, docs/method.md §6).

A checkpoint trained by ``python -m recsys.train`` (e.g. Last.fm without ID embeddings) embeds
``--items`` items: its real items, then synthetic items with features drawn like the real ones
(``bench/trained_catalogue.py``). The queries are user vectors of real users. Against the exact
full-size top-``k`` it measures, per thread count and side by side in one run:

- exact search: ``torch.topk(q @ Z.T)`` over item blocks (``ExactRetriever``) and faiss flat;
- the flat funnel: exact search over a prefix (``torch.topk`` blocks, or faiss flat) shortlists,
  re-rank at the full size;
- the IVF funnel (AdANNS-IVF): an IVF-flat index clustered, probed and scanned on the prefix
  shortlists, re-rank at the full size; per prefix, ``nprobe`` and shortlist.

Each funnel setting is also timed without its re-ranking (the first stage alone), with the share
of the exact top-``k`` its shortlist holds.

Where the checkpoint's sizes are networks of their own (``--model.separate_item_vectors``,
``--model.nesting slices``: the rule of ``recsys.export.own_network``) the prefix of the full-size
vectors was never trained to rank, and the funnels are own-network funnels instead
(``"funnel_mode": "own_network"``; docs/method.md §6): each ``--prefixes`` entry names a smaller
size ``p`` of the model, whose own user vectors search its own item vectors (the same catalogue,
synthetic items through size ``p``'s own item tower) for the shortlist, and the full size re-ranks
it exactly with its own user and item vectors (``recsys.retrieval.rerank``). The truth is then the
exact top-``k`` of the full size's own vectors. The queries of both sizes are computed once; the
size-``p`` encoder pass the funnel adds is timed on its own (``encode_ms``, ``shortlist_encode_ms``).
Otherwise (blocks, tied item vectors) ``"funnel_mode": "prefix"``.

With a checkpoint per size (``--model.monitor_size each``: ``best-d<size>.ckpt``), ``--checkpoint``
names the directory that holds them, and each size's vectors come from its own best checkpoint, as
an export of that run serves them (``recsys.export --run-id``).

Recall@k is of the exact full-size top-``k``; speed-ups are against the faster exact search,
timed right before and right after the funnels (their mean). Run, e.g.::

    python bench/funnel.py --checkpoint lightning_logs/funnel-lastfm/checkpoints/best.ckpt --data-dir data/lastfm
    python bench/funnel.py --checkpoint lightning_logs/sports/checkpoints --data-dir data/sports   # one per size
"""

from __future__ import annotations

import os

# Shared machines: OpenMP threads that spin instead of sleeping slow faiss down under load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from machine import cpu_model  # (bench/machine.py: the script directory is on sys.path)
from recsys.atomic import write_json_atomically
from recsys.checkpoint import read_checkpoint
from recsys.model import size_network
from recsys.export import SIZE_CHECKPOINT, own_network
from serving.sized_model import sha256_of
from recsys.retrieval import (
    ExactRetriever,
    FaissRetriever,
    FunnelRetriever,
    FunnelSpec,
    IndexSpec,
    gpu_available,
    recall_at_k,
    rerank,
    torch_topk,
)
from trained_catalogue import (
    encode_users,
    item_matrices,
    item_matrix,
    load_model,
    output_tower,
    output_tower_name,
    query_histories,
    user_vectors,
)

ROOT = Path(__file__).resolve().parents[1]

logger = logging.getLogger("bench.funnel")


def timed(fn, repeats: int):
    """Median seconds of ``repeats`` calls after one warm-up call, and the warm-up's result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def shown_path(path: Path) -> str:
    """A path as the README should show it: relative to the repository, else its last two parts."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(Path(*path.parts[-2:]))


def training_record(checkpoint: Path) -> dict:
    """The checkpoint (its epoch) and, when its run directory (``recsys.train --tracking csv``) has
    ``results.json``, the test metrics per size."""
    out = {"checkpoint": shown_path(checkpoint), "checkpoint_sha256": sha256_of(checkpoint)}
    training = {"epochs": int(read_checkpoint(checkpoint)["epoch"]) + 1}
    results = checkpoint.resolve().parent.parent / "results.json"
    if results.is_file():
        rows = json.loads(results.read_text())
        training["test_by_size"] = rows
        training["test_ndcg_10_full"] = max(rows, key=lambda r: r["size"])["ndcg_10"]
    return {**out, "training": training}


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus(),
        "faiss_gpu_available": gpu_available(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


@dataclass
class OwnNetworks:
    """What an own-network funnel needs besides the full size's vectors: per shortlisting size ``p``
    its own item vectors and its own user vectors of the queries, and per size (the full one too)
    the network, input item matrix and histories that time its encoder pass."""

    reason: str  # why the sizes are networks of their own (recsys.export.own_network)
    items: dict[int, np.ndarray]  # p -> (N, p), size p's own item vectors of the catalogue
    queries: dict[int, np.ndarray]  # p -> (B, p), size p's own user vectors of the query users
    encoders: dict[int, tuple]  # size -> (network, its input item matrix) for the timed encoder pass
    histories: torch.Tensor  # (B, max_len) the query users' histories

    def encode(self, size: int) -> np.ndarray:
        net, inputs = self.encoders[size]
        return encode_users(net, self.histories, inputs, size)


def size_checkpoints(directory: Path) -> dict[int, Path]:
    """``{size: path}`` of the checkpoints per size in a run's checkpoint directory (``best-d64.ckpt``;
    ``recsys.export``'s rule)."""
    return {int(m.group(1)): path for path in sorted(directory.glob("*.ckpt")) if (m := SIZE_CHECKPOINT.search(path.name))}


def own_network_reason(model) -> str | None:
    """Why the funnels of this checkpoint shortlist with a smaller size's own network (one of its
    sizes serves with a network of its own, ``recsys.export.own_network``); None: prefix funnels."""
    for size in model.sizes:
        why = own_network(model, size)
        if why is not None:
            return f"size {size} {why}"
    return None


def own_networks(model, prefixes: list[int], num_items: int, num_queries: int, data_dir: Path, seed: int, reason: str,
                 models: dict | None = None):
    """The full size's own item and user vectors (``z``, ``queries``), the catalogue's description,
    the queries', and :class:`OwnNetworks` for the sizes ``prefixes``: one catalogue (the same
    synthetic features) through every size's own item tower, one batch of users through every
    size's own network. ``models`` (size -> model) gives a size the weights of its own best
    checkpoint; the others take ``model``'s."""
    full = model.sizes[-1]
    sizes = [*prefixes, full]
    of = {s: (models or {}).get(s, model) for s in sizes}
    matrices, catalogue = item_matrices(model, num_items, {s: output_tower(of[s], s) for s in sizes}, seed=seed)
    histories, query_info = query_histories(model, data_dir, num_queries, seed=seed)
    encoders = {}
    with torch.no_grad():
        for s in sizes:
            net = size_network(of[s].net, s)
            encoders[s] = (net, net.item_matrix())
    vectors = {s: np.ascontiguousarray(matrices[s][:, :s]) for s in sizes}  # (a shared tower's prefix; own towers are s wide)
    own = OwnNetworks(reason, {p: vectors[p] for p in prefixes}, {}, encoders, histories)
    own.queries = {p: own.encode(p) for p in prefixes}
    return vectors[full], own.encode(full), catalogue, query_info, own


def own_funnel_settings(prefix: int, shortlist: int, stage0, size: int) -> dict:
    """An own-network funnel's settings, as an export's retriever entry names them (``prefix_size``,
    ``shortlist``) with the shortlisting size's retriever."""
    return {"kind": "own_funnel", "prefix_size": prefix, "size": size, "shortlist": shortlist,
            "shortlist_retriever": stage0.to_dict()}


def build_prefix_indexes(z: np.ndarray, args, own: OwnNetworks | None = None) -> dict:
    """Stage-0 indexes per (prefix, kind), built once (with all threads) and reused at every thread
    count: over the prefix of ``z``, or with ``own`` over size ``prefix``'s own item vectors."""
    indexes = {}
    for prefix in args.prefixes:
        zp = np.ascontiguousarray(z[:, :prefix]) if own is None else own.items[prefix]
        for kind in args.prefix_kinds:
            start = time.perf_counter()
            if kind == "exact":
                retriever = ExactRetriever(zp)
            else:
                spec = IndexSpec(kind) if kind == "flat" else IndexSpec(kind, nlist=args.nlist)
                retriever = FaissRetriever.build(zp, spec).on_device(args.device)
            indexes[prefix, kind] = (retriever, time.perf_counter() - start)
            logger.info("prefix %d %s index built in %.1fs", prefix, kind, indexes[prefix, kind][1])
    return indexes


def run_threads(threads: int, z, queries, truth, indexes, exact_flat, args, own: OwnNetworks | None = None) -> dict:
    set_threads(threads)
    k, repeats = args.k, args.repeats
    # exact torch search runs where the item matrix is: the GPU when faiss may use one too
    device = "cuda" if args.device != "cpu" and gpu_available() and torch.cuda.is_available() else "cpu"
    exact_torch = ExactRetriever(torch.from_numpy(z).to(device))
    queries_on_device = torch.from_numpy(queries).to(device)

    def time_exact() -> dict:
        return {"torch_topk_ms": 1e3 * timed(lambda: exact_torch.search(queries_on_device, k), repeats)[0],
                "faiss_flat_ms": 1e3 * timed(lambda: exact_flat.search(queries, k), repeats)[0]}

    if own is None:
        prefixes = {p: np.ascontiguousarray(queries[:, :p]) for p in args.prefixes}
    else:  # each size's own user vectors; its encoder pass timed apart (the searches take precomputed queries)
        prefixes = own.queries
        encode_ms = {s: 1e3 * timed(lambda: own.encode(s), repeats)[0] for s in [*args.prefixes, z.shape[1]]}
        logger.info("%d threads, query encoding (ms) per size: %s", threads, encode_ms)
    before = time_exact()
    load_before = os.getloadavg()[0]
    logger.info("%d threads, exact before: %s", threads, before)
    rows = []
    for (prefix, kind), (prefix_index, build_s) in indexes.items():
        probes = args.nprobes if kind == "ivf_flat" else [None]
        for nprobe in probes:
            stage0 = prefix_index if nprobe is None else prefix_index.with_search_settings(nprobe=nprobe)
            for shortlist in args.shortlists:
                if own is None:
                    spec = FunnelSpec(prefix, shortlist, z.shape[1], **({"index": stage0.spec} if kind != "exact" else {}))
                    funnel = FunnelRetriever(z, spec, stage0)
                    settings = funnel.to_dict()
                    seconds, (_, found) = timed(lambda: funnel.search(queries, k), repeats)
                else:  # size `prefix`'s own network shortlists, the full size re-ranks (as serving's own funnel)
                    settings = own_funnel_settings(prefix, shortlist, stage0, z.shape[1])
                    seconds, (_, found) = timed(
                        lambda: rerank(queries, z, stage0.search(prefixes[prefix], max(shortlist, k))[1], k), repeats)
                # the first stage alone (the funnel passes it the queries' prefix, or own vectors, and the shortlist)
                stage0_s, (_, shortlisted) = timed(lambda: stage0.search(prefixes[prefix], max(shortlist, k)), repeats)
                row = {"prefix": prefix, "prefix_index": kind, "nprobe": nprobe, "shortlist": shortlist,
                       "settings": settings, "prefix_index_build_s": build_s,
                       "latency_ms": 1e3 * seconds, "stage0_ms": 1e3 * stage0_s,
                       "recall": recall_at_k(found, truth), "shortlist_recall": recall_at_k(shortlisted, truth)}
                if own is not None:
                    row["shortlist_encode_ms"] = encode_ms[prefix]
                rows.append(row)
                logger.info("%d threads: prefix %d %s nprobe %s shortlist %d: %.1f ms recall %.4f", threads, prefix,
                            kind, nprobe, shortlist, row["latency_ms"], row["recall"])
    after = time_exact()
    logger.info("%d threads, exact after: %s", threads, after)
    exact = {name: (before[name] + after[name]) / 2 for name in before}
    fastest = min(exact, key=exact.get)
    for row in rows:
        row["speedup_vs_fastest_exact"] = exact[fastest] / row["latency_ms"]
        row["speedup_vs_torch_topk"] = exact["torch_topk_ms"] / row["latency_ms"]
        row["speedup_vs_faiss_flat"] = exact["faiss_flat_ms"] / row["latency_ms"]
    out = {"threads": threads, "torch_device": device, "exact_ms": exact, "exact_ms_before": before, "exact_ms_after": after,
           "fastest_exact": fastest, "load_average_1m_before": load_before,
           "load_average_1m_after": os.getloadavg()[0], "funnel": rows}
    if own is not None:
        out["encode_ms"] = {str(s): ms for s, ms in encode_ms.items()}
    return out


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a checkpoint written by recsys.train, or the directory of a run's checkpoints per size "
                             "(best-d<size>.ckpt, --model.monitor_size each): each size from its own")
    parser.add_argument("--data-dir", type=Path, required=True, help="the prepared dataset it was trained on (its users)")
    parser.add_argument("--items", type=int, default=1_000_000, help="catalogue size: real items plus synthetic ones")
    parser.add_argument("--queries", type=int, default=1024, help="real users in the query batch")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--prefixes", type=int_list, default=[16, 32, 64],
                        help="shortlisting prefixes; where the sizes are networks of their own, smaller sizes of the model")
    parser.add_argument("--shortlists", type=int_list, default=[400, 1600])
    parser.add_argument("--prefix-kinds", type=lambda t: t.split(","), default=["flat", "ivf_flat"],
                        help="stage-0 searches over the prefix: exact (torch.topk), flat (faiss), ivf_flat (faiss)")
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists of the IVF funnel's prefix index")
    parser.add_argument("--nprobes", type=int_list, default=[32, 64, 128, 256, 512])
    parser.add_argument("--threads", type=int_list, default=[2, 1])
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed calls after the warm-up (median); at 10^6 items one call takes seconds")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="where the faiss indexes search (auto: the GPU when faiss sees one); re-ranking stays on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "funnel.json")
    args = parser.parse_args(argv)
    if not args.checkpoint.exists():
        parser.error(f"--checkpoint {args.checkpoint}: no such file or directory")
    per_size = size_checkpoints(args.checkpoint) if args.checkpoint.is_dir() else {}
    if args.checkpoint.is_dir() and not per_size:
        parser.error(f"--checkpoint {args.checkpoint}: the directory holds no checkpoint per size (best-d<size>.ckpt, "
                     "written with --model.monitor_size each)")
    if not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    unknown = sorted(set(args.prefix_kinds) - {"exact", "flat", "ivf_flat"})
    if unknown or not args.prefix_kinds:
        parser.error(f"--prefix-kinds takes exact, flat and ivf_flat, got {args.prefix_kinds}")
    if max(args.nprobes) > args.nlist:
        parser.error(f"--nprobes must not exceed --nlist={args.nlist}, got {args.nprobes}")
    for name in ("items", "queries", "k", "nlist", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    set_threads(max(args.threads))
    machine = machine_info()
    load_at_start = os.getloadavg()[0]

    checkpoint = per_size[max(per_size)] if per_size else args.checkpoint
    model = load_model(checkpoint)
    width = model.net.width
    reason = own_network_reason(model)
    if reason is not None:
        smaller = [s for s in model.sizes if s < model.sizes[-1]]
        wrong = [p for p in args.prefixes if p not in smaller]
        if wrong:  # one line, no usage: the arguments parsed, the checkpoint decides
            parser.exit(2, f"{parser.prog}: error: --prefixes {','.join(map(str, wrong))} not among the model's sizes "
                           f"below {model.sizes[-1]} ({','.join(map(str, smaller)) or 'none'}): {reason}, so each "
                           f"prefix names the smaller size whose own network shortlists\n")
        missing = [s for s in [*args.prefixes, model.sizes[-1]] if s not in per_size]
        if per_size and missing:
            parser.exit(2, f"{parser.prog}: error: --checkpoint {args.checkpoint}: no checkpoint of size "
                           f"{','.join(map(str, missing))} (best-d<size>.ckpt) beside {checkpoint.name}\n")
    elif per_size:
        parser.exit(2, f"{parser.prog}: error: --checkpoint {args.checkpoint}: a checkpoint per size, but the model's sizes "
                       "share one network (no own network per size), so there is nothing to take from each\n")
    elif any(p >= width for p in args.prefixes):
        parser.error(f"--prefixes must be below the model width {width}, got {args.prefixes}")
    start = time.perf_counter()
    own = None
    if reason is None:
        z, catalogue = item_matrix(model, args.items, seed=args.seed)
        queries, query_info = user_vectors(model, args.data_dir, args.queries, seed=args.seed)
    else:
        logger.info("own-network funnels: %s", reason)
        models = {s: load_model(path) for s, path in per_size.items() if s in args.prefixes}
        z, queries, catalogue, query_info, own = own_networks(model, args.prefixes, args.items, args.queries,
                                                              args.data_dir, args.seed, reason, models)
    logger.info("item matrix %s and %d queries in %.1fs", z.shape, len(queries), time.perf_counter() - start)
    _, truth = torch_topk(queries, z, args.k)
    if own is None:
        truncation = {p: recall_at_k(torch_topk(queries[:, :p], z[:, :p], args.k)[1], truth) for p in args.prefixes}
    else:
        truncation = {p: recall_at_k(torch_topk(own.queries[p], own.items[p], args.k)[1], truth) for p in args.prefixes}
    logger.info("exact top-%d at each prefix, recall of the full-size one: %s", args.k, truncation)

    start = time.perf_counter()
    exact_flat = FaissRetriever.build(z, IndexSpec("flat")).on_device(args.device)
    indexes = build_prefix_indexes(z, args, own)
    logger.info("indexes built in %.1fs", time.perf_counter() - start)
    per_threads = [run_threads(t, z, queries, truth, indexes, exact_flat, args, own) for t in args.threads]

    report = {
        "benchmark": "funnel",
        "funnel_mode": "prefix" if own is None else "own_network",
        "machine": machine,
        "load_average_1m_at_start": load_at_start,
        "load_average_1m_at_end": os.getloadavg()[0],
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "checkpoint", "data_dir")},
                     "checkpoint": shown_path(args.checkpoint), "data_dir": shown_path(args.data_dir)},
        "model": {**training_record(checkpoint), "sizes": list(model.sizes), "encoder": model.hparams.encoder,
                  "use_id_embedding": bool(model.hparams.use_id_embedding)},
        "catalogue": catalogue,
        "queries": query_info,
        "recall_of_exact_prefix_search": {str(p): r for p, r in truncation.items()},
        "results": per_threads,
    }
    if per_size:
        report["model"]["size_checkpoints"] = {str(s): training_record(per_size[s]) for s in [*args.prefixes, model.sizes[-1]]}
    if own is not None:
        report["own_network"] = {
            "reason": reason, "nesting": model.hparams.get("nesting", "blocks"),
            "separate_item_vectors": model.hparams.get("separate_item_vectors", False),
            "size": model.sizes[-1], "shortlist_sizes": list(args.prefixes),
            "item_vectors": {str(s): output_tower_name(model, s) for s in [*args.prefixes, model.sizes[-1]]},
            "queries": "each size's own user vectors of the same users (its own network over the history)",
            "items": "each size's own item vectors of the same catalogue (synthetic items through its own item tower)",
            "rerank": "the full size's own user and item vectors (recsys.retrieval.rerank)",
            "timing": "latency_ms and stage0_ms search precomputed queries; encode_ms (per thread count, per size) "
                      "and shortlist_encode_ms (per row) time the encoder pass of the query batch alone (median)",
        }
    write_json_atomically(args.out, report, indent=2)
    if own is not None:
        print(f"own-network funnels ({reason}): each prefix is a smaller size's own network, "
              f"re-ranked by size {model.sizes[-1]}")
    for res in per_threads:
        print(f"\n== {res['threads']} threads: exact {res['exact_ms']} (fastest {res['fastest_exact']}) ==")
        if own is not None:
            print(f"query encoding, ms per size (not in the funnel times): {res['encode_ms']}")
        print(f"{'prefix':>6} {'index':>9} {'nprobe':>6} {'shortlist':>9} {'ms':>9} {'recall':>7} {'x fastest':>9}")
        for r in res["funnel"]:
            print(f"{r['prefix']:>6} {r['prefix_index']:>9} {str(r['nprobe'] or ''):>6} {r['shortlist']:>9} "
                  f"{r['latency_ms']:>9.1f} {r['recall']:>7.4f} {r['speedup_vs_fastest_exact']:>8.2f}x")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
