"""Accuracy and cost on real data: one Matryoshka run against separately trained sizes and SASRec.

    .venv/bin/python bench/accuracy.py --config configs/lastfm.yaml
    .venv/bin/python bench/accuracy.py --config configs/ml-1m.yaml --epochs 10 --max-len 50 --label reduced
    .venv/bin/python bench/accuracy.py --config configs/ml-1m.yaml --set model.use_id_embedding=false

For a dataset recipe it trains, each in its own process (so wall time and peak memory are per run):
the Matryoshka model over all sizes, one model per size trained alone, and SASRec at the full size.
Every run tests its best checkpoint (by validation NDCG@10) on the held-out last items, full
ranking. It prints and writes ``bench/results/accuracy_<name>.{json,md}``: the accuracy table, the
protocol (history masking, max length, epochs), the cost table (wall time and peak RSS of the one
Matryoshka run against the sum of the separate runs), and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# Runs recsys.train in this child process and reports its rows, wall time and peak RSS as JSON.
CHILD = """
import json, resource, sys, time
from recsys.train import run
start = time.perf_counter()
result = run(sys.argv[1:])
print("BENCH-RESULT " + json.dumps({
    "rows": result["rows"], "run_id": result["run_id"],
    "wall_s": time.perf_counter() - start,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def train(config: Path, overrides: list[str], workdir: Path) -> dict:
    args = [
        "--config", str(config), *overrides,
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--mlflow.tracking_uri", f"sqlite:///{workdir}/mlflow.db",
        "--mlflow.artifact_location", str(workdir / "artifacts"),
        "--mlflow.experiment", "bench-accuracy",
        "--mlflow.log_models", "false",
        "--checkpoint.dirpath", str(Path(tempfile.mkdtemp(dir=workdir))),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training failed ({' '.join(overrides)}):\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH-RESULT "))
    return json.loads(line[len("BENCH-RESULT "):])


def fmt(x: float) -> str:
    return f"{x:.4f}"


def markdown(report: dict) -> str:
    p = report["protocol"]
    lines = [
        f"# Accuracy on {report['name']}",
        "",
        f"Protocol: leave-one-out, full ranking over {p['items']} items, history items "
        f"{'masked' if p['mask_seen'] else 'not masked'}, max length {p['max_len']}, up to {p['epochs']} epochs "
        f"(early stopping on validation NDCG@10), test metrics of the best checkpoint. {p['label']}",
        f"Machine: {report['machine']}, {report['threads']} threads. Overrides: `{' '.join(report['overrides']) or 'none'}`.",
        "",
        "| size | params (Matryoshka) | NDCG@10 M | Recall@10 M | NDCG@20 M | Recall@20 M "
        "| NDCG@10 sep | Recall@10 sep | NDCG@20 sep | Recall@20 sep |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    separate = {r["size"]: r for r in report["separate"]}
    for r in report["matryoshka"]["rows"]:
        s = separate.get(r["size"])
        sep = [fmt(s[k]) for k in ("ndcg_10", "recall_10", "ndcg_20", "recall_20")] if s else ["-"] * 4
        lines.append(
            f"| {r['size']} | {r['parameters']:,} | {fmt(r['ndcg_10'])} | {fmt(r['recall_10'])} | {fmt(r['ndcg_20'])} "
            f"| {fmt(r['recall_20'])} | " + " | ".join(sep) + " |"
        )
    if report.get("sasrec"):
        r = report["sasrec"]["rows"][-1]
        lines += ["", f"SASRec at size {r['size']} ({r['parameters']:,} params): NDCG@10 {fmt(r['ndcg_10'])}, "
                  f"Recall@10 {fmt(r['recall_10'])}, NDCG@20 {fmt(r['ndcg_20'])}, Recall@20 {fmt(r['recall_20'])}."]
    c = report["cost"]
    lines += [
        "",
        "| training cost | wall time (s) | peak RSS (MB) |",
        "|---|---:|---:|",
        f"| one Matryoshka run, all sizes | {c['matryoshka_wall_s']:.0f} | {c['matryoshka_peak_rss_mb']:.0f} |",
        f"| separate runs, sum (max for memory) | {c['separate_wall_s']:.0f} | {c['separate_peak_rss_mb']:.0f} |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--name", default=None, help="results name (default: the config's name)")
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--max-len", type=int, default=None, help="override data.max_len")
    parser.add_argument("--sizes", default=None, help="override model.sizes, e.g. 16,32,64")
    parser.add_argument("--set", action="append", default=[], help="any other override, KEY=VALUE")
    parser.add_argument("--skip-separate", action="store_true")
    parser.add_argument("--skip-sasrec", action="store_true")
    parser.add_argument("--label", default="", help="a note on the protocol, e.g. 'reduced: 10 epochs, length 50'")
    args = parser.parse_args()

    config = yaml.safe_load(args.config.read_text())
    overrides: list[str] = []
    if args.epochs:
        overrides += ["--trainer.max_epochs", str(args.epochs)]
    if args.max_len:
        overrides += ["--data.max_len", str(args.max_len)]
    for item in args.set:
        key, _, value = item.partition("=")
        overrides += [f"--{key}", value]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else config["model"]["sizes"]
    name = args.name or args.config.stem
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"accuracy-{name}-"))

    def sized(s: list[int], *extra: str) -> list[str]:
        return [*overrides, "--model.sizes", json.dumps(s), *extra]

    print(f"[{name}] Matryoshka run over sizes {sizes}", flush=True)
    report: dict = {"name": name, "overrides": overrides, "matryoshka": train(args.config, sized(sizes), workdir)}
    report["separate"] = []
    if not args.skip_separate:
        for s in sizes:
            print(f"[{name}] separate run at size {s}", flush=True)
            one = train(args.config, sized([s]), workdir)
            report["separate"].append({**one["rows"][0], "wall_s": one["wall_s"], "peak_rss_mb": one["peak_rss_mb"]})
    if not args.skip_sasrec:
        print(f"[{name}] SASRec at size {sizes[-1]}", flush=True)
        report["sasrec"] = train(args.config, sized(sizes, "--model.encoder", "sasrec"), workdir)

    import torch

    from recsys.data import load_prepared

    data = load_prepared(ROOT / config["data"]["data_dir"])
    report["protocol"] = {
        "items": data.num_items,
        "users": data.num_users,
        "mask_seen": config["model"].get("mask_seen", True),
        "max_len": args.max_len or config["data"].get("max_len"),
        "epochs": args.epochs or config["trainer"].get("max_epochs"),
        "label": args.label,
    }
    report["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores"
    report["threads"] = torch.get_num_threads()
    report["cost"] = {
        "matryoshka_wall_s": report["matryoshka"]["wall_s"],
        "matryoshka_peak_rss_mb": report["matryoshka"]["peak_rss_mb"],
        "separate_wall_s": sum(r["wall_s"] for r in report["separate"]),
        "separate_peak_rss_mb": max((r["peak_rss_mb"] for r in report["separate"]), default=0.0),
    }
    report["date"] = time.strftime("%Y-%m-%d")
    text = markdown(report)
    (RESULTS / f"accuracy_{name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"accuracy_{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
