"""Cold-start quality (bench/README.md §6): ranking items that training never saw.

    python -m recsys.data prepare ... --cold-start-fraction 0.1 --out data/sports-cold   # once
    .venv/bin/python bench/cold_start.py --config configs/sports.yaml --data-dir data/sports-cold

The protocol (``prepare --cold-start-fraction``): a random tenth of the interacted items is held out
of training entirely. Their events are removed from every history except where one is a user's last
event, the test target, and the training loss never has them as candidates; they stay in the
catalogue, so the test ranks them among all items (full ranking, leave-one-out as everywhere).

Trained through ``python -m recsys.train`` (one process per model, as ``bench/accuracy.py``):

- ``features``: the item tower from the item features alone (no item-ID embedding);
- ``features+id``: features and ID embeddings (a held-out item has no trained ID vector: the tower
  gives it its features' vector only);
- ``features+id-dropout``: the same, with ``--model.id_dropout 0.5`` (in training each item's ID
  vector left out half the time, so that the features alone must rank it too);
- ``id-only``: ID embeddings alone, which cannot rank an item it never trained on (its vector is 0);

and, as the floor, popularity (training counts: a held-out item has none). Reported per size on
the test users whose target is a cold-start item (``cold``), on the others (``warm``) and on all,
NDCG@10 and Recall@10, from each run's per-user test ranks; written to
``bench/results/cold_start_<name>.json``.
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

from accuracy import Runs  # (bench/ is the script's directory)
from recsys.atomic import write_json_atomically
from recsys.data import load_prepared
from recsys.metrics import ndcg_of_ranks, popularity_scores_ranks

RESULTS = Path(__file__).resolve().parent / "results"

MODELS = {
    "features": ["--model.use_id_embedding", "false"],
    "features+id": ["--model.use_id_embedding", "true"],
    "features+id-dropout": ["--model.use_id_embedding", "true", "--model.id_dropout", "0.5"],
    "id-only": ["--model.use_id_embedding", "true", "--model.modalities", "[]"],
}


def summary(ranks: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """NDCG@10 and Recall@10 of ``ranks`` (one per user) over each group of users (a boolean mask)."""
    return {
        name: {"users": int(mask.sum()),
               "ndcg_10": float(ndcg_of_ranks(ranks[mask]).mean()) if mask.any() else float("nan"),
               "recall_10": float((ranks[mask] <= 10).mean()) if mask.any() else float("nan")}
        for name, mask in groups.items()
    }


def popularity_ranks(data, users: np.ndarray, mask_seen: bool) -> np.ndarray:
    """Each user's test-target rank under the training-count popularity."""
    popularity = torch.from_numpy(data.train_counts).float()
    targets = torch.from_numpy(data.test_targets[users])
    seen = None
    if mask_seen:
        histories = [data.history(int(u))[:-1] for u in users]
        seen = torch.zeros(len(users), max(len(h) for h in histories), dtype=torch.long)
        for i, h in enumerate(histories):
            seen[i, : len(h)] = torch.from_numpy(h.astype(np.int64))
    return popularity_scores_ranks(popularity, targets, seen, 1)[0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the dataset's training config")
    parser.add_argument("--data-dir", type=Path, required=True, help="the dataset prepared with --cold-start-fraction")
    parser.add_argument("--name", default=None, help="results name (default: the data directory's name)")
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--sizes", default=None, help="override model.sizes, e.g. 16,64,256")
    parser.add_argument("--set", action="append", default=[], help="any other override, KEY=VALUE")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--add", action="store_true",
                        help="train only --models and add them to the existing report of the same settings "
                             "(the runs are seeded, so the others would come out the same)")
    args = parser.parse_args()

    data = load_prepared(args.data_dir)
    cold_items = data.cold_start_items
    if not len(cold_items):
        parser.error(f"{args.data_dir}: no cold-start items; prepare it with --cold-start-fraction")
    overrides = ["--data.data_dir", str(args.data_dir)]
    if args.epochs:
        overrides += ["--trainer.max_epochs", str(args.epochs)]
    if args.sizes:
        overrides += ["--model.sizes", f"[{args.sizes}]"]
    for item in args.set:
        key, _, value = item.partition("=")
        overrides += [f"--{key}", value]
    name = args.name or args.data_dir.name
    out = RESULTS / f"cold_start_{name}.json"
    earlier = {}
    if args.add:
        if not out.exists():
            parser.error(f"--add: {out} does not exist yet")
        before = json.loads(out.read_text())
        if before["overrides"] != overrides or before["config"] != str(args.config):
            parser.error(f"--add: {out} was trained with {before['config']} {before['overrides']}, not these settings")
        earlier = {k: v for k, v in before["models"].items() if k not in args.models}
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix=f"cold-start-{name}-"))
    runs = Runs(args.config, workdir, "csv", args.parallel)
    for model in args.models:
        runs.add(model, [*overrides, *MODELS[model], "--model.monitor_size", "mean"])
    print(f"[{name}] {len(cold_items)} cold-start items, models {args.models}, in {workdir}", flush=True)
    results = runs.finish()

    users = np.arange(1, data.num_users + 1)
    cold = data.cold_start[data.test_targets[users]]
    groups = {"cold": cold, "warm": ~cold, "all": np.ones_like(cold)}
    import yaml

    mask_seen = bool(yaml.safe_load(args.config.read_text())["model"].get("mask_seen", True))
    report: dict = {
        "name": name,
        "command": "python bench/cold_start.py " + " ".join(sys.argv[1:]),
        "config": str(args.config),
        "data": data.stats["cold_start"] | {"catalogue_items": data.num_items, "users": data.num_users},
        "mask_seen": mask_seen,
        "overrides": overrides,
        "popularity": summary(popularity_ranks(data, users, mask_seen), groups),
        "models": dict(earlier),
    }
    for model in args.models:
        run_users, ranks = runs.ranks(model)
        if not np.array_equal(run_users, users):
            raise RuntimeError(f"run {model} did not test every user once")
        sizes = [r["size"] for r in results[model]["rows"]]
        report["models"][model] = {
            "epochs": results[model]["epochs"], "wall_s": results[model]["wall_s"],
            "by_size": {str(s): summary(ranks[m], groups) for m, s in enumerate(sizes)},
        }
    report["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores"
    report["load_average"] = {"start": load_before, "end": os.getloadavg()}
    report["date"] = time.strftime("%Y-%m-%d")
    if earlier:
        report["models"] = {m: report["models"][m] for m in MODELS if m in report["models"]}  # the usual order
        report["added"] = {"models": args.models, "command": report["command"]}
        report["command"] = before["command"]
    write_json_atomically(out, report, indent=2)
    print(f"\ncold-start test users: {int(cold.sum())} of {len(users)}")
    print(f"{'model':<14}{'size':>6}{'cold NDCG@10':>14}{'cold R@10':>11}{'warm NDCG@10':>14}{'all NDCG@10':>13}")
    print(f"{'popularity':<14}{'':>6}{report['popularity']['cold']['ndcg_10']:>14.4f}"
          f"{report['popularity']['cold']['recall_10']:>11.4f}{report['popularity']['warm']['ndcg_10']:>14.4f}"
          f"{report['popularity']['all']['ndcg_10']:>13.4f}")
    for model, r in report["models"].items():
        for s, g in r["by_size"].items():
            print(f"{model:<14}{s:>6}{g['cold']['ndcg_10']:>14.4f}{g['cold']['recall_10']:>11.4f}"
                  f"{g['warm']['ndcg_10']:>14.4f}{g['all']['ndcg_10']:>13.4f}")


if __name__ == "__main__":
    main()
