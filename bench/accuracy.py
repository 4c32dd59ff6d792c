"""Accuracy and cost on real data: one Matryoshka run against separately trained sizes and SASRec.

    .venv/bin/python bench/accuracy.py --config configs/lastfm.yaml
    .venv/bin/python bench/accuracy.py --config configs/ml-1m.yaml --epochs 10 --max-len 50 --label reduced
    .venv/bin/python bench/accuracy.py --config configs/ml-1m.yaml --set model.use_id_embedding=false
    python bench/accuracy.py --config configs/ml-1m.yaml --parallel 4 --separate-sizes 16,256
        # four runs sharing a GPU; on a machine without MLflow the runs use --tracking csv

For a dataset recipe it trains, each in its own process (so wall time and peak memory are per run):
the Matryoshka model over all sizes, one model per size trained alone, and SASRec at the full size.
Every run tests its best checkpoint (by validation NDCG@10; for the Matryoshka run its mean over
the sizes) on the held-out last items, full ranking. It prints and writes ``bench/results/accuracy_<name>.{json,md}``: the accuracy table, the
protocol (history masking, max length, epochs), epochs and best validation score per run, the cost
table (wall time and peak RSS of the one Matryoshka run against the sum of the separate runs), the
machine, and ``accuracy_<name>.png``: NDCG@10 against size with the published numbers.

Significance (``--seeds 0 1 2`` trains every run once per seed; the rows are means over the seeds,
with the standard deviation of NDCG@10 and Recall@10): for each size trained alone, a paired
bootstrap over the test users (``recsys.significance``) of the one run's NDCG@10 minus the twin's,
each user's NDCG@10 averaged over the seeds first, from the runs' per-user test ranks. The report's
``significance`` holds the mean difference and its 95% interval per size.

Arms of one question (an option changed, ``--set``): ``--baseline-from DIR`` adds, per size, the
paired bootstrap of this one run minus the one run of an earlier work directory (same sizes and
seeds), the baseline arm.

Runs that outlive a machine: ``--workdir DIR`` keeps every run's checkpoints, so a killed job
started again reuses the runs it finished and goes on with the one it left half-way;
``--keep-runs DIR`` also copies each finished run's result and per-user test ranks into ``DIR``
(small files, committed beside the report), so that a job on a fresh machine reuses those runs and
an arm of several seeds can be trained over several sessions. Two jobs can split an arm in one
work directory (``--skip-separate`` in one, ``--skip-one-run`` in the other); the command without
either then reuses their runs and reports. ``--baseline-from`` reads either kind of directory.

Every run is ``python -m recsys.train`` in a process of its own (``bench/train_run.py`` calls its ``run``, so that the rows come back), with
``--tracking mlflow`` into a store in the work directory, or ``--tracking csv`` (a run directory per
run) where MLflow is not installed (``--tracking auto``, the default, picks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from recsys import reporting
from recsys.atomic import atomic_file, write_json_atomically, write_text_atomically
from recsys.metrics import ndcg_of_ranks
from recsys.significance import BootstrapInterval, paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Published full-size NDCG@10 (bench/README.md §1), drawn on the plot for the dataset of that name.
PUBLISHED = json.loads((ROOT / "bench" / "published.json").read_text())["ndcg_10"]

#: one training run in a process of its own (its rows, ranks, wall time and peak RSS)
TRAIN_RUN = Path(__file__).resolve().parent / "train_run.py"


class Runs:
    """Training runs in child processes, at most ``parallel`` at a time, each with its own log file."""

    def __init__(self, config: Path, workdir: Path, tracking: str, parallel: int, keep: Path | None = None):
        self.config, self.workdir, self.tracking, self.parallel = config, workdir, tracking, parallel
        self.keep = keep
        self.pending: list[tuple[str, list[str]]] = []

    def ranks_file(self, name: str) -> Path:
        """Where run ``name`` leaves every test user's rank per size (users, ranks (M, users))."""
        return self.workdir / f"{name}.ranks.npz"

    def kept_files(self, name: str) -> tuple[Path, Path]:
        """Run ``name``'s result and ranks in the keep directory (``--keep-runs``)."""
        return self.keep / f"{name}.json", self.keep / self.ranks_file(name).name

    def ranks(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.ranks_file(name)
        with np.load(path if path.exists() or self.keep is None else self.kept_files(name)[1]) as f:
            return f["users"], f["ranks"]

    def keep_result(self, name: str, result: dict) -> None:
        """Copies finished run ``name`` into the keep directory: its result (``<name>.json``) and its
        ranks (``<name>.ranks.npz``, compressed, in the smallest integer type that holds them): tens to
        hundreds of kilobytes, small enough to commit, so that a job on another machine reuses the run."""
        if self.keep is None:
            return
        result_file, ranks_file = self.kept_files(name)
        if result_file.exists():
            return
        users, ranks = self.ranks(name)
        self.keep.mkdir(parents=True, exist_ok=True)
        with atomic_file(ranks_file) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, users=users.astype(np.min_scalar_type(users.max())),
                                ranks=ranks.astype(np.min_scalar_type(ranks.max())))
        result = {**result, "best": _in_workdir(result.get("best"), self.workdir)}  # no machine path
        write_json_atomically(result_file, result, indent=1)

    def add(self, name: str, overrides: list[str]) -> None:
        self.pending.append((name, overrides))

    def checkpoint_dir(self, name: str) -> Path:
        """Run ``name``'s checkpoints: one directory per run name, so a killed job's run goes on
        from its ``last.ckpt`` (``--ckpt_path``) when the job is started again."""
        return self.workdir / "checkpoints" / name

    def segments_file(self, name: str) -> Path:
        """The starts of run ``name`` (one per job that trained it) and the training each kept."""
        return self.workdir / f"{name}.segments.json"

    def start(self, name: str, overrides: list[str]) -> subprocess.Popen:
        last = self.checkpoint_dir(name) / "last.ckpt"
        resume = last.exists()
        args = [
            "--config", str(self.config), *overrides,
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--checkpoint.dirpath", str(self.checkpoint_dir(name)),
            *(["--ckpt_path", str(last)] if resume else []),
        ]
        if self.tracking == "csv":
            args += ["--tracking", "csv", "--run_dir", str(self.workdir / "runs" / name)]
        else:
            args += [
                "--tracking", "mlflow",
                "--mlflow.tracking_uri", f"sqlite:///{self.workdir}/mlflow.db",
                "--mlflow.artifact_location", str(self.workdir / "artifacts"),
                "--mlflow.experiment", "bench-accuracy",
                "--mlflow.log_models", "false",
            ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "BENCH_RANKS_FILE": str(self.ranks_file(name))}
        if self.parallel > 1:  # share the cores instead of every run using all of them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.parallel))
        self.note_start(name, last if resume else None)
        log = open(self.workdir / f"{name}.log", "a" if resume else "w")
        print(f"  {'resumed' if resume else 'started'} {name} (log {log.name})", flush=True)
        return subprocess.Popen([sys.executable, str(TRAIN_RUN), *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)

    def note_start(self, name: str, resumed_from: Path | None) -> None:
        """Records a start of run ``name``. A job killed before it finished kept its training up to
        its ``last.ckpt``: that stretch (from its start to the checkpoint's time) is what a resumed
        run adds to its own wall time."""
        path = self.segments_file(name)
        segments = json.loads(path.read_text()) if resumed_from is not None and path.exists() else []
        if segments and segments[-1]["kept_s"] is None:
            segments[-1]["kept_s"] = max(0.0, resumed_from.stat().st_mtime - segments[-1]["start"])
        segments.append({"start": time.time(), "kept_s": None})
        write_json_atomically(path, segments)

    def result_of(self, name: str, output: str) -> dict | None:
        """Run ``name``'s result from its log: the child's result line, its wall time counting the
        training that earlier, killed jobs kept (``resumed``: how many times it went on)."""
        line = next((x for x in output.splitlines() if x.startswith("BENCH-RESULT ")), None)
        if line is None:
            return None
        result = json.loads(line[len("BENCH-RESULT "):])
        path = self.segments_file(name)
        earlier = json.loads(path.read_text())[:-1] if path.exists() else []
        if earlier:
            result["wall_s"] += sum(s["kept_s"] for s in earlier)
            result["resumed"] = len(earlier)
        return result

    def finished_before(self, name: str) -> dict | None:
        """The result of run ``name`` if an earlier job in this work directory finished it (its log
        holds the result line and its ranks file exists) or the keep directory holds it, else None."""
        log = self.workdir / f"{name}.log"
        if log.exists() and self.ranks_file(name).exists():
            return self.result_of(name, log.read_text())
        if self.keep is None:
            return None
        result_file, ranks_file = self.kept_files(name)
        return json.loads(result_file.read_text()) if result_file.exists() and ranks_file.exists() else None

    def finish(self, on_done=None, keep_going: bool = False) -> dict[str, dict]:
        """Runs everything added; returns each run's result by name. A run an earlier job in the
        same work directory finished is not run again; one it left half-way goes on from its
        ``last.ckpt`` (a killed job resumes). A failed run stops
        everything, or with ``keep_going`` its result is ``{"failed": the end of its log}``.
        ``on_done(name, result)`` is called as each run ends (to save results as they come)."""
        results: dict[str, dict] = {}
        running: dict[str, subprocess.Popen] = {}
        pending = []
        for name, overrides in self.pending:
            earlier = self.finished_before(name)
            if earlier is None:
                pending.append((name, overrides))
            else:
                results[name] = earlier
                self.keep_result(name, earlier)
                print(f"  {name}: finished by an earlier job", flush=True)
        while pending or running:
            while pending and len(running) < self.parallel:
                name, overrides = pending.pop(0)
                running[name] = self.start(name, overrides)
            time.sleep(1)
            for name, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                output = (self.workdir / f"{name}.log").read_text()
                if proc.returncode != 0 and keep_going:
                    results[name] = {"failed": output[-2000:]}
                    print(f"  FAILED {name} (log {self.workdir / f'{name}.log'})", flush=True)
                    if on_done is not None:
                        on_done(name, results[name])
                    continue
                if proc.returncode != 0:
                    for other in running.values():
                        other.kill()
                    raise RuntimeError(f"training run {name} failed:\n{output[-4000:]}")
                results[name] = self.result_of(name, output)
                self.keep_result(name, results[name])
                if on_done is not None:
                    on_done(name, results[name])
                print(f"  finished {name}: {results[name]['wall_s']:.0f} s, {results[name]['epochs']} epochs", flush=True)
        return results


RUN_KEYS = ("wall_s", "peak_rss_mb", "best_val", "epochs")


def _in_workdir(path: str | None, workdir: Path) -> str | None:
    """A run's checkpoint as the report names it: relative to the work directory (no machine path;
    a kept run's is already)."""
    if path is None or not Path(path).is_absolute():
        return path
    return str(Path(path).relative_to(workdir)) if Path(path).is_relative_to(workdir) else Path(path).name


def over_seeds(seeded: list[dict]) -> dict:
    """One run's result averaged over its seeds: every metric of every row, the run keys; the
    standard deviation of NDCG@10 and Recall@10 over seeds beside their means (0 for one seed)."""
    rows = []
    for by_size in zip(*(r["rows"] for r in seeded)):
        row = dict(by_size[0])
        for key, value in list(row.items()):
            if key != "size" and isinstance(value, (int, float)) and not isinstance(value, bool):
                values = [r[key] for r in by_size]
                row[key] = float(np.mean(values)) if isinstance(value, float) else value
                if key in ("ndcg_10", "recall_10"):
                    row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    out = {"rows": rows, "seeds": len(seeded)}
    for key in RUN_KEYS:
        values = [r[key] for r in seeded if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    out["wall_s_total"] = sum(r["wall_s"] for r in seeded)
    return out


def one_run_vs_alone(runs: Runs, sizes: list[int], size: int, seeds: list[int], resamples: int) -> BootstrapInterval:
    """Paired bootstrap over test users of (one Matryoshka run - the size trained alone) NDCG@10,
    each user's NDCG@10 averaged over the seeds first."""
    def per_user(name: str, column: int) -> tuple[np.ndarray, np.ndarray]:
        users, ranks = runs.ranks(name)
        return users, ndcg_of_ranks(ranks[column], k=10)

    one, alone = [], []
    for n in seeds:
        users_m, m = per_user(f"matryoshka-seed{n}", sizes.index(size))
        users_a, a = per_user(f"separate-d{size}-seed{n}", 0)
        if not np.array_equal(users_m, users_a):
            raise RuntimeError(f"the one run and the size-{size} run (seed {n}) tested different users")
        one.append(m)
        alone.append(a)
    return paired_bootstrap(np.mean(one, axis=0), np.mean(alone, axis=0), resamples=resamples)


def one_run_vs_baseline(runs: Runs, baseline: Path, sizes: list[int], size: int, seeds: list[int],
                        resamples: int) -> BootstrapInterval:
    """Paired bootstrap over test users of (this one run - the one run of the ``baseline`` work
    directory) NDCG@10 at ``size``, each user's NDCG@10 averaged over the seeds first. The baseline's
    one run must have the same sizes (its ranks are read by position)."""
    mine, theirs = [], []
    for n in seeds:
        name = f"matryoshka-seed{n}"
        other = baseline / f"{name}.ranks.npz"
        if not other.exists():
            raise SystemExit(f"--baseline-from {baseline}: no finished run {name} there")
        users_m, m = runs.ranks(name)
        with np.load(other) as f:
            users_b, b = f["users"], f["ranks"]
        if not np.array_equal(users_m, users_b) or b.shape[0] != len(sizes):
            raise SystemExit(f"--baseline-from {baseline}: its {name} tested other users or other sizes")
        mine.append(ndcg_of_ranks(m[sizes.index(size)], k=10))
        theirs.append(ndcg_of_ranks(b[sizes.index(size)], k=10))
    return paired_bootstrap(np.mean(mine, axis=0), np.mean(theirs, axis=0), resamples=resamples)


def fmt(x: float) -> str:
    return f"{x:.4f}"


def markdown(report: dict) -> str:
    p = report["protocol"]
    lines = [
        f"# Accuracy on {report['name']}",
        "",
        f"Protocol: leave-one-out, full ranking over {p['items']} items, history items "
        f"{'masked' if p['mask_seen'] else 'not masked'}, max length {p['max_len']}, up to {p['epochs']} epochs "
        f"(early stopping on validation NDCG@10: of the size trained, for the Matryoshka run the mean over its sizes "
        f"unless the config or an override sets --model.monitor_size; with `each`, every size is tested with its own "
        f"best checkpoint), test metrics of the best checkpoint. {p['label']}",
        f"Machine: {report['machine']}, {report['threads']} threads. Overrides: `{' '.join(report['overrides']) or 'none'}`.",
        "",
        f"Seeds: {report.get('seeds', [0])} (every figure a mean over them); M - sep: the paired bootstrap over "
        "test users of the one run's NDCG@10 minus the size trained alone, with its 95% interval.",
        "",
        "| size | params (Matryoshka) | NDCG@10 M | Recall@10 M | NDCG@20 M | Recall@20 M "
        "| NDCG@10 sep | Recall@10 sep | NDCG@20 sep | Recall@20 sep | M - sep NDCG@10 [95%] |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    separate = {r["size"]: r for r in report["separate"]}
    significance = {r["size"]: r for r in report.get("significance", [])}
    for r in report["matryoshka"]["rows"]:
        s = separate.get(r["size"])
        sep = [fmt(s[k]) for k in ("ndcg_10", "recall_10", "ndcg_20", "recall_20")] if s else ["-"] * 4
        b = significance.get(r["size"])
        diff = f"{b['mean']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}]" if b else "-"
        lines.append(
            f"| {r['size']} | {r['parameters']:,} | {fmt(r['ndcg_10'])} | {fmt(r['recall_10'])} | {fmt(r['ndcg_20'])} "
            f"| {fmt(r['recall_20'])} | " + " | ".join(sep) + f" | {diff} |"
        )
    if report.get("sasrec"):
        r = report["sasrec"]["rows"][-1]
        lines += ["", f"SASRec at size {r['size']} ({r['parameters']:,} params): NDCG@10 {fmt(r['ndcg_10'])}, "
                  f"Recall@10 {fmt(r['recall_10'])}, NDCG@20 {fmt(r['ndcg_20'])}, Recall@20 {fmt(r['recall_20'])}."]
    lines += ["", "| run | epochs trained | best validation NDCG@10 | wall time (s) | peak RSS (MB) |", "|---|---:|---:|---:|---:|"]
    runs = [("Matryoshka, all sizes", report["matryoshka"])]
    runs += [(f"separate d{r['size']}", r) for r in report["separate"]]
    runs += [("SASRec", report["sasrec"])] if report.get("sasrec") else []
    for label, r in runs:
        val = "-" if r.get("best_val") is None else fmt(r["best_val"])
        epochs = "-" if r.get("epochs") is None else f"{r['epochs']:g}"
        lines.append(f"| {label} | {epochs} | {val} | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    c = report["cost"]
    lines += [
        "",
        "| training cost | wall time (s) | peak RSS (MB) |",
        "|---|---:|---:|",
        f"| one Matryoshka run, all sizes | {c['matryoshka_wall_s']:.0f} | {c['matryoshka_peak_rss_mb']:.0f} |",
        f"| separate runs, sum (max for memory) | {c['separate_wall_s']:.0f} | {c['separate_peak_rss_mb']:.0f} |",
    ]
    if report["parallel"] > 1:
        lines += ["", f"The runs shared the machine, {report['parallel']} at a time, so each wall time includes waiting for the others."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path, published: dict[str, float]) -> None:
    """Test NDCG@10 against size: the one Matryoshka run, the separate runs, SASRec, published lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    m = report["matryoshka"]["rows"]
    ax.plot([r["size"] for r in m], [r["ndcg_10"] for r in m], "o-", label="Matryoshka (one run)")
    if report["separate"]:
        sep = sorted(report["separate"], key=lambda r: r["size"])
        ax.plot([r["size"] for r in sep], [r["ndcg_10"] for r in sep], "s--", label="trained separately")
    if report.get("sasrec"):
        r = report["sasrec"]["rows"][-1]
        ax.plot([r["size"]], [r["ndcg_10"]], "^", color="black", label=f"SASRec d{r['size']} (ours)")
    for (label, value), style in zip(published.items(), (":", "-.", "--")):
        ax.axhline(value, linestyle=style, color="gray", linewidth=1)
        ax.annotate(f"{label} (published) {value:.4f}", (m[0]["size"], value), textcoords="offset points",
                    xytext=(0, 3), fontsize=7, color="gray")
    save_size_plot(fig, ax, [r["size"] for r in m], f"{report['name']}: accuracy against size", path)


def save_size_plot(fig, ax, sizes: list[int], title: str, path: Path) -> None:
    """The axes of a test NDCG@10 against size plot (``recsys.reporting.save_size_plot``), then the file."""
    reporting.save_size_plot(fig, ax, sizes, "test NDCG@10", title, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--name", default=None, help="results name (default: the config's name)")
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--max-len", type=int, default=None, help="override data.max_len")
    parser.add_argument("--sizes", default=None, help="override model.sizes, e.g. 16,32,64")
    parser.add_argument("--set", action="append", default=[], help="any other override, KEY=VALUE")
    parser.add_argument("--separate-sizes", default=None, help="sizes to train separately (default: every size)")
    parser.add_argument("--skip-separate", action="store_true")
    parser.add_argument("--skip-one-run", action="store_true",
                        help="train only the sizes alone (and SASRec), e.g. in a second job beside one with "
                             "--skip-separate in the same --workdir; the command without either then reports")
    parser.add_argument("--skip-sasrec", action="store_true")
    parser.add_argument("--tracking", choices=["auto", "mlflow", "csv"], default="auto",
                        help="recsys.train's --tracking for every run; auto: mlflow where it imports, else csv")
    parser.add_argument("--runner", choices=["cli"], default="cli",
                        help="accepted for older command lines: every run is python -m recsys.train")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (a GPU has room for several)")
    parser.add_argument("--label", default="", help="a note on the protocol, e.g. 'reduced: 10 epochs, length 50'")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="train every run once per seed (--seed_everything); rows are means over seeds")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the test users")
    parser.add_argument("--replot", action="store_true", help="only redraw accuracy_<name>.png from its JSON")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where accuracy_<name>.{json,md,png} go")
    parser.add_argument("--baseline-from", type=Path, default=None,
                        help="an earlier work (or --keep-runs) directory whose one run (same sizes and seeds) this one "
                             "run is compared with, per size: the paired bootstrap of the difference in NDCG@10")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="the runs' directory (default: a new one); runs an earlier job there finished "
                             "are not trained again, and one it left half-way goes on from its last checkpoint")
    parser.add_argument("--keep-runs", type=Path, default=None,
                        help="also keep each finished run's result and per-user test ranks here (small files to "
                             "commit); a run found here is not trained again, on this machine or another")
    args = parser.parse_args()

    config = yaml.safe_load(args.config.read_text())
    published = PUBLISHED.get(Path(config["data"]["data_dir"]).name, {})
    if args.replot:
        name = args.name or args.config.stem
        plot(json.loads((args.out_dir / f"accuracy_{name}.json").read_text()), args.out_dir / f"accuracy_{name}.png", published)
        return
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
    args.out_dir.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"accuracy-{name}-"))
    workdir.mkdir(parents=True, exist_ok=True)

    def sized(s: list[int], *extra: str) -> list[str]:
        return [*overrides, "--model.sizes", json.dumps(s), *extra]

    tracking = args.tracking
    if tracking == "auto":
        tracking = "mlflow" if importlib.util.find_spec("mlflow") is not None else "csv"
    runs = Runs(args.config, workdir, tracking, args.parallel, keep=args.keep_runs)
    separate_sizes = [] if args.skip_separate else (
        [int(x) for x in args.separate_sizes.split(",")] if args.separate_sizes else sizes)
    for seed in args.seeds:
        seeded = ["--seed_everything", str(seed)]
        # the one run stops when no size improves any more, not when the largest does (or as the
        # config or --set says)
        chosen = "--model.monitor_size" in overrides or config["model"].get("monitor_size") is not None
        monitor = [] if chosen else ["--model.monitor_size", "mean"]
        if not args.skip_one_run:
            runs.add(f"matryoshka-seed{seed}", sized(sizes, *monitor, *seeded))
        for s in separate_sizes:
            runs.add(f"separate-d{s}-seed{seed}", sized([s], *seeded))
        if not args.skip_sasrec:
            runs.add(f"sasrec-seed{seed}", sized(sizes[-1:], "--model.encoder", "sasrec", *seeded))
    print(f"[{name}] {len(runs.pending)} runs, {args.parallel} at a time, sizes {sizes}, seeds {args.seeds}, "
          f"tracking {tracking} in {workdir}", flush=True)
    results = runs.finish()
    if args.skip_one_run:
        print(f"[{name}] trained alone: {', '.join(results)}; the command without --skip-one-run reports", flush=True)
        return
    report: dict = {"name": name, "overrides": overrides, "runner": "cli", "tracking": tracking, "parallel": args.parallel,
                    "seeds": args.seeds, "matryoshka": over_seeds([results[f"matryoshka-seed{n}"] for n in args.seeds])}
    if args.keep_runs is not None:  # where the kept runs are, in the repository where they are committed
        kept = args.keep_runs.resolve()
        report["keep_runs"] = str(kept.relative_to(ROOT)) if kept.is_relative_to(ROOT) else kept.name
    report["separate"] = []
    for s in separate_sizes:
        one = over_seeds([results[f"separate-d{s}-seed{n}"] for n in args.seeds])
        report["separate"].append({**one["rows"][0], **{k: one[k] for k in RUN_KEYS}})
    if not args.skip_sasrec:
        report["sasrec"] = over_seeds([results[f"sasrec-seed{n}"] for n in args.seeds])
    report["significance"] = [
        {"size": s, "metric": "ndcg_10", **one_run_vs_alone(runs, sizes, s, args.seeds, args.resamples).to_dict()}
        for s in separate_sizes
    ]
    if args.baseline_from is not None:
        report["baseline_from"] = args.baseline_from.name
        report["against_baseline"] = [
            {"size": s, "metric": "ndcg_10",
             **one_run_vs_baseline(runs, args.baseline_from, sizes, s, args.seeds, args.resamples).to_dict()}
            for s in sizes
        ]
    report["per_seed"] = {key: {k: _in_workdir(v, workdir) if k == "best" else v for k, v in one.items() if k != "test_ranks"}
                          for key, one in results.items()}

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
    if torch.cuda.is_available():
        report["machine"] += f", {torch.cuda.get_device_name()}"
    report["threads"] = torch.get_num_threads()
    report["cost"] = {
        "matryoshka_wall_s": report["matryoshka"]["wall_s"],
        "matryoshka_peak_rss_mb": report["matryoshka"]["peak_rss_mb"],
        "separate_wall_s": sum(r["wall_s"] for r in report["separate"]),
        "separate_peak_rss_mb": max((r["peak_rss_mb"] for r in report["separate"]), default=0.0),
    }
    report["date"] = time.strftime("%Y-%m-%d")
    report["commit"] = reporting.git_commit(ROOT)  # the checkout (and its configs) that wrote the report
    text = markdown(report)
    write_json_atomically(args.out_dir / f"accuracy_{name}.json", report, indent=2)
    write_text_atomically(args.out_dir / f"accuracy_{name}.md", text)
    plot(report, args.out_dir / f"accuracy_{name}.png", published)
    print(text)


if __name__ == "__main__":
    main()
