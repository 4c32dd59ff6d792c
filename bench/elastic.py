"""Elastic sub-models on real data (issue 20): one grid run against (depth, width, size) twins.

    .venv/bin/python bench/elastic.py --config configs/sports.yaml --parallel 2 \\
        --depths 1,2 --pairs 16:16,32:32,256:16,256:32,256:256 --grid full \\
        --twins L2_w256_d16,L2_w256_d32,L1_w32_d32

Trains, each through ``python -m recsys.train`` in its own process (``bench/accuracy.py``'s
``Runs``): the grid run (``--model.depths/pairs/grid``, or ``--model.triples`` with
``--triples``: every listed triple in one run) and, per
twin, that triple trained alone (``--model.triples [[d, w, s]]``), under the config's protocol.
Every run tests its best checkpoint (early stopping on its validation NDCG@10, for the grid the
mean over its triples).

Then, with no training running, the encoding cost of every triple is measured again on the same
histories: the best grid checkpoint cut to the triple (``cut_to_size``), encoding test users
(median of ``--repeats`` passes, ms per 1,000 users), beside SASRec of the config's width and
depth (the encoder the goal compares with; its weights do not change its time).

Reported in ``bench/results/elastic_<name>.json`` (and the heat map ``elastic_<name>.png``):

- per triple: test NDCG@10 / Recall@10, parameters, encode ms per 1k users, retrieval MFLOPs/user;
- per twin: its NDCG@10, the grid's ratio to it, and the paired bootstrap over test users of
  (grid - twin) NDCG@10 with its 95% interval;
- the goal: at each size below the width, the best triple whose encoding is no dearer than
  SASRec's, against the fully nested cut of that size (``Lmax_w<s>_d<s>`` of the grid run where it
  trains one, and the plain Matryoshka run of the config, ``accuracy_<config>.json``, where it
  exists), and whether it is 1.2x;
  whether every twin is at least 0.97x;
- the cost: the grid run's wall time and peak RSS against the twins' sum.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from accuracy import Runs  # (bench/ is the script's directory)
from recsys.atomic import write_json_atomically
from recsys.metrics import ndcg_of_ranks
from recsys.nn.grid import Triple
from recsys.reporting import grid_heat_map
from recsys.significance import paired_bootstrap

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_GAIN, GOAL_TWIN_RATIO = 1.2, 0.97


#: the options an elastic grid needs whatever the config says (recsys.model_options.check_options refuses
#: per-size networks and a per-size monitor with a grid), and neither distillation nor a config's weight averaging
#: (the grids were measured without; a config's were measured for its sizes as networks of their own)
GRID_BASE = ["--model.separate_item_vectors", "false", "--model.nesting", "blocks", "--model.prefix_gradient", "1",
             "--model.monitor_size", "mean", "--model.distill", "0", "--trainer.callbacks", "[]"]


def parse_triple(label: str) -> Triple:
    """``L2_w256_d16`` -> Triple(2, 256, 16), or the command's one-line refusal."""
    try:
        return Triple.from_label(label)
    except ValueError as exc:
        raise SystemExit(f"--twins: {exc}") from None


def without_workdir(argv: list[str]) -> list[str]:
    """The command line as recorded: ``--workdir`` (a path of this machine) left out."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--workdir="):
            skip = False
            continue
        if arg == "--workdir":
            skip = True
            continue
        out.append(arg)
    return out


def per_user_ndcg(runs: Runs, name: str, column: int) -> tuple[np.ndarray, np.ndarray]:
    users, ranks = runs.ranks(name)
    return users, ndcg_of_ranks(ranks[column], k=10)


def encoding_costs(best: str, data: dict, labels: list[str], repeats: int, users: int) -> dict[str, float]:
    """ms per 1,000 users to encode test histories: every triple of the grid checkpoint ``best``
    (cut to it), and ``sasrec``, SASRec at the checkpoint's width and depth (untrained)."""
    from recsys.data import SequenceDataModule
    from recsys.model import MatryoshkaRecommender
    from recsys.nn.item_tower import ItemTower
    from recsys.nn.nested import cut_to_size
    from recsys.reporting import encode_ms_per_1k

    model = MatryoshkaRecommender.from_checkpoint(best)
    datamodule = SequenceDataModule(data_dir=data["data_dir"], max_len=data.get("max_len", 50), eval_batch_size=users)
    datamodule.setup("test")
    options = {k: v for k, v in model.hparams.items() if k not in ("depths", "pairs", "grid", "triples")}
    features = ItemTower.features_from_state_dict(model.state_dict(), prefix="net.items.")
    sasrec = MatryoshkaRecommender(item_features=features, **{**options, "encoder": "sasrec"})

    def median_of(small) -> float:
        return float(np.median([encode_ms_per_1k(small, datamodule) for _ in range(repeats)]))

    costs = {}
    for label in labels:
        t = parse_triple(label)
        costs[label] = median_of(cut_to_size(model.net, t.size, width=t.width, depth=t.depth))
    costs["sasrec"] = median_of(sasrec.net)
    return costs


