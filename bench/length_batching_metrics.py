"""Does length-aware batching keep the metrics? Short real trainings both ways (bench/README.md §6).

Trains a dataset's config through ``python -m recsys.train --tracking csv`` (``bench/accuracy.py``'s
runner) a few epochs with length-aware batches (``--data.length_batching true``, the default) and
with random batches (``false``), for each seed, and records the test metrics of each run's best checkpoint and its
training time. The runs go one after another, so their times compare.

    python bench/length_batching_metrics.py --config configs/lastfm.yaml --data-dir data/lastfm --epochs 4 --seeds 0 1

Writes ``bench/results/length_batching_metrics.json``. The noise to judge differences by is the
spread between seeds and the standard error of a per-user hit rate (printed with the results).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

from accuracy import Runs  # bench/accuracy.py's runner of python -m recsys.train
from machine import cpu_model  # bench/machine.py (the script directory is on sys.path)
from recsys.atomic import write_json_atomically
from recsys.data.prepared import load_prepared

ROOT = Path(__file__).resolve().parents[1]

BATCHINGS = {"length": "true", "padded": "false"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "length_batching_metrics.json")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    if not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir}: no such directory")
    if args.epochs < 1:
        parser.error(f"--epochs must be positive, got {args.epochs}")

    users = load_prepared(args.data_dir).num_users  # one test target each
    load_start = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as work:
        trainings = Runs(args.config, Path(work), "csv", parallel=1)  # one after another: times compare
        for seed in args.seeds:
            for batching, flag in BATCHINGS.items():
                trainings.add(f"{batching}-{seed}", [
                    "--data.data_dir", str(args.data_dir), "--seed_everything", str(seed), "--data.seed", str(seed),
                    "--data.length_batching", flag, "--trainer.max_epochs", str(args.epochs),
                ])
        done = trainings.finish()
        for seed in args.seeds:
            for batching in BATCHINGS:
                result = done[f"{batching}-{seed}"]
                run = {"batching": batching, "seed": seed, "seconds": result["wall_s"], "rows": result["rows"]}
                top = run["rows"][-1]
                print(f"seed {seed} {batching:>6}: {run['seconds']:.0f} s, size {top['size']} "
                      f"NDCG@10 {top['ndcg_10']:.4f} Recall@10 {top['recall_10']:.4f}", flush=True)
                runs.append(run)
    report = {
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(), "gpu": None},
        "command": f"python bench/length_batching_metrics.py --config {args.config.as_posix()} --data-dir data/"
        f"{args.data_dir.name} --epochs {args.epochs} --seeds {' '.join(map(str, args.seeds))}",
        "config": args.config.as_posix(),
        "epochs": args.epochs,
        "seeds": args.seeds,
        "test_users": users,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "runs": runs,
    }
    write_json_atomically(args.out, report, indent=2)
    recall = [r["rows"][-1]["recall_10"] for r in runs]
    mean = sum(recall) / len(recall)
    print(f"standard error of Recall@10 at about {mean:.3f} over {users} users: {math.sqrt(mean * (1 - mean) / users):.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
