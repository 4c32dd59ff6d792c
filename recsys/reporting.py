"""What a training run reports per size, wherever it is tracked (MLflow or a local run directory).

:func:`summarise` turns the test metrics into one row per size (parameters, NDCG/Recall@10 and @20,
MRR, encode time); :func:`write_results` writes the rows as ``results.md`` (the table
:func:`results_table` prints), ``results.json`` and ``accuracy_vs_size.png`` into a directory, and
``test_ranks.parquet``: every test user's target rank at each size (``user`` is the prepared
dataset's user index, ``rank_d{s}`` the rank at size ``s``, 1 = best), for per-user comparisons of
two runs (``recsys.significance.paired_bootstrap``). An elastic run (``recsys/nn/grid.py``) has one
row per trained triple instead (its depth and width, and retrieval FLOPs per user) and a heat
map of NDCG@10 over the grid, ``ndcg_grid.png`` (:func:`grid_heat_map`).
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
from recsys.nn.nested import nested_parameter_count

PLOT_FILE = "accuracy_vs_size.png"
GRID_PLOT_FILE = "ndcg_grid.png"  # elastic runs: NDCG@10 over the (depth, width) x size grid
RESULT_FILES = ("results.md", "results.json", PLOT_FILE)
RANKS_FILE = "test_ranks.parquet"


def is_grid(rows: list[dict[str, Any]]) -> bool:
    """Rows of an elastic run: one per trained (depth, width, size) triple."""
    return bool(rows) and "triple" in rows[0]


def grid_heat_map(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """NDCG@10 of every trained triple: one row per (depth, width), one column per size; each cell
    annotated with the value and the parameters; untrained cells blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = sorted({(r["depth"], r["width"]) for r in rows})
    sizes = sorted({r["size"] for r in rows})
    values = np.full((len(lines), len(sizes)), np.nan)
    for r in rows:
        values[lines.index((r["depth"], r["width"])), sizes.index(r["size"])] = r["ndcg_10"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(sizes), 1.2 + 0.55 * len(lines)), dpi=120)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    for r in rows:
        y, x = lines.index((r["depth"], r["width"])), sizes.index(r["size"])
        ax.text(x, y, f"{r['ndcg_10']:.4f}\n{r['parameters'] / 1e3:.0f}k", ha="center", va="center", fontsize=7,
                color="white" if r["ndcg_10"] < np.nanmean(values) else "black")
    ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set_yticks(range(len(lines)), [f"depth {d}, width {w}" for d, w in lines])
    ax.set_xlabel("vector size (retrieval cost)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="test NDCG@10")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


#: the results table's columns: key, header, alignment, format; a row's table has those it holds
TABLE_COLUMNS = (
    ("triple", "triple", "---", str),
    ("depth", "depth", "---:", str),
    ("width", "width", "---:", str),
    ("size", "size", "---:", str),
    ("parameters", "parameters", "---:", "{:,}".format),
    ("ndcg_10", "NDCG@10", "---:", "{:.4f}".format),
    ("recall_10", "Recall@10", "---:", "{:.4f}".format),
    ("mrr", "MRR", "---:", "{:.4f}".format),
    ("encode_ms_per_1k", "encode ms / 1k users", "---:", "{:.1f}".format),
    ("retrieval_flops_per_user", "retrieval MFLOPs / user", "---:", lambda v: f"{v / 1e6:.3f}"),
)


def results_table(rows: list[dict[str, Any]]) -> str:
    """The results table, as markdown (printed at the end of training and logged): one line per
    size, or per trained triple of an elastic run (with its depth, width and retrieval cost)."""
    columns = [c for c in TABLE_COLUMNS if rows and c[0] in rows[0]]
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "|".join(c[2] for c in columns) + "|"]
    lines += ["| " + " | ".join(c[3](r[c[0]]) for c in columns) + " |" for r in rows]
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
    save_size_plot(fig, ax, sizes, "test metric", title, path)


def save_size_plot(fig, ax, sizes: list[int], ylabel: str, title: str, path: Path) -> None:
    """A plot against size, finished and written: sizes on a log2 axis, labels, grid and legend."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("size (dimensions of user and item vectors)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def encode_ms_per_1k(net, datamodule) -> float:
    """Wall time to encode test users with ``net`` (a network cut to a size) (median of 3), per 1,000 users."""
    batch = next(iter(datamodule.test_dataloader()))
    net.eval()
    with torch.no_grad():
        items = net.item_matrix()
        net.user_vectors(batch["input_ids"], items)  # untimed: the first call pays one-off costs
        times = []
        for _ in range(3):
            start = time.perf_counter()
            net.user_vectors(batch["input_ids"], items)
            times.append(time.perf_counter() - start)
    return sorted(times)[1] / len(batch["input_ids"]) * 1e6


METRICS = ("ndcg_10", "recall_10", "ndcg_20", "recall_20", "mrr")


def summarise(model, datamodule, test_metrics: dict[str, float]) -> list[dict[str, Any]]:
    """One row per trained sub-model: its size, its cut network's parameters and encode time, its
    test metrics. An elastic run's rows also name the triple, its depth and width, and its
    retrieval FLOPs per user (one multiply-add per item and dimension: ``2 N s``)."""
    model.net.cpu()
    num_items = model.net.item_matrix().shape[0] - 1
    rows = []
    for t, name in zip(model.trained.triples, model.trained.names):
        small = model.cut_triple(t)
        row = {"triple": name, "depth": t.depth, "width": t.width} if model.trained.elastic else {}
        row.update({"size": t.size, "parameters": nested_parameter_count(small),
                    **{key: test_metrics[f"{key}/{name}"] for key in METRICS},
                    "encode_ms_per_1k": encode_ms_per_1k(small, datamodule)})
        if model.trained.elastic:
            row["retrieval_flops_per_user"] = 2 * num_items * t.size
        rows.append(row)
    return rows


def test_ranks_table(test_ranks: tuple[np.ndarray, np.ndarray] | None, names) -> pl.DataFrame | None:
    """``(users, ranks (M, users))`` as a table: ``user`` and one ``rank_<name>`` column per trained
    sub-model (``rank_d64`` for a size, ``rank_L2_w128_d64`` for a triple)."""
    if test_ranks is None:
        return None
    users, ranks = test_ranks
    return pl.DataFrame({"user": users, **{f"rank_{n}": ranks[m] for m, n in enumerate(names)}})


def write_results(directory: Path, rows: list[dict[str, Any]], title: str, ranks: pl.DataFrame | None = None) -> list[Path]:
    """``results.md``, ``results.json``, ``accuracy_vs_size.png`` and (given ``ranks``)
    ``test_ranks.parquet`` in ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomically(directory / "results.md", results_table(rows) + "\n")
    write_json_atomically(directory / "results.json", rows, indent=2)
    if is_grid(rows):
        grid_heat_map(rows, directory / GRID_PLOT_FILE, title)
        paths = [directory / name for name in ("results.md", "results.json", GRID_PLOT_FILE)]
    else:
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


def git_commit(directory: str | Path | None = None) -> str | None:
    """The commit checked out in ``directory`` (default: the working directory), or None outside git."""
    where = [] if directory is None else ["-C", str(directory)]
    try:
        out = subprocess.run(["git", *where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except Exception:
        return None
