"""Recipe search on validation, reported on test (bench/README.md §1): the one run and its twins alike.

    .venv/bin/python bench/search.py --config configs/lastfm.yaml --space bench/search_spaces/lastfm.yaml \
        --trials 8 --twins 16,128 --parallel 2

A trial is one setting of the options in ``--space`` (a YAML mapping ``option: [values]``, options
spelled as ``python -m recsys.train`` flags without the dashes, e.g. ``model.dropout``), drawn at
random from their product with ``--seed``. Every trial is trained as the one Matryoshka run (all
sizes of the config, early stopping on the mean validation NDCG@10 over sizes) and as each twin
(``--twins``: one size trained alone), so the twins get exactly the search budget of the one run.
Each run is ``python -m recsys.train`` through ``bench/accuracy.py``'s runner.

The winner of each kind is its trial with the best validation score (for the one run the mean over
sizes, for a twin its size's); its test metrics are the reported ones, and the paired bootstrap over
test users compares the one run's winner with each twin's winner per size.

Seeds (``--confirm-seeds 1 2``): the search trains with seed 0; each winner is then trained again
with every confirmation seed, and the comparison uses each kind's mean over its seeds (test NDCG@10
with its standard deviation; the bootstrap over each user's NDCG@10 averaged over the seeds first).

Variants of the one run alone (``--one-run-set model.distill=0.5``): options that mean nothing to a
single size (self-distillation) are added to the one run's trials only; they are part of those
trials' settings and ids, and the twins' runs are shared with the plain one run's. Each such call
adds trials to the one run only, so its budget grows: the report counts each kind's trials.

Results go to ``bench/results/search_<name>.json``, rewritten whole after every finished run: the
space, the trials with their validation and test figures (or the failure), and the winners; at the
end ``search_<name>.png`` plots the winners' test NDCG@10 against size. A rerun
with the same arguments skips the runs already recorded (resumable); the per-user test ranks stay in
``--workdir`` (default ``data/search-<name>``), which a resumed run reuses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from accuracy import Runs, save_size_plot  # (bench/ is the script's directory)
from recsys.atomic import write_json_atomically
from recsys.metrics import ndcg_of_ranks
from recsys.significance import paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def read_space(path: Path) -> dict[str, list]:
    """The search space: option -> non-empty list of values, checked."""
    space = yaml.safe_load(path.read_text())
    if not isinstance(space, dict) or not space:
        raise SystemExit(f"error: {path}: expected a mapping of options to lists of values")
    for option, values in space.items():
        if not isinstance(values, list) or not values:
            raise SystemExit(f"error: {path}: option {option!r} needs a non-empty list of values, got {values!r}")
    return space


def draw_trials(space: dict[str, list], trials: int, seed: int) -> list[dict]:
    """``trials`` distinct settings drawn uniformly from the product of the space (all if fewer).

    Drawn one after another from one seeded stream, so a longer search with the same seed starts
    with the settings of a shorter one (a resumed search with more ``--trials`` reuses their runs).
    """
    options = list(space)
    radices = [len(space[o]) for o in options]
    total = int(np.prod(radices))
    rng = np.random.default_rng(seed)
    picks: list[int] = []
    while len(picks) < min(trials, total):
        pick = int(rng.integers(total))
        if pick not in picks:
            picks.append(pick)
    settings = []
    for pick in picks:  # mixed-radix decoding of the pick into one value per option
        values, rest = [], pick
        for o, radix in zip(reversed(options), reversed(radices)):
            rest, i = divmod(rest, radix)
            values.insert(0, space[o][i])
        settings.append(dict(zip(options, values)))
    return settings


def trial_id(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def flags(params: dict) -> list[str]:
    """``--option value`` pairs, values as the CLI reads them (YAML/JSON spelling)."""
    out = []
    for option, value in params.items():
        out += [f"--{option}", value if isinstance(value, str) else json.dumps(value)]
    return out


def winners(report: dict, sizes: list[int], twins: list[int]) -> dict[str, dict]:
    """The trial of each kind with the best validation score."""
    best: dict[str, dict] = {}
    for kind in ["matryoshka", *[f"alone-d{s}" for s in twins]]:
        done = [t for t in report["trials"] if t["kind"] == kind and "failed" not in t and t.get("best_val") is not None]
        if done:
            best[kind] = max(done, key=lambda t: t["best_val"])
    return best


def seeded_runs(winner: dict, report: dict) -> list[dict]:
    """The winner's seed-0 trial and its finished confirmation runs."""
    again = [c for c in report.get("confirmations", []) if c["run"].startswith(winner["run"] + "-seed") and "failed" not in c]
    return [winner, *again]