def goal_rows(grid_rows: list[dict], costs: dict[str, float], nested_plain: dict[int, float]) -> list[dict]:
    """Per vector size below the width: the best triple no dearer to encode than SASRec, against
    the fully nested cut of that size."""
    width = max(r["width"] for r in grid_rows)
    deepest = max(r["depth"] for r in grid_rows)
    by_label = {r["triple"]: r for r in grid_rows}
    out = []
    for size in sorted({r["size"] for r in grid_rows if r["size"] < width}):
        nested = by_label.get(Triple(deepest, size, size).label)
        affordable = [r for r in grid_rows if r["size"] == size and costs[r["triple"]] <= costs["sasrec"]]
        if (nested is None and size not in nested_plain) or not affordable:
            continue
        best = max(affordable, key=lambda r: r["ndcg_10"])
        row = {"size": size, "best": best["triple"], "ndcg_10": best["ndcg_10"], "encode_ms_per_1k": costs[best["triple"]]}
        if nested is not None:
            row |= {"nested": nested["triple"], "nested_ndcg_10": nested["ndcg_10"],
                    "gain_over_nested": best["ndcg_10"] / nested["ndcg_10"]}
        if size in nested_plain:
            row["plain_one_run_ndcg_10"] = nested_plain[size]
            row["gain_over_plain_one_run"] = best["ndcg_10"] / nested_plain[size]
        row["met"] = row.get("gain_over_plain_one_run", row.get("gain_over_nested", 0)) >= GOAL_GAIN
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--name", default=None, help="results name (default: the config's name)")
    parser.add_argument("--depths", help="--model.depths, e.g. 1,2")
    parser.add_argument("--pairs", help="--model.pairs as width:size, e.g. 16:16,256:16")
    parser.add_argument("--grid", choices=["diagonal", "full"], default="full")
    parser.add_argument("--triples", help="instead of --depths/--pairs: --model.triples as depth:width:size, e.g. 1:256:16,2:256:256")
    parser.add_argument("--twins", required=True, help="triples trained alone, e.g. L2_w256_d16,L1_w32_d32")
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--set", action="append", default=[], help="any other override, KEY=VALUE")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=7, help="passes per encoding time (their median)")
    parser.add_argument("--encode-users", type=int, default=1024, help="test users per encoding pass")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the test users")
    parser.add_argument("--label", default="", help="a note on the protocol")
    parser.add_argument("--plain", default=None,
                        help="the plain one run to hold the goal against (default accuracy_<config>.json "
                             "in --out-dir); 'none' where its protocol differs from this one")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="the runs' directory (default: a new one); runs an earlier job there finished are "
                             "not trained again, so a killed job resumes, and a finished one only re-times")
    args = parser.parse_args()

    config = yaml.safe_load(args.config.read_text())
    name = args.name or args.config.stem
    if bool(args.triples) == bool(args.depths and args.pairs):
        parser.error("give --depths and --pairs, or --triples")
    if args.triples:
        triples = [[int(x) for x in t.split(":")] for t in args.triples.split(",")]
        depths, pairs = sorted({t[0] for t in triples}), None
        grid_options = ["--model.triples", json.dumps(triples)]
    else:
        depths = [int(d) for d in args.depths.split(",")]
        pairs = [[int(x) for x in p.split(":")] for p in args.pairs.split(",")]
        grid_options = ["--model.depths", json.dumps(depths), "--model.pairs", json.dumps(pairs), "--model.grid", args.grid]
    twins = [parse_triple(label) for label in args.twins.split(",")]
    # a grid's sizes are prefixes of one network: the per-size options of a config are set back to
    # that (a config may train its sizes as networks of their own), before any --set
    overrides = [*GRID_BASE, "--seed_everything", str(args.seed)]
    if args.epochs:
        overrides += ["--trainer.max_epochs", str(args.epochs)]
    for item in args.set:
        key, _, value = item.partition("=")
        overrides += [f"--{key}", value]

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"elastic-{name}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs = Runs(args.config, workdir, "csv", args.parallel)
    runs.add("grid", [*overrides, *grid_options])
    for t in twins:
        runs.add(f"twin-{t.label}", [*overrides, "--model.triples", json.dumps([[t.depth, t.width, t.size]])])
    print(f"[{name}] {len(runs.pending)} runs, {args.parallel} at a time, in {workdir}", flush=True)
    results = runs.finish()

    grid = results["grid"]
    labels = [r["triple"] for r in grid["rows"]]
    missing = [t.label for t in twins if t.label not in labels]
    if missing:
        raise SystemExit(f"--twins {missing} are not among the grid's triples {labels}")
    load_at_timing = os.getloadavg()[0]  # other work on the machine would slow the timings
    costs = encoding_costs(grid["best"], config["data"], labels, args.repeats, args.encode_users)
    rows = [{**r, "encode_ms_per_1k": costs[r["triple"]]} for r in grid["rows"]]

    twin_rows = []
    for t in twins:
        twin = results[f"twin-{t.label}"]
        users_g, g = per_user_ndcg(runs, "grid", labels.index(t.label))
        users_t, a = per_user_ndcg(runs, f"twin-{t.label}", 0)
        if not np.array_equal(users_g, users_t):
            raise RuntimeError(f"the grid run and twin {t.label} tested different users")
        ours = next(r for r in rows if r["triple"] == t.label)
        twin_rows.append({
            "triple": t.label, "ndcg_10": twin["rows"][0]["ndcg_10"], "recall_10": twin["rows"][0]["recall_10"],
            "grid_ndcg_10": ours["ndcg_10"], "ratio": ours["ndcg_10"] / twin["rows"][0]["ndcg_10"],
            "grid_minus_twin": paired_bootstrap(g, a, resamples=args.resamples).to_dict(),
            **{k: twin[k] for k in ("epochs", "best_val", "wall_s", "peak_rss_mb")},
        })

    # the config's plain one run (bench/accuracy.py), under the same protocol
    plain = args.out_dir / (args.plain or f"accuracy_{args.config.stem}.json")
    nested_plain = {}
    if args.plain != "none" and plain.exists():
        nested_plain = {r["size"]: r["ndcg_10"] for r in json.loads(plain.read_text())["matryoshka"]["rows"]}
    goals = goal_rows(rows, costs, nested_plain)
    report = {
        "name": name,
        "commands": {"bench": "python bench/elastic.py " + " ".join(without_workdir(sys.argv[1:]))},
        "protocol": {"epochs": args.epochs or config["trainer"].get("max_epochs"),
                     "patience": (config.get("early_stopping") or {}).get("patience"),
                     "seed": args.seed, "overrides": overrides, "label": args.label,
                     "plain_one_run": plain.name if nested_plain else None},
        "grid": {"depths": depths, "pairs": pairs, "grid": "triples" if args.triples else args.grid, "rows": rows,
                 **{k: grid[k] for k in ("epochs", "best_val", "wall_s", "peak_rss_mb")}},
        "encode_ms_per_1k_sasrec": costs["sasrec"],
        "twins": twin_rows,
        "goal": {"sizes": goals, "twins_at_least_0.97": all(r["ratio"] >= GOAL_TWIN_RATIO for r in twin_rows)},
        "cost": {"grid_wall_s": grid["wall_s"], "grid_peak_rss_mb": grid["peak_rss_mb"],
                 "twins_wall_s": sum(r["wall_s"] for r in twin_rows),
                 "twins_peak_rss_mb": max(r["peak_rss_mb"] for r in twin_rows), "twins": len(twin_rows),
                 "triples": len(rows)},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores" + (
            f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "load_average_at_timing": load_at_timing,
        "parallel": args.parallel,
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out_dir / f"elastic_{name}.json", report, indent=2)
    grid_heat_map(rows, args.out_dir / f"elastic_{name}.png", f"{name}: one grid run, test NDCG@10")
    print(json.dumps({"goal": report["goal"], "twins": [{k: r[k] for k in ("triple", "ndcg_10", "grid_ndcg_10", "ratio")}
                                                        for r in twin_rows], "cost": report["cost"]}, indent=1))


if __name__ == "__main__":
    main()
