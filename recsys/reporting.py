"""What a training run reports per size, wherever it is tracked (MLflow or a local run directory).

:func:`summarise` turns the test metrics into one row per size (parameters, NDCG/Recall@10 and @20,
MRR, encode time); :func:`write_results` writes the rows as ``results.md`` (the table
:func:`results_table` prints), ``results.json`` and ``accuracy_vs_size.png`` into a directory, and
``test_ranks.parquet``: every test user's target rank at each size (``user`` is the prepared
dataset's user index, ``rank_d{s}`` the rank at size ``s``, 1 = best), for per-user comparisons of
two runs (``recsys.significance.paired_bootstrap``).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.atomic import atomic_file, write_json_atomically, write_text_atomically
from recsys.nn.nested import cut_sizes, cut_to_size

PLOT_FILE = "accuracy_vs_size.png"
RESULT_FILES = ("results.md", "results.json", PLOT_FILE)
RANKS_FILE = "test_ranks.parquet"


def results_table(rows: list[dict[str, Any]]) -> str:
    """The per-size table, as markdown (printed at the end of training and logged)."""
    header = "| size | parameters | NDCG@10 | Recall@10 | MRR | encode ms / 1k users |"
    lines = [header, "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['parameters']:,} | {r['ndcg_10']:.4f} | {r['recall_10']:.4f} | {r['mrr']:.4f} "
            f"| {r['encode_ms_per_1k']:.1f} |"
        )
    return "\n".join(lines)


def accuracy_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """NDCG@10 and Recall@10 against size (log2 axis), annotated with parameter counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["size"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.plot(sizes, [r["ndcg_10"] for r in rows], "o-", label="NDCG@10")
    ax.plot(sizes, [r["recall_10"] for r in rows], "s--", label="Recall@10")
    for r in rows:
        ax.annotate(f"{r['parameters'] / 1e3:.0f}k params", (r["size"], r["ndcg_10"]), textcoords="offset points",
                    xytext=(0, -14), ha="center", fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("size (dimensions of user and item vectors)")
    ax.set_ylabel("test metric")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _encode_ms_per_1k(net, datamodule, size: int) -> float:
    """Wall time to encode test users with the network cut to ``size`` (median of 3), per 1,000 users."""
    batch = next(iter(datamodule.test_dataloader()))
    small = cut_to_size(net, size) if size in cut_sizes(net) else net
    small.eval()
    with torch.no_grad():
        items = small.item_matrix()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            small.user_vectors(batch["input_ids"], items)
            times.append(time.perf_counter() - start)
    return sorted(times)[1] / len(batch["input_ids"]) * 1e6


def summarise(model, datamodule, test_metrics: dict[str, float]) -> list[dict[str, Any]]:
    params = model.parameters_per_size()
    rows = []
    for s in model.sizes:
        rows.append(
            {
                "size": s,
                "parameters": params[s],
                "ndcg_10": test_metrics[f"ndcg_10/d{s}"],
                "recall_10": test_metrics[f"recall_10/d{s}"],
                "ndcg_20": test_metrics[f"ndcg_20/d{s}"],
                "recall_20": test_metrics[f"recall_20/d{s}"],
                "mrr": test_metrics[f"mrr/d{s}"],
                "encode_ms_per_1k": _encode_ms_per_1k(model.net.cpu(), datamodule, s),
            }
        )
    return rows


def test_ranks_table(test_ranks: tuple[np.ndarray, np.ndarray] | None, sizes) -> pl.DataFrame | None:
    """``(users, ranks (M, users))`` as a table: ``user`` and one ``rank_d{s}`` column per size."""
    if test_ranks is None:
        return None
    users, ranks = test_ranks
    return pl.DataFrame({"user": users, **{f"rank_d{s}": ranks[m] for m, s in enumerate(sizes)}})


def write_results(directory: Path, rows: list[dict[str, Any]], title: str, ranks: pl.DataFrame | None = None) -> list[Path]:
    """``results.md``, ``results.json``, ``accuracy_vs_size.png`` and (given ``ranks``)
    ``test_ranks.parquet`` in ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomically(directory / "results.md", results_table(rows) + "\n")
    write_json_atomically(directory / "results.json", rows, indent=2)
    accuracy_plot(rows, directory / PLOT_FILE, title)
    paths = [directory / name for name in RESULT_FILES]
    if ranks is not None:
        with atomic_file(directory / RANKS_FILE) as tmp:
            ranks.write_parquet(tmp)
        paths.append(directory / RANKS_FILE)
    return paths


def dataset_name(data_dir: str | None) -> str:
    """What a run trained on, as its title and name say it: the data directory's name, or ``synthetic``."""
    return Path(data_dir).name if data_dir else "synthetic"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except Exception:
        return None