def compare(runs: Runs, best: dict[str, dict], report: dict, sizes: list[int], twins: list[int], resamples: int) -> list[dict]:
    """Per twin size: both winners' test NDCG@10 (mean and standard deviation over their seeds) and
    the paired bootstrap of their difference (each user's NDCG@10 averaged over the seeds first)."""
    rows = []
    for s in twins:
        one, alone = best.get("matryoshka"), best.get(f"alone-d{s}")
        if one is None or alone is None:
            continue
        kinds = {"one_run": (seeded_runs(one, report), sizes.index(s)), "alone": (seeded_runs(alone, report), 0)}
        row: dict = {"size": s, "one_run_trial": one["id"], "alone_trial": alone["id"]}
        per_user: dict[str, np.ndarray] = {}
        users: list[np.ndarray] = []
        for kind, (seeded, column) in kinds.items():
            ndcg = [next(r["ndcg_10"] for r in t["rows"] if r["size"] == s) for t in seeded]
            row[f"{kind}_ndcg_10"] = float(np.mean(ndcg))
            row[f"{kind}_ndcg_10_std"] = float(np.std(ndcg, ddof=1)) if len(ndcg) > 1 else 0.0
            row[f"{kind}_seeds"] = len(ndcg)
            if all(runs.ranks_file(t["run"]).exists() for t in seeded):
                loaded = [runs.ranks(t["run"]) for t in seeded]
                users += [u for u, _ in loaded]
                per_user[kind] = np.mean([ndcg_of_ranks(r[column]) for _, r in loaded], axis=0)
        if len(per_user) == 2 and all(np.array_equal(users[0], u) for u in users):
            row["bootstrap"] = paired_bootstrap(per_user["one_run"], per_user["alone"], resamples=resamples).to_dict()
        rows.append(row)
    return rows


def plot(report: dict, sizes: list[int], path: Path) -> None:
    """Test NDCG@10 against size: the one run's winner at every size, each twin's winner at its size,
    means over their seeds with one standard deviation as the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = winners(report, sizes, [int(k.removeprefix("alone-d")) for k in report["winners"] if k != "matryoshka"])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if "matryoshka" in best:
        seeded = seeded_runs(best["matryoshka"], report)
        by_size = np.array([[next(r["ndcg_10"] for r in t["rows"] if r["size"] == s) for s in sizes] for t in seeded])
        ax.errorbar(sizes, by_size.mean(0), yerr=by_size.std(0, ddof=1) if len(seeded) > 1 else None, fmt="o-",
                    capsize=3, label=f"one run (its winner, {len(seeded)} seeds)")
    twins = sorted((int(k.removeprefix("alone-d")), t) for k, t in best.items() if k != "matryoshka")
    if twins:
        means, stds = [], []
        for _, winner in twins:
            values = [t["rows"][0]["ndcg_10"] for t in seeded_runs(winner, report)]
            means.append(np.mean(values))
            stds.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
        ax.errorbar([s for s, _ in twins], means, yerr=stds, fmt="s", capsize=3, label="trained alone (each its winner)")
    save_size_plot(fig, ax, sizes, f"{path.stem.removeprefix('search_')}: search winners against size", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the dataset's training config")
    parser.add_argument("--space", type=Path, required=True, help="YAML: option -> list of values")
    parser.add_argument("--trials", type=int, default=8, help="settings drawn from the space")
    parser.add_argument("--twins", default=None, help="sizes also trained alone, e.g. 16,128 (default: every size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (the runs train with seed 0)")
    parser.add_argument("--set", action="append", default=[], help="an override for every run, KEY=VALUE")
    parser.add_argument("--name", default=None, help="results name (default: the config's name)")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs keep logs and ranks (default data/search-NAME)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the test users")
    parser.add_argument("--confirm-seeds", type=int, nargs="*", default=[],
                        help="train each winner again with these seeds; the comparison averages over seeds")
    parser.add_argument("--one-run-set", action="append", default=[],
                        help="an option of the one run's trials only, KEY=VALUE (e.g. model.distill=0.5)")
    args = parser.parse_args()
    if args.trials < 1 or args.parallel < 1:
        parser.error("--trials and --parallel must be at least 1")

    config = yaml.safe_load(args.config.read_text())
    space = read_space(args.space)
    fixed = dict(item.partition("=")[::2] for item in args.set)
    if "model.sizes" in space:
        parser.error("model.sizes cannot be searched: the one run and the twins fix it (--set model.sizes=[...])")
    if set(fixed) & set(space):
        parser.error(f"--set {sorted(set(fixed) & set(space))}: also in the search space")
    sizes = list(yaml.safe_load(fixed.pop("model.sizes")) if "model.sizes" in fixed else config["model"]["sizes"])
    twins = [int(x) for x in args.twins.split(",")] if args.twins else sizes
    if not set(twins) <= set(sizes):
        parser.error(f"--twins {twins} must be sizes of the config {sizes}")
    common = [arg for key, value in fixed.items() for arg in (f"--{key}", value)]
    one_run_only = {k: yaml.safe_load(v) for k, v in (item.partition("=")[::2] for item in args.one_run_set)}
    if set(one_run_only) & (set(space) | set(fixed)):
        parser.error(f"--one-run-set {sorted(set(one_run_only) & (set(space) | set(fixed)))}: also searched or set for every run")
    name = args.name or args.config.stem
    workdir = args.workdir or ROOT / "data" / f"search-{name}"
    workdir.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"search_{name}.json"

    report = json.loads(out.read_text()) if out.exists() else {"trials": []}
    same = {"config": str(args.config), "space": space, "seed": args.seed, "sizes": sizes, "overrides": common}
    if report["trials"] and any(report.get(k) != v for k, v in same.items()):
        raise SystemExit(f"error: {out} holds a search with other settings; use another --name")
    report.update(same)
    done = {(t["id"], t["kind"]) for t in report["trials"]}

    runs = Runs(args.config, workdir, "csv", args.parallel)
    pending: dict[str, dict] = {}
    for params in draw_trials(space, args.trials, args.seed):
        one_run_params = {**params, **one_run_only}
        kinds = [("matryoshka", one_run_params, ["--model.sizes", json.dumps(sizes), "--model.monitor_size", "mean"])]
        kinds += [(f"alone-d{s}", params, ["--model.sizes", json.dumps([s])]) for s in twins]
        for kind, kind_params, extra in kinds:
            tid = trial_id(kind_params)
            if (tid, kind) in done:
                continue
            run = f"{tid}-{kind}"
            runs.add(run, [*common, *flags(kind_params), *extra])
            pending[run] = {"id": tid, "kind": kind, "run": run, "params": kind_params}

    def save() -> None:
        best = winners(report, sizes, twins)
        report["winners"] = {k: {"id": t["id"], "params": t["params"], "best_val": t["best_val"]} for k, t in best.items()}
        report["trials_per_kind"] = {k: sum(t["kind"] == k for t in report["trials"]) for k in ["matryoshka", *[f"alone-d{s}" for s in twins]]}
        report["comparison"] = compare(runs, best, report, sizes, twins, args.resamples)
        report["command"] = "python bench/search.py " + " ".join(sys.argv[1:])
        report["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores"
        report["date"] = time.strftime("%Y-%m-%d")
        write_json_atomically(out, report, indent=2)

    def on_done(run: str, result: dict) -> None:
        entry = dict(pending.pop(run))
        if "failed" in result:
            entry["failed"] = result["failed"]
        else:
            entry.update({k: result[k] for k in ("best_val", "epochs", "wall_s", "rows")})
        report.setdefault("confirmations" if "seed" in entry else "trials", []).append(entry)
        save()

    print(f"[{name}] {len(pending)} runs to go ({len(done)} recorded), {args.parallel} at a time, in {workdir}", flush=True)
    runs.finish(on_done=on_done, keep_going=True)

    # Confirmation: each winner again per seed; a winner whose seed-0 ranks are gone (another
    # workdir) is trained again too, under its own name, so the bootstrap can pair users.
    runs.pending = []
    confirmed = {c["run"] for c in report.get("confirmations", []) if "failed" not in c}
    for kind, winner in winners(report, sizes, twins).items():
        base = next(t for t in report["trials"] if t["run"] == winner["run"])
        extra = ["--model.sizes", json.dumps(sizes), "--model.monitor_size", "mean"] if kind == "matryoshka" else \
            ["--model.sizes", json.dumps([int(kind.removeprefix("alone-d"))])]
        if args.confirm_seeds and not runs.ranks_file(base["run"]).exists():
            runs.add(base["run"], [*common, *flags(base["params"]), *extra])
            pending[base["run"]] = {"rerun": True}
        for n in args.confirm_seeds:
            run = f"{base['run']}-seed{n}"
            if run not in confirmed:
                runs.add(run, [*common, *flags(base["params"]), *extra, "--seed_everything", str(n)])
                pending[run] = {"id": base["id"], "kind": kind, "run": run, "params": base["params"], "seed": n}

    def on_confirmed(run: str, result: dict) -> None:
        if pending.get(run, {}).get("rerun"):  # only its ranks were needed; its figures are recorded
            pending.pop(run)
            save()
        else:
            on_done(run, result)

    if runs.pending:
        print(f"[{name}] {len(runs.pending)} confirmation runs, seeds {args.confirm_seeds}", flush=True)
        runs.finish(on_done=on_confirmed, keep_going=True)
    save()
    plot(report, sizes, out.with_suffix(".png"))
    print(json.dumps({"winners": report["winners"], "comparison": report["comparison"]}, indent=2))


if __name__ == "__main__":
    main()
