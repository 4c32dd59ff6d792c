"""Write the measured results of ``docs/results.md`` from ``bench/results/*.json``, between markers.

    python tools/results_tables.py            # rewrite every generated block of docs/results.md
    python tools/results_tables.py --check    # exit 1 when a block differs from what the JSONs give

Each block sits between ``<!-- results:NAME:start -->`` and ``<!-- results:NAME:end -->`` in the
"Measured results" section of ``docs/results.md``, and everything inside it (tables, key figures, the command
that reproduces them, the machine and its load) is computed here from the JSON the benchmark wrote.
Sentences outside the blocks interpret the figures but quote none; ``tests/test_readme.py`` checks
both that the blocks are current and that no number is written by hand around them.

Standard library only: this runs anywhere the repository is checked out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RESULTS_PAGE = ROOT / "docs" / "results.md"

SECTION = "## Measured results"

# Goals of the memory-flat loss (docs/method.md §4): ratios to the largest size trained alone.
# Step time: 1.25x at 2 threads on a quiet machine (1-minute load average at most the core count),
# 1.5x on a busy one; a 1-thread run, closest to the arithmetic cost, is held to the quiet goal.
LOSS_MEMORY_GOAL = 1.2
LOSS_TIME_GOAL_QUIET = 1.25
LOSS_TIME_GOAL_BUSY = 1.5
# The funnel figure quoted in the text: the fastest setting reaching this recall at the largest catalogue.
FUNNEL_RECALL_TARGET = 0.95
# issue 14's goal for the funnel on a trained tower's item matrix (bench/funnel.py)
FUNNEL_TRAINED_RECALL_GOAL = 0.99
FUNNEL_SPEEDUP_GOAL = 8


def start_marker(name: str) -> str:
    return f"<!-- results:{name}:start -->"


def end_marker(name: str) -> str:
    return f"<!-- results:{name}:end -->"


# -- reading -------------------------------------------------------------------------------------


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def published_ndcg() -> dict[str, dict[str, float]]:
    """The published NDCG@10 per dataset and model (``bench/published.json``, which bench/accuracy.py reads too)."""
    return json.loads((ROOT / "bench" / "published.json").read_text(encoding="utf-8"))["ndcg_10"]


# -- formatting ----------------------------------------------------------------------------------


def f4(x: float) -> str:
    return f"{x:.4f}"


def f3(x: float) -> str:
    return f"{x:.3f}"


def ratio(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}x"


def count(x: float) -> str:
    return f"{round(x):,}"


def seconds(x: float) -> str:
    return f"{x:,.0f} s" if x >= 10 else f"{x:.1f} s"


def ms(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def signed_percent(x: float) -> str:
    return f"{100 * x:+.1f}%".replace("-", "−")


def interval(bootstrap: dict) -> str:
    """A paired bootstrap's mean difference and 95% interval: ``+0.0012 [-0.0003, +0.0027]``."""
    return f"{bootstrap['mean']:+.4f} [{bootstrap['low']:+.4f}, {bootstrap['high']:+.4f}]"


def power_of_ten(n: int) -> str:
    exponent = round(math.log10(n))
    return f"10^{exponent}" if 10**exponent == n else f"{n:,}"


def load_avg(values) -> str:
    if values is None:
        return "not recorded"
    if isinstance(values, (int, float)):
        return f"{values:.1f}"
    return " / ".join(f"{v:.1f}" for v in values)


def span(values: list[float], fmt: Callable[[float], str]) -> str:
    low, high = min(values), max(values)
    return fmt(low) if fmt(low) == fmt(high) else f"{fmt(low)}–{fmt(high)}"


def table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A markdown table; ``align`` has one letter per column, ``l`` or ``r``."""
    rule = ["---" if a == "l" else "---:" for a in align]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


NO_LOAD = object()  # a benchmark that records no load average


def measured_on(machine: str, threads=None, load=NO_LOAD, load_note: str = "") -> str:
    """``Measured on MACHINE, N threads; load average L (note).``"""
    parts = [machine]
    if threads is not None:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    line = "Measured on " + ", ".join(parts)
    if load is NO_LOAD or load is None:
        line += "; load average not recorded"
    else:
        line += f"; load average {load_avg(load)}" + (f" ({load_note})" if load_note else "")
    return line + "."


def platform_machine(m: dict) -> str:
    cpu = m.get("cpu") or m.get("processor") or "CPU"
    cores = m.get("cpu_count") or m.get("cores")
    gpu = m.get("gpu")
    text = f"{cpu}, {cores} cores" if cores else cpu
    return text + (f", {gpu}" if gpu else ", no GPU")


# -- accuracy --------------------------------------------------------------------------------------


def accuracy_config(name: str) -> str:
    """The config a results name came from: ``ml-1m-40ep`` -> ``configs/ml-1m.yaml``."""
    parts = name.split("-")
    for end in range(len(parts), 0, -1):
        stem = "-".join(parts[:end])
        if (ROOT / "configs" / f"{stem}.yaml").exists():
            return stem
    raise SystemExit(f"no config in configs/ for results {name!r}")


def config_sizes(config: str) -> list[int]:
    """``model.sizes`` of ``configs/<config>.yaml``, read without a YAML parser (one flow-style line)."""
    text = (ROOT / "configs" / f"{config}.yaml").read_text(encoding="utf-8")
    line = next(x for x in text.splitlines() if x.strip().startswith("sizes:"))
    return [int(v) for v in line.split("[", 1)[1].split("]", 1)[0].split(",")]


def accuracy_command(report: dict) -> str:
    """The ``bench/accuracy.py`` call that writes ``report`` (its ``--label`` note left out)."""
    config = accuracy_config(report["name"])
    args = [f"python bench/accuracy.py --config configs/{config}.yaml"]
    if report["name"] != config:
        args.append(f"--name {report['name']}")
    if report.get("parallel", 1) != 1:
        args.append(f"--parallel {report['parallel']}")
    sizes = [r["size"] for r in report["matryoshka"]["rows"]]
    if sizes != config_sizes(config):
        args.append("--sizes " + ",".join(str(s) for s in sizes))
    separate = [r["size"] for r in report.get("separate", [])]
    if not separate:
        args.append("--skip-separate")
    elif sorted(separate) != sizes:
        args.append("--separate-sizes " + ",".join(str(s) for s in sorted(separate)))
    if not report.get("sasrec"):
        args.append("--skip-sasrec")
    if report.get("seeds", [0]) != [0]:
        args.append("--seeds " + " ".join(str(n) for n in report["seeds"]))
    if report.get("baseline_from"):  # kept runs in the repository, or a work directory of this machine
        kept = f"bench/results/runs/{report['baseline_from']}"
        args.append(f"--baseline-from {kept if (ROOT / kept).is_dir() else 'BASELINE_WORKDIR'}")
    if report.get("keep_runs"):
        args.append(f"--keep-runs {report['keep_runs']}")
    overrides = list(report.get("overrides", []))
    for key, value in zip(overrides[::2], overrides[1::2]):
        if key == "--trainer.max_epochs":
            args.append(f"--epochs {value}")
        elif key == "--data.max_len":
            args.append(f"--max-len {value}")
        else:
            args.append(f"--set {key[2:]}={value}")
    return " ".join(args)


def protocol_line(report: dict) -> str:
    p = report["protocol"]
    masked = "history masked" if p["mask_seen"] else "history not masked"
    return (
        f"Protocol: leave-one-out over {p['users']:,} users, full ranking over {p['items']:,} items, {masked}, "
        f"max length {p['max_len']}, up to {p['epochs']} epochs" + (f"; {p['label'].rstrip('.')}." if p["label"] else ".")
    )


def source_line(report: dict) -> str:
    runner = ""
    if report.get("runner", "cli") == "plain":
        runner = (" These runs trained through the former `bench/plain_train.py` (TF32 matrix products on the GPU);"
                  " the same settings now train through `python -m recsys.train --tracking csv`"
                  " (`--float32_matmul_precision high`, the default, is the same TF32 setting).")
    commit = f" Written at commit `{report['commit'][:7]}` (its configs)." if report.get("commit") else ""
    return (
        f"`{accuracy_command(report)}` → `bench/results/accuracy_{report['name']}.json` "
        f"({report['date']}). {measured_on(report['machine'], report.get('threads'), None)}{runner}{commit}"
    )


def accuracy_table(report: dict) -> list[str]:
    alone = {r["size"]: r for r in report.get("separate", [])}
    significance = {r["size"]: r for r in report.get("significance", [])}
    header = ["size", "params", "NDCG@10 one Matryoshka run", "NDCG@10 size trained alone",
              "Recall@10 Matryoshka", "Recall@10 alone", "NDCG@10 Matryoshka vs alone"]
    if significance:  # reports from before the per-user ranks have no interval
        header.append("one run - alone, paired bootstrap 95%")
    seeded = len(report.get("seeds", [0])) > 1

    def metric(row: dict, key: str) -> str:
        """The mean, and with several seeds their standard deviation."""
        return f4(row[key]) + (f" ± {f4(row[key + '_std'])}" if seeded else "")

    rows = []
    for r in report["matryoshka"]["rows"]:
        s = alone.get(r["size"])
        row = [
            str(r["size"]), count(r["parameters"]),
            metric(r, "ndcg_10"), metric(s, "ndcg_10") if s else "",
            metric(r, "recall_10"), metric(s, "recall_10") if s else "",
            signed_percent(r["ndcg_10"] / s["ndcg_10"] - 1) if s else "",
        ]
        if significance:
            b = significance.get(r["size"])
            row.append(interval(b) if b else "")
        rows.append(row)
    return table(header, "r" * len(header), rows)


def sasrec_line(report: dict) -> str:
    r = report["sasrec"]["rows"][-1]
    return f"Our SASRec at size {r['size']}: NDCG@10 {f4(r['ndcg_10'])}, Recall@10 {f4(r['recall_10'])}."


def cost_line(report: dict, what: str) -> str:
    c = report["cost"]
    runs = len(report.get("separate", []))
    return (
        f"Training cost ({what}): the one Matryoshka run took {seconds(c['matryoshka_wall_s'])} against "
        f"{seconds(c['separate_wall_s'])} for the {runs} separate runs together, peak memory "
        f"{c['matryoshka_peak_rss_mb']:,.0f} MB against {c['separate_peak_rss_mb']:,.0f} MB "
        f"(the largest separate run){'; the runs shared the machine, ' + str(report['parallel']) + ' at a time' if report.get('parallel', 1) > 1 else ''}."
    )


def epochs_line(report: dict) -> str:
    runs = [f"{int(r['epochs'])} (size {r['size']})" for r in report["separate"]]
    sasrec = f", SASRec {int(report['sasrec']['epochs'])}" if report.get("sasrec") else ""
    return f"- Epochs trained: one run {int(report['matryoshka']['epochs'])}, alone {', '.join(runs)}{sasrec}."


def standard_error(report: dict, key: str = "recall_10") -> float:
    """Binomial standard error of a per-user hit rate at the full size (one target per user)."""
    p = report["matryoshka"]["rows"][-1][key]
    return math.sqrt(p * (1 - p) / report["protocol"]["users"])


def block_accuracy_ml1m() -> list[str]:
    main = load("accuracy_ml-1m-40ep.json")
    every = load("accuracy_ml-1m.json")
    long = load("accuracy_ml-1m-long.json")
    noid = load("accuracy_ml-1m-noid.json")
    published = published_ndcg()[accuracy_config(main["name"])]
    lines = [protocol_line(main), source_line(main), ""]
    lines += accuracy_table(main)
    lines += [""]
    lines.append(sasrec_line(main) + " Published (LRURec paper): " +
                 ", ".join(f"{k} {f4(v)}" for k, v in published.items()) + " NDCG@10.")
    m_all = {r["size"]: r["ndcg_10"] for r in every["matryoshka"]["rows"]}
    a_all = {r["size"]: r["ndcg_10"] for r in every["separate"]}
    sizes = sorted(a_all)
    lines.append(
        f"Every size trained alone, in an earlier run (`{accuracy_command(every)}`, "
        f"`bench/results/accuracy_{every['name']}.json`; {every['protocol']['label'].rstrip('.')}): "
        f"NDCG@10 of the one run {' / '.join(f4(m_all[s]) for s in sizes)} against alone "
        f"{' / '.join(f4(a_all[s]) for s in sizes)} at sizes {' / '.join(str(s) for s in sizes)}."
    )
    # the honest summary, as numbers
    full = main["matryoshka"]["rows"][-1]["size"]
    best_alone = max([*every["separate"], *main["separate"]], key=lambda r: r["ndcg_10"])
    best_pub = max(published.values())
    low_pub = min(published.values())
    sasrec_ours = [rep["sasrec"]["rows"][-1]["ndcg_10"] for rep in (main, every, long) if rep.get("sasrec")]
    gaps = [m_all[s] / a_all[s] - 1 for s in sizes]
    gaps += [r["ndcg_10"] / a["ndcg_10"] - 1 for r in main["matryoshka"]["rows"]
             for a in main["separate"] if a["size"] == r["size"]]
    worst = min(sizes, key=lambda s: m_all[s] / a_all[s])
    lines += [
        "",
        f"- Best model of any size (size {best_alone['size']} trained alone): NDCG@10 {f4(best_alone['ndcg_10'])}, "
        f"{f4(low_pub - best_alone['ndcg_10'])}–{f4(best_pub - best_alone['ndcg_10'])} below the published figures "
        f"(the goal of matching them: {'met' if best_alone['ndcg_10'] >= low_pub else 'not met'}).",
        f"- Our SASRec at size {full} in the {len(sasrec_ours)} runs: NDCG@10 {span(sasrec_ours, f4)}, "
        f"{f4(published['SASRec'] - max(sasrec_ours))}–{f4(published['SASRec'] - min(sasrec_ours))} below the published SASRec.",
        f"- The one Matryoshka run against the same size trained alone, over both runs: "
        f"{percent(-max(gaps))} to {percent(-min(gaps))} lower NDCG@10 (the largest gap at size {worst}).",
        f"- Without item-ID embeddings (text and genres only, `bench/results/accuracy_{noid['name']}.json`) "
        f"the one run reaches NDCG@10 {f4(noid['matryoshka']['rows'][-1]['ndcg_10'])} at size "
        f"{noid['matryoshka']['rows'][-1]['size']}.",
        f"- With up to {long['protocol']['epochs']} epochs allowed (`bench/results/accuracy_{long['name']}.json`; "
        f"{long['protocol']['label'].rstrip('.')}) the runs stopped after "
        f"{span([long['matryoshka']['epochs'], *[r['epochs'] for r in long['separate']], long['sasrec']['epochs']], str)} epochs.",
        f"- {cost_line(main, 'the run above')}",
        f"- {cost_line(every, 'the earlier run')}",
        f"- Noise: the standard error of Recall@10 at size {full} is about {f3(standard_error(main))} "
        f"({main['protocol']['users']:,} test users).",
    ]
    return lines


#: where the promise stands: per dataset, the arm that trains its recipe (the config, or the
#: candidate for it) to the end with its twins, and that recipe in words
PROMISE_ARMS = (
    ("Sports", "sports-cpu-distill-ema", "`configs/sports.yaml` (sizes up to 64)"),
    ("MovieLens-1M", "ml-1m-cpu-distill", "`configs/ml-1m.yaml` (sizes up to 128, length 50)"),
    ("Last.fm", "lastfm-cpu-slices-tied-each", "`configs/lastfm.yaml`"),
)


def block_promise() -> list[str]:
    """Every size of one run against the same size trained alone, per dataset, from the arm that
    trains its recipe: the goal (at least 0.99x, none significantly below) per dataset."""
    rows, verdicts = [], []
    for data, name, recipe in PROMISE_ARMS:
        report = load(f"accuracy_{name}.json")
        one = {r["size"]: r["ndcg_10"] for r in report["matryoshka"]["rows"]}
        significance = {b["size"]: b for b in report["significance"]}
        ratios = {}
        for k, twin in enumerate(report["separate"]):  # the dataset, its recipe, seeds and file named once
            size = twin["size"]
            ratios[size] = one[size] / twin["ndcg_10"]
            named = [data, recipe, str(len(report["seeds"]))] if k == 0 else ["", "", ""]
            rows.append(named + [str(size), f4(one[size]), f4(twin["ndcg_10"]), f"{ratios[size]:.4f}x",
                                 interval(significance[size]), f"`accuracy_{name}.json`" if k == 0 else ""])
        below = [s for s in ratios if significance[s]["high"] < 0]
        short = [s for s, x in ratios.items() if x < 0.99]
        why = ["under 0.99x at size " + ", ".join(map(str, short))] if short else []
        why.append("significantly below at size " + ", ".join(map(str, below)) if below else "none significantly below")
        verdicts.append(f"- {data}: " + (f"not met ({'; '.join(why)})" if short or below else "met") + ".")
    header = ["data", "recipe", "seeds", "size", "NDCG@10 one run", "NDCG@10 alone", "one run / alone",
              "one run - alone, paired bootstrap 95%", "results"]
    return (table(header, "llrrrrrrl", rows)
            + ["", "Means over the seeds; the bootstrap over each user's NDCG@10 averaged over the seeds. "
               "The goal, every size at least 0.99x its twin and none significantly below:"] + verdicts)


def block_accuracy_ml1m_converged(name: str = "ml-1m-cpu-converged") -> list[str]:
    """MovieLens-1M's config recipe (or an arm of it) on the reduced CPU protocol, trained until early
    stopping or the config's epochs end it: the one run and every size alone, each size's best
    validation epoch."""
    report = load(f"accuracy_{name}.json")
    lines = [protocol_line(report), source_line(report), ""]
    lines += accuracy_table(report)
    best = [f"size {s}: {own_best_validation(report, s)}" for s in (r["size"] for r in report["separate"])]
    lines += ["", epochs_line(report),
              "- Best validation NDCG@10 at its own best epoch, one run / alone (the epoch counted from one): "
              + "; ".join(best) + "."]
    if report.get("against_baseline"):
        lines.append(f"- This one run minus the one run of `{report['baseline_from']}` (the same seeds), NDCG@10, paired "
                     "bootstrap 95%: " + "; ".join(f"size {b['size']}: {interval(b)}" for b in report["against_baseline"]) + ".")
    return lines


def block_heldout(name: str) -> list[str]:
    """``bench/heldout.py``: the one run against its twins on each user's validation item, test
    item and both, and the drift of the difference from one to the other."""
    report = load(f"heldout_{name}.json")

    def marked(b: dict) -> str:  # bold where the interval excludes zero
        return f"**{interval(b)}**" if b["high"] < 0 or b["low"] > 0 else interval(b)

    lines = [f"- `{report['command']}` → `bench/results/heldout_{name}.json` ({report['date']}); "
             "WORKDIR: the work directory of `" + name + "`", ""]
    lines += table(
        ["size", "validation: one run / twin", "test: one run / twin", "one run - twin, validation",
         "one run - twin, test", "one run - twin, both items", "drift: (test - validation) of one run - of twin"],
        "rrrrrrr",
        [[str(r["size"]), f"{f4(r['val_one'])} / {f4(r['val_twin'])}", f"{f4(r['test_one'])} / {f4(r['test_twin'])}",
          marked(r["val"]), marked(r["test"]), marked(r["both"]), marked(r["drift"])] for r in report["sizes"]],
    )
    seeds = report["seeds"]
    lines += ["", f"Seed{'s' if len(seeds) > 1 else ''} {' '.join(map(str, seeds))}, NDCG@10 means over them; each interval a paired bootstrap "
              "over the users (95%) of their seed-averaged NDCG@10, in bold where it excludes zero."]
    return lines


def block_accuracy_lastfm() -> list[str]:
    report = load("accuracy_lastfm.json")
    lines = [protocol_line(report), source_line(report), ""]
    lines += accuracy_table(report)
    lines += ["", sasrec_line(report)]
    ml = load("accuracy_ml-1m-40ep.json")
    lines += [
        "",
        f"- Noise: the standard error of Recall@10 is about {f3(standard_error(report))} here "
        f"({report['protocol']['users']:,} test users), against {f3(standard_error(ml))} on MovieLens-1M.",
        epochs_line(report),
        f"- {cost_line(report, 'this run')}",
    ]
    return lines


# -- loss ------------------------------------------------------------------------------------------


def block_loss(file: str = "loss.json") -> list[str]:
    d = load(file)
    spec = d["spec"]
    m = d["machine"]
    memory = d["peak_memory"]
    timings = d["timings_by_threads"]
    threads = sorted(timings, key=int)
    variants = [v for v in memory if v != "largest_alone"]

    def label(v: str) -> str:
        name, _, rows = v.partition("@")
        if name == "sampled":
            return f"sampled softmax, {int(rows):,} shared negatives"
        text = {"naive_all": "naive, all sizes", "flat_all": "memory-flat, all sizes",
                "flat_largest": "memory-flat, largest size only",
                "flat_distill": "memory-flat, all sizes, with self-distillation from the largest"}.get(name)
        if text is None and name.startswith("flat_top"):
            text = f"memory-flat, largest {name[len('flat_top'):]} sizes"
        text = text or name
        return f"{text}, blocks of {int(rows):,} rows" if rows else text

    rows = []
    for v in variants:
        row = [label(v), ratio(memory[v]["memory_ratio"])]
        row += [ratio(timings[t]["variants"][v]["time_ratio"]) if v in timings[t]["variants"] else "" for t in threads]
        rows.append(row)
    header = ["loss", "peak memory"] + [f"step time, {t} thread{'s' if t != '1' else ''}" for t in threads]
    grads = d.get("flat_vs_naive", {})
    lines = [
        f"`{d['command']}` → `bench/results/{file}`: {spec['positions']:,} positions, {spec['items']:,} items, "
        f"D={spec['sizes'][-1]}, {len(spec['sizes'])} sizes; median of {d['repeats']} steps, each a ratio to the "
        f"largest size alone ({ms(timings[threads[0]]['variants']['largest_alone']['step_ms_median'])} ms with "
        f"{threads[0]} thread{'s' if threads[0] != '1' else ''}, {memory['largest_alone']['peak_mib']:.0f} MiB). "
        + measured_on(f"{m['cpu']}, {m['cores']} cores, no GPU", load=d.get("load_average_before"),
                      load_note="1 / 5 / 15 minutes"),
        "",
    ]
    lines += table(header, "l" + "r" * (len(header) - 1), rows)
    if grads:
        same_loss = "identical" if grads["loss_abs_diff"] == 0 else f"equal to {grads['loss_abs_diff']:.0e}"
        lines += ["", f"Gradients of the memory-flat loss equal the naive loss's to {grads['d_user_max_abs_diff']:.0e}; "
                      f"losses {same_loss}."]
    flat = [v for v in variants if v.startswith("flat_all@")]
    block_rows = {v: f"{int(v.split('@')[1]):,}" for v in flat}
    met_memory = [block_rows[v] for v in flat if memory[v]["memory_ratio"] <= LOSS_MEMORY_GOAL]
    missed_memory = [block_rows[v] for v in flat if memory[v]["memory_ratio"] > LOSS_MEMORY_GOAL]
    memory_text = f"Goal peak memory ≤ {LOSS_MEMORY_GOAL}x: "
    memory_text += f"met with blocks of {', '.join(met_memory)} rows" if met_memory else "not met"
    memory_text += f", not with {', '.join(missed_memory)}" if met_memory and missed_memory else ""
    time_parts = []
    for t in threads:
        best_v = min(flat, key=lambda v: timings[t]["variants"][v]["time_ratio"])
        best = timings[t]["variants"][best_v]["time_ratio"]
        before = timings[t].get("load_average_before")
        busy = t != "1" and (before is None or before[0] > m["cores"])
        goal = LOSS_TIME_GOAL_BUSY if busy else LOSS_TIME_GOAL_QUIET
        verdict = "met" if best <= goal else f"not met by {ratio(best - goal)}"
        missed = [f"{block_rows[v]} rows at {ratio(timings[t]['variants'][v]['time_ratio'])}" for v in flat
                  if timings[t]["variants"][v]["time_ratio"] > goal]
        verdict += f", not with {', '.join(missed)}" if missed and best <= goal else ""
        state = "held to the quiet goal" if t == "1" else ("busy machine, goal" if busy else "quiet machine, goal")
        best_min = min(timings[t]["variants"][v]["time_ratio_of_minima"] for v in flat)
        time_parts.append(f"{t} thread{'s' if t != '1' else ''} ({state} {ratio(goal)}): best median {ratio(best)} "
                          f"with blocks of {block_rows[best_v]} rows ({verdict}; best ratio of the fastest steps "
                          f"{ratio(best_min)})")
    lines.append(f"{memory_text}. Step time: " + "; ".join(time_parts) + ".")
    per_thread_load = [f"{t}: {load_avg(timings[t].get('load_average_before'))}" for t in threads]
    lines.append("Load average before the timings, by threads (1 / 5 / 15 minutes): " + "; ".join(per_thread_load) + ".")
    return lines


# -- retrieval -------------------------------------------------------------------------------------


def block_retrieval() -> list[str]:
    d = load("retrieval.json")
    s = d["settings"]
    m = d["machine"]
    largest = max(d["results"], key=lambda r: r["num_items"])
    n = power_of_ten(largest["num_items"])
    k = s["k"]
    lines = [
        f"`python bench/retrieval.py` → `bench/results/retrieval.json`: synthetic Matryoshka item matrices "
        f"of {', '.join(power_of_ten(c) for c in s['catalogues'])} items, D={max(s['sizes'])} (tower: "
        f"{largest['tower']}), {s['queries']} queries per batch, recall@{k} of the exact full-size top-{k}. "
        + measured_on(f"{m['cpu']}, {m['cpu_count']} cores, {m.get('faiss_gpus', 0)} GPUs", m.get("threads"),
                      [m["load_average_1m"], d.get("load_average_1m_at_end")] if "load_average_1m" in m else None,
                      "1 minute, at start / end"),
        "",
    ]
    fun = largest["funnel"]
    reaching = [f for f in fun if f["recall_full"] >= FUNNEL_RECALL_TARGET]
    if reaching:
        best = max(reaching, key=lambda f: f["speedup_vs_exact_torch_topk"])
        lines.append(
            f"**At {n} items, the fastest funnel reaching recall@{k} ≥ {FUNNEL_RECALL_TARGET}**: a {best['prefix']}-dim "
            f"{best['prefix_index']} shortlist of {best['shortlist']:,} re-ranked at {best['rerank_dims'][-1]} finds "
            f"{f3(best['recall_full'])} of the exact top-{k} at **{ratio(best['speedup_vs_exact_torch_topk'], 1)} the speed of "
            f"exact `torch.topk` search**, the faster exact baseline here ({ratio(best['speedup_vs_exact_faiss_flat'], 1)} "
            f"that of exact faiss flat search)."
        )
    else:
        lines.append(f"At {n} items no funnel setting reached recall@{k} ≥ {FUNNEL_RECALL_TARGET}.")
    lines.append(
        f"Exact full-size search of one batch at {n} items: `torch.topk` {ms(largest['exact_full_torch_topk_ms'])} ms, "
        f"faiss flat {ms(largest['exact_full_faiss_flat_ms'])} ms."
    )
    lines += [""]
    rows = [[str(f["prefix"]), f["prefix_index"], f"{f['shortlist']:,}", f3(f["recall_full"]), ms(f["latency_ms"]),
             ratio(f["speedup_vs_exact_torch_topk"]), ratio(f["speedup_vs_exact_faiss_flat"])] for f in fun]
    lines += table(["prefix", "prefix index", "shortlist", f"recall@{k}", "ms per batch", "speed-up vs torch.topk",
                    "speed-up vs faiss flat"], "rlrrrrr", rows)
    lines += ["", f"Index types at {n} items (recall@{k} of the exact full-size top-{k}, and of the exact top-{k} at "
                  "the same size):", ""]
    rows = [[str(i["size"]), i["kind"], f3(i["recall_full"]), f3(i["recall_same_size"]), ms(i["latency_ms"]),
             seconds(i["build_s"])] for i in largest["indexes"]]
    lines += table(["size", "index", "recall full", "recall same size", "ms per batch", "build"], "rlrrrr", rows)
    lines += ["", "Exact search, faiss flat time over `torch.topk` time, per catalogue and size:", ""]
    sizes = s["sizes"]
    rows = []
    for res in d["results"]:
        by_size = {r["size"]: r for r in res["torch_vs_faiss"]}
        rows.append([power_of_ten(res["num_items"])] + [ratio(1 / by_size[z]["torch_over_faiss"], 1) if z in by_size else ""
                                                       for z in sizes])
    lines += table(["items"] + [f"size {z}" for z in sizes], "r" * (len(sizes) + 1), rows)
    return lines


# -- the funnel on a trained tower ----------------------------------------------------------------


def funnel_command(d: dict) -> str:
    s = d["settings"]
    joined = lambda values: ",".join(str(v) for v in values)  # noqa: E731
    return (f"python bench/funnel.py --checkpoint {s.get('checkpoint', d['model']['checkpoint'])} --data-dir {s['data_dir']} "
            f"--items {s['items']} --queries {s['queries']} --prefixes {joined(s['prefixes'])} "
            f"--prefix-kinds {joined(s['prefix_kinds'])} --shortlists {joined(s['shortlists'])} --nlist {s['nlist']} "
            f"--nprobes {joined(s['nprobes'])} --threads {joined(s['threads'])} --repeats {s['repeats']}")


def funnel_nlist(row: dict) -> int:
    """The IVF lists of a funnel row's first stage (an own-network funnel's is its shortlist retriever's)."""
    settings = row["settings"]
    return settings.get("shortlist_retriever", settings)["index"]["nlist"]


def funnel_stage0(row: dict) -> str:
    if row["prefix_index"] == "ivf_flat":
        return f"IVF-flat, nprobe {row['nprobe']} of {funnel_nlist(row):,}"
    return {"exact": "exact (torch.topk)", "flat": "faiss flat"}[row["prefix_index"]]


def funnel_work_bound(row: dict, width: int) -> float:
    """How many times fewer multiply-adds than exact search the first stage does at best: the
    prefix's share of the width, times the share of the lists an IVF index probes."""
    share = row["prefix"] / width
    if row["prefix_index"] == "ivf_flat":
        share *= row["nprobe"] / funnel_nlist(row)
    return 1 / share


def threads_text(threads: int) -> str:
    return f"{threads} thread{'s' if threads != 1 else ''}"


def funnel_goal_line(res: dict, k: int) -> str:
    """Goal of issue 14 at one thread count: recall ≥ the goal at ≥ the speed-up goal."""
    rows = res["funnel"]
    fastest = {"torch_topk_ms": "`torch.topk`", "faiss_flat_ms": "faiss flat"}[res["fastest_exact"]]
    head = (f"**{threads_text(res['threads'])}** (exact search of the batch: `torch.topk` "
            f"{ms(res['exact_ms']['torch_topk_ms'])} ms, faiss flat {ms(res['exact_ms']['faiss_flat_ms'])} ms; "
            f"speed-ups against {fastest}, the faster; load average {load_avg(res['load_average_1m_before'])} / "
            f"{load_avg(res['load_average_1m_after'])}): ")
    reaching = [r for r in rows if r["recall"] >= FUNNEL_TRAINED_RECALL_GOAL]
    fast = [r for r in rows if r["speedup_vs_fastest_exact"] >= FUNNEL_SPEEDUP_GOAL]
    parts = []
    if reaching:
        best = max(reaching, key=lambda r: r["speedup_vs_fastest_exact"])
        parts.append(f"the fastest setting with recall@{k} ≥ {FUNNEL_TRAINED_RECALL_GOAL} is a shortlist of "
                     f"{best['shortlist']:,} from the {best['prefix']}-dim prefix ({funnel_stage0(best)}): recall "
                     f"{f4(best['recall'])} at **{ratio(best['speedup_vs_fastest_exact'], 1)}**")
    else:
        parts.append(f"no setting reached recall@{k} ≥ {FUNNEL_TRAINED_RECALL_GOAL}")
    if fast:
        best = max(fast, key=lambda r: r["recall"])
        parts.append(f"the best recall at ≥ {FUNNEL_SPEEDUP_GOAL}x is {f4(best['recall'])} ({best['prefix']}-dim "
                     f"{funnel_stage0(best)}, shortlist {best['shortlist']:,}, {ratio(best['speedup_vs_fastest_exact'], 1)})")
    else:
        parts.append(f"no setting reached {FUNNEL_SPEEDUP_GOAL}x")
    met = any(r["recall"] >= FUNNEL_TRAINED_RECALL_GOAL and r["speedup_vs_fastest_exact"] >= FUNNEL_SPEEDUP_GOAL for r in rows)
    return head + "; ".join(parts) + f". Goal {'met' if met else 'not met'}."


def block_funnel(name: str = "funnel.json") -> list[str]:
    """The funnels of ``bench/funnel.py`` on a trained tower: prefix funnels, or (``funnel_mode``
    own_network) each shortlist size's own network re-ranked at the full size."""
    d = load(name)
    own = d.get("funnel_mode") == "own_network"
    s, m, model, cat = d["settings"], d["machine"], d["model"], d["catalogue"]
    k = s["k"]
    features = cat["features"]
    dense = "; ".join(f"{name} ({f['dim']}-d): {f['method']}" for name, f in features["dense"].items())
    bags = "; ".join(f"{name}: {f['method']}" for name, f in features["bags"].items())
    trained = model["training"]
    lines = [
        f"`{funnel_command(d)}` → `bench/results/{name}`. The item matrix of a trained tower: "
        f"{model['encoder']} with sizes {', '.join(str(x) for x in model['sizes'])}, "
        f"{'with' if model['use_id_embedding'] else 'no'} ID embedding"
        + (f", {d['own_network']['reason']}" if own else "")
        + f", trained {trained['epochs']} epochs on `{s['data_dir']}`"
        + (f" (test NDCG@10 at the full size {f4(trained['test_ndcg_10_full'])})" if "test_ndcg_10_full" in trained else "")
        + f"; {cat['real_items']:,} real items and {cat['synthetic_items']:,} synthetic ones with features drawn like "
        f"the real ones ({dense}{'; ' + bags if bags else ''}; {features['id_embedding']}). Queries: one batch of "
        f"{d['queries']['users']:,} real users' vectors ({d['queries']['history']}). Recall@{k} of the exact full-size "
        f"top-{k}; re-ranking at {model['sizes'][-1]}. "
        + measured_on(f"{m['cpu']}, {m['cpu_count']} cores, {m.get('faiss_gpus', 0)} GPUs",
                      load=[d["load_average_1m_at_start"], d["load_average_1m_at_end"]], load_note="1 minute, at start / end"),
        "",
        f"Goal (issue 14): at {power_of_ten(s['items'])} items recall@{k} ≥ {FUNNEL_TRAINED_RECALL_GOAL} at ≥ "
        f"{FUNNEL_SPEEDUP_GOAL}x the speed of the fastest exact search.",
        "",
    ]
    for res in d["results"]:
        lines += [funnel_goal_line(res, k), ""]
    trunc = d["recall_of_exact_prefix_search"]
    width = model["sizes"][-1]
    first = d["results"][0]
    where = "each smaller size's own exact search finds" if own else "exact search at a prefix alone finds"
    lines += [f"What limits them: {where}, of the full-size top-{k}, "
              + ", ".join(f"{f3(r)} at {p} dims" for p, r in trunc.items())
              + f", so the {'smaller size' if own else 'prefix'} must shortlist many times k."]
    for goal in (FUNNEL_TRAINED_RECALL_GOAL, max(r["recall"] for r in first["funnel"] if r["prefix_index"] == "ivf_flat")):
        ivf = [r for r in first["funnel"] if r["prefix_index"] == "ivf_flat" and r["recall"] >= goal]
        if ivf:
            cheapest = max(ivf, key=lambda r: funnel_work_bound(r, width))
            lines[-1] += (f" The IVF funnel reaches recall {f4(cheapest['recall'])} only probing {cheapest['nprobe']} of "
                          f"{funnel_nlist(cheapest):,} lists at {cheapest['prefix']} of {width} dims: at best "
                          f"{ratio(funnel_work_bound(cheapest, width), 1)} fewer multiply-adds than exact search, before "
                          f"selecting the shortlist.")
            break
    flat = [r for r in first["funnel"] if r["prefix_index"] == "flat"]
    if flat:
        slowest = min(flat, key=lambda r: (r["prefix"], r["shortlist"]))  # the least arithmetic
        exact_ms = first["exact_ms"]["faiss_flat_ms"]
        share = slowest["latency_ms"] / exact_ms
        lines[-1] += (f" The flat prefix: at {threads_text(first['threads'])} faiss flat search of the {slowest['prefix']}-dim "
                      f"prefix for {slowest['shortlist']:,} rows took {ms(slowest['latency_ms'])} ms, {ratio(share, 1)} the "
                      f"time of the full-size exact search for {k} ({ms(exact_ms)} ms) with "
                      f"{ratio(width / slowest['prefix'], 0)} fewer multiply-adds"
                      + (": selecting the long shortlist, not the product, dominates." if share > 2 * slowest["prefix"] / width
                         else "."))
    if "stage0_ms" in first["funnel"][0]:
        shares = sorted(r["stage0_ms"] / r["latency_ms"] for r in first["funnel"])
        lines[-1] += (f" The first stage (the shortlist's search at the prefix, timed alone) takes a median "
                      f"{percent(shares[len(shares) // 2])} of a funnel's time at {threads_text(first['threads'])} "
                      f"(from {percent(shares[0])} to {percent(shares[-1])}; separate timings on a loaded machine), "
                      f"the re-ranking at {width} dims the rest.")
    lines += [""]
    by_threads = d["results"]
    split = "stage0_ms" in by_threads[0]["funnel"][0]
    if split:
        lines += ["Each time is the whole funnel's, with its first stage alone (the shortlist's search at the "
                  "prefix) in brackets; the rest is the re-ranking.", ""]
    header = ["prefix", "stage 0", "shortlist", f"recall@{k}"]
    for res in by_threads:
        header += [f"ms, {res['threads']} thr.", f"speed-up, {res['threads']} thr."]
    rows = []
    for i, r in enumerate(by_threads[0]["funnel"]):
        row = [str(r["prefix"]), funnel_stage0(r), f"{r['shortlist']:,}", f4(r["recall"])]
        for res in by_threads:
            other = res["funnel"][i]
            row += [ms(other["latency_ms"]) + (f" ({ms(other['stage0_ms'])})" if split else ""),
                    ratio(other["speedup_vs_fastest_exact"], 1)]
        rows.append(row)
    lines += table(header, "rlrr" + "rr" * len(by_threads), rows)
    return lines


def catalogue_text(catalogue: dict) -> str:
    """The catalogue of a funnel run, in words: its real items, and the synthetic ones if any."""
    real, synthetic = catalogue["real_items"], catalogue["synthetic_items"]
    return (f"{real:,} real items and {synthetic:,} synthetic ones, the same draws for both" if synthetic
            else f"the {real:,} real items alone")


def block_funnel_pair(without: str, with_: str, change: str) -> list[str]:
    """Two own-network funnel runs of ``bench/funnel.py`` whose checkpoints differ in one option
    (``change``), same catalogue, queries and settings: each smaller size's own share of the full
    size's top-k, and per funnel setting the recall of each. Only recall: the searches are the same
    for both, and these ran beside training runs, so their times are not reported."""
    a, b = load(without), load(with_)
    k, s = b["settings"]["k"], b["settings"]
    res_a, res_b = a["results"][0], b["results"][0]
    differ = [key for key in ("items", "queries", "k", "prefixes", "shortlists", "nlist", "nprobes", "seed")
              if a["settings"][key] != s[key]]
    if differ:
        raise SystemExit(f"{without} and {with_} differ in {differ}: not a pair")
    lines = [f"- without {change}: `{funnel_command(a)}` → `bench/results/{without}`",
             f"- with {change}: `{funnel_command(b)}` → `bench/results/{with_}`", "",
             f"The item matrices of two trained towers ({b['model']['encoder']}, sizes "
             f"{', '.join(str(x) for x in b['model']['sizes'])}, {b['own_network']['reason']}"
             + ("; each size from its own best checkpoint" if "size_checkpoints" in b["model"] else "") + f") over {catalogue_text(b['catalogue'])}; one batch of {b['queries']['users']:,} real users. Recall@{k} of "
             f"each tower's own exact full-size top-{k}; re-ranking at {b['model']['sizes'][-1]}. "
             + measured_on(f"{b['machine']['cpu']}, {b['machine']['cpu_count']} cores", None,
                           [a["load_average_1m_at_start"], b["load_average_1m_at_start"]], "1 minute, at the start of each")
             + " Recall only: the searches of both are the same, and they ran beside training, so their times are left out.",
             ""]
    lines += table(["size", f"its own exact top-{k}: share of the full size's, without", "with"], "rrr",
                   [[p, f3(a["recall_of_exact_prefix_search"][p]), f3(b["recall_of_exact_prefix_search"][p])]
                    for p in b["recall_of_exact_prefix_search"]])
    lines += [""]
    rows = [[str(rb["prefix"]), funnel_stage0(rb), f"{rb['shortlist']:,}", f4(ra["recall"]), f4(rb["recall"])]
            for ra, rb in zip(res_a["funnel"], res_b["funnel"])]
    lines += table(["shortlisting size", "stage 0", "shortlist", f"recall@{k} without", "with"], "rlrrr", rows)
    return lines


# -- the other benchmarks --------------------------------------------------------------------------


def block_candidates() -> list[str]:
    d = load("candidates.json")
    m = d["machine"]
    goal = 0.5
    rows = []
    for r in d["rows"]:
        faster = "torch" if r["faster_exact_retriever"] == "torch_exact" else "faiss"
        rows.append([
            power_of_ten(r["num_items"]), str(r["size"]), f"{r['users']:,}", f"{r['users_per_s']:,.0f}",
            f"{r['floor_users_per_s']:,.0f}", percent(r["fraction_of_floor"]), percent(r["search_fraction_of_floor"]),
            " / ".join(f"{r[key]:.1f}" for key in ("read_s", "encode_s", "search_s", "write_s", "other_s")),
            f"{r['search_only_torch_exact_users_per_s']:,.0f} / {r['search_only_faiss_flat_users_per_s']:,.0f} ({faster})",
        ])
    sub = d["users_subsample"]
    met = [r for r in d["rows"] if r["fraction_of_floor"] >= goal]
    best = max(d["rows"], key=lambda r: r["fraction_of_floor"])
    torch_wins = sum(r["faster_exact_retriever"] == "torch_exact" for r in d["rows"])
    command = ("python bench/candidates.py " + " ".join(d["argv"]) if "argv" in d else
               f"python bench/candidates.py --users {sub['below_10^6_items']} --users-large {sub['10^6_items_or_more']} "
               f"--search-queries {d['search_queries']} --repeats {d['repeats']}")
    lines = [
        f"`{command}` → "
        f"`bench/results/candidates.json`, on {d['device']}: top-{d['k']} per user, batches of {d['batch_size']:,}, "
        f"parts of {d['users_per_part']:,} users; {d['note']}. "
        + measured_on(platform_machine(m), m.get("torch_threads"), m.get("load_average"), "1 / 5 / 15 minutes, at the start")
        + f" Matrix-product rate {d['matmul_gflops']:.1f} GFLOP/s at the start, {d['matmul_gflops_at_end']:.1f} at the end.",
        "",
    ]
    lines += table(["items", "size", "users", "users/s", "floor users/s", "job of floor", "search of floor",
                    "read / encode / search / write / other s", "search only users/s: torch / faiss flat"],
                   "rrrrrrrrr", rows)
    lines += [
        "",
        f"Goal: the whole job at {percent(goal)} of the floor or more. Met in {len(met)} of {len(d['rows'])} rows; "
        f"the best is {percent(best['fraction_of_floor'])} ({power_of_ten(best['num_items'])} items, size {best['size']}). "
        "\"search of floor\" is the search stage alone against the same floor: the rest of the gap is encoding "
        "(extra flops the floor does not count, and at 10^5 items as many as the search's) and the job's fixed costs. "
        f"Torch exact search alone is faster than faiss flat in {torch_wins} of {len(d['rows'])} rows on this device.",
    ]
    if "baseline" in d:
        b = d["baseline"]
        old_rows = {(r["num_items"], r["size"]): r for r in b["rows"]}
        pairs = [(old_rows[(r["num_items"], r["size"])], r) for r in d["rows"] if (r["num_items"], r["size"]) in old_rows]
        lines += [
            "",
            f"Against commit `{b['commit']}` (its packages and its own benchmark, the same arguments, run first in a "
            f"process of its own; load average {load_avg(b['machine']['load_average'])} at its start, "
            f"matrix-product rate {b['matmul_gflops']:.1f} GFLOP/s):",
            "",
        ]
        lines += table(["items", "size", "users/s before / after", "speed-up", "job of floor before / after",
                        "encode s before / after", "search s before / after"], "rrrrrrr",
                       [[power_of_ten(n["num_items"]), str(n["size"]), f"{o['users_per_s']:,.0f} / {n['users_per_s']:,.0f}",
                         ratio(n["users_per_s"] / o["users_per_s"]),
                         f"{percent(o['fraction_of_floor'])} / {percent(n['fraction_of_floor'])}",
                         f"{o['encode_s']:.2f} / {n['encode_s']:.2f}", f"{o['search_s']:.2f} / {n['search_s']:.2f}"]
                        for o, n in pairs])
    return lines


def block_prepare() -> list[str]:
    d = load("prepare.json")
    m = d["machine"]
    r = d["results"]
    names = {"ml1m": "MovieLens-1M", "generate": "write a synthetic log", "prepare_synthetic": "prepare the synthetic log"}
    rows = []
    for key, v in r.items():
        copies = f"{v['own_peak_in_copies']:.1f}" if "own_peak_in_copies" in v else ""
        rows.append([names.get(key, key), f"{v['events']:,}", seconds(v["seconds_median"]), f"{v['runs']}",
                     f"{v['own_peak_mb']:,.0f}", copies])
    lines = [
        f"`python bench/prepare.py --events {d['events']}` → `bench/results/prepare.json`: {d['note']}. "
        + measured_on(f"{m['processor']}, {m['cpu_count']} cores", m.get("polars_threads"),
                      [m["load_average_1m_at_start"], m["load_average_1m"]] if "load_average_1m" in m else None,
                      "1 minute, at start / end"),
        "",
    ]
    lines += table(["job", "events", "wall time (median)", "runs", "own peak MB", "peak in copies of the raw log"],
                   "lrrrrr", rows)
    return lines


def block_encoders() -> list[str]:
    d = load("encoders.json")
    m = d["machine"]
    names = ("lru", "mamba", "sasrec")
    rows = []
    for r in d["rows"]:
        row = [str(r["batch"]), str(r["length"]), str(r["width"])]
        row += [f"{ms(r[e]['step_ms'])} / {r[e]['peak_mib']:,.0f}" for e in names]
        rows.append(row)
    scan = d["selective_scan"]
    lines = [
        f"`python bench/encoders.py` → `bench/results/encoders.json`: one training step, median of {d['repeats']}; "
        f"peak memory is {d['peak_memory']}. "
        + measured_on(f"{m['device']}, {m['cpu_count']} cores", m.get("threads"), m.get("load_average")),
        "",
    ]
    lines += table(["batch", "length", "width", "LRU ms / MiB", "Mamba ms / MiB", "SASRec ms / MiB"], "rrrrrr", rows)
    lines += [
        "",
        f"Selective scan (batch {scan['batch']}, length {scan['length']}, {scan['channels']} channels, state "
        f"{scan['d_state']}, {scan['groups']} groups): our chunked scan {ms(scan['chunked_ms'])} ms against "
        f"{ms(scan['step_by_step_ms'])} ms step by step, {ratio(scan['step_by_step_ms'] / scan['chunked_ms'], 1)} faster, "
        f"outputs equal to {scan['max_abs_diff']:.0e}.",
    ]
    if d.get("not_measured"):
        lines.append("Not measured: " + ", ".join(map(str, d["not_measured"])) + ".")
    return lines


def block_nested_linear() -> list[str]:
    d = load("nested_linear.json")
    m = d["machine"]
    rows = [[f"{c['rows']:,}", ", ".join(map(str, c["sizes"])), f"{c['out_mult']}", ms(c["masked_ms"]), ms(c["blocks_ms"]),
             ratio(c["blocks_over_masked"])] for c in d["cases"]]
    lines = [
        f"`python bench/nested_linear.py` → `bench/results/nested_linear.json`: forward and backward, median of "
        f"{d['repeats']}, on {d['device']}. "
        + measured_on(f"{m['cpu_count']} cores", d.get("threads"), m.get("load_average_1m"), "1 minute"),
        "",
    ]
    lines += table(["rows", "sizes", "expansion", "one masked product ms", "per-chunk products ms", "per-chunk / masked"],
                   "rlrrrr", rows)
    over = [c["blocks_over_masked"] for c in d["cases"]]
    lines += ["", f"One masked product is {span(over, lambda x: ratio(x, 1))} faster than per-chunk products "
                  f"({'in every case' if min(over) > 1 else 'not in every case'}), so it is the default."]
    return lines


# Goals of issue 14 for the training step (bench/README.md §6).
TRAIN_REAL_GOAL = 0.75
TRAIN_FLOOR_GOAL = 0.40
TRAIN_SPEEDUP_GOAL = 4.0
TRAIN_PHASES = ("tower", "encoder", "loss", "backward", "update")
TRAIN_NAMES = {"lru": "LRU", "mamba": "Mamba", "sasrec": "SASRec", "sports": "Sports", "ml-1m": "MovieLens-1M"}


def met(ok: bool) -> str:
    return "met" if ok else "not met"


def block_train_step() -> list[str]:
    d = load("train_step.json")
    m = d["machine"]
    rows, floors, speedups = [], [], {}
    rates = [d["matmul_gflops_start"], d["matmul_gflops_end"]]
    rates += [r["matmul_gflops"] for data in d["datasets"].values() for r in data["encoders"].values()]
    highest = max(rates)  # the conservative floor on a shared machine (bench/train_step.py)
    for name, data in d["datasets"].items():
        for encoder, r in data["encoders"].items():
            for batching, label in (("padded", "random (padded)"), ("length", "length-aware")):
                b = r[batching]
                fraction = sum(b["flops"]) / (highest * 1e9) / sum(b["step_s"])
                floors.append((fraction, name, encoder, batching))
                rows.append([TRAIN_NAMES.get(name, name), TRAIN_NAMES.get(encoder, encoder), label,
                             percent(data["epoch"][batching]["real_fraction"]), f"{b['mean_step_s']:.2f}",
                             f"{b['real_positions_per_s']:,.0f}", percent(fraction),
                             seconds(b["epoch_s_extrapolated"]),
                             " / ".join(f"{100 * b['phase_shares'][p]:.0f}" for p in TRAIN_PHASES)
                             if "phase_shares" in b else "not recorded"])
            speedups[(name, encoder)] = r["epoch_speedup"]
    first = next(iter(d["datasets"].values()))
    lines = [
        f"`{d['command']}` → `bench/results/train_step.json`: {d['step']}; configs' model and data settings "
        f"(batch {first['batch_size']}, sizes {', '.join(map(str, first['model']['sizes']))}); {d['sampling']}; "
        f"floor = the step's flops counted by `FlopCounterMode` at the highest matrix-product rate measured in the run "
        f"({highest:.1f} GFLOP/s; measured before each encoder's steps: {span(rates[2:], lambda x: f'{x:.0f}')} GFLOP/s). "
        + measured_on(platform_machine(m), m.get("threads"), [d["load_average_start"][0], d["load_average_end"][0]],
                      "1 minute, at start / end")
        + f" Matrix-product rate {d['matmul_gflops_start']:.1f} GFLOP/s at the start, {d['matmul_gflops_end']:.1f} at the end.",
        "",
    ]
    lines += table(["data", "encoder", "batching", "real positions (epoch)", "step s", "real positions/s", "of floor",
                    "epoch (extrapolated)", "% of step: tower / encoder / loss / backward / update"], "lllrrrrrr", rows)
    lines.append("")
    real = {name: data["epoch"]["length"]["real_fraction"] for name, data in d["datasets"].items()}
    lines.append(f"- Real positions at least {percent(TRAIN_REAL_GOAL)}: "
                 + ", ".join(f"{TRAIN_NAMES.get(n, n)} {percent(v)} (random batches "
                             f"{percent(d['datasets'][n]['epoch']['padded']['real_fraction'])})" for n, v in real.items())
                 + f" ({met(min(real.values()) >= TRAIN_REAL_GOAL)}).")
    for name in d["datasets"]:
        these = {e: v for (n, e), v in speedups.items() if n == name}
        fast = [TRAIN_NAMES.get(e, e) for e, v in these.items() if v >= TRAIN_SPEEDUP_GOAL]
        goal = (f" (goal {ratio(TRAIN_SPEEDUP_GOAL, 0)} on Sports: met by {len(fast)} of {len(these)}"
                + (f", {', '.join(fast)}" if fast else "") + ")") if name == "sports" else ""
        lines.append(f"- Epoch speed-up of length-aware over random batches, {TRAIN_NAMES.get(name, name)}: "
                     + ", ".join(f"{TRAIN_NAMES.get(e, e)} {ratio(v)}" for e, v in these.items()) + goal + ".")
    length_floors = sorted((f for f in floors if f[3] == "length"), reverse=True)
    reached = [f"{TRAIN_NAMES.get(e, e)} on {TRAIN_NAMES.get(n, n)}" for v, n, e, _ in length_floors if v >= TRAIN_FLOOR_GOAL]
    lines.append(f"- Fraction of the arithmetic floor, length-aware batches: {span([f[0] for f in length_floors], percent)}; "
                 f"goal {percent(TRAIN_FLOOR_GOAL)} on CPU: met by {len(reached)} of {len(length_floors)}"
                 + (f" ({', '.join(reached)})" if reached else "") + ".")
    if (RESULTS / "length_batching_metrics.json").is_file():
        lines += ["", *length_batching_metrics_lines(load("length_batching_metrics.json"))]
    return lines


def length_batching_metrics_lines(d: dict) -> list[str]:
    """The short real trainings with and without length-aware batching (bench/length_batching_metrics.py)."""
    names = {"length": "length-aware", "padded": "random"}
    rows = []
    for run in d["runs"]:
        top = run["rows"][-1]
        rows.append([str(run["seed"]), names[run["batching"]], str(top["size"]), f4(top["ndcg_10"]), f4(top["recall_10"]),
                     f4(top["mrr"])])
    recall = [run["rows"][-1]["recall_10"] for run in d["runs"]]
    mean = sum(recall) / len(recall)
    error = math.sqrt(mean * (1 - mean) / d["test_users"])
    gaps = []
    for seed in d["seeds"]:
        by = {r["batching"]: r["rows"][-1]["recall_10"] for r in d["runs"] if r["seed"] == seed}
        gaps.append(by["length"] - by["padded"])
    lines = [
        f"Metrics kept: `{d['command']}` → `bench/results/length_batching_metrics.json`, `{d['config']}` trained "
        f"{d['epochs']} epochs both ways per seed through `python -m recsys.train --tracking csv`, test metrics of the best "
        "checkpoint at the largest size (the runs' wall times are in the JSON; speed is the table above). "
        + measured_on(platform_machine(d["machine"]), None, [d["load_average_start"][0], d["load_average_end"][0]],
                      "1 minute, at start / end"),
        "",
    ]
    lines += table(["seed", "batching", "size", "NDCG@10", "Recall@10", "MRR"], "rlrrrr", rows)
    within = all(abs(g) <= 2 * error for g in gaps)
    lines += ["", f"Recall@10 length-aware minus random, per seed: {', '.join(f'{g:+.4f}' for g in gaps)}; the standard "
                  f"error of Recall@10 here is {error:.4f} ({d['test_users']:,} test users): "
                  f"{'within' if within else 'not within'} two standard errors."]
    return lines


def block_machines() -> list[str]:
    rows = []
    for name in ("accuracy_ml-1m-40ep.json", "accuracy_lastfm.json"):
        r = load(name)
        rows.append([f"`{name}`", r["machine"], str(r.get("threads", "")), "not recorded", r.get("date", "")])
    loss = load("loss.json")
    rows.append(["`loss.json`", f"{loss['machine']['cpu']}, {loss['machine']['cores']} cores", str(loss["spec"]["threads"]),
                 load_avg(loss.get("load_average_before")), ""])
    ret = load("retrieval.json")
    rows.append(["`retrieval.json`", platform_machine(ret["machine"]), str(ret["machine"]["threads"]),
                 load_avg(ret["machine"].get("load_average_1m")), ""])
    fun = load("funnel.json")
    rows.append(["`funnel.json`", platform_machine(fun["machine"]), ", ".join(str(r["threads"]) for r in fun["results"]),
                 load_avg(fun.get("load_average_1m_at_start")), ""])
    cand = load("candidates.json")
    rows.append(["`candidates.json`", platform_machine(cand["machine"]), str(cand["machine"]["torch_threads"]),
                 load_avg(cand["machine"].get("load_average")), ""])
    prep = load("prepare.json")
    rows.append(["`prepare.json`", f"{prep['machine']['processor']}, {prep['machine']['cpu_count']} cores",
                 str(prep["machine"]["polars_threads"]), load_avg(prep["machine"].get("load_average_1m_at_start")), ""])
    enc = load("encoders.json")
    rows.append(["`encoders.json`", f"{enc['machine']['device']}, {enc['machine']['cpu_count']} cores",
                 str(enc["machine"]["threads"]), load_avg(enc["machine"].get("load_average")), ""])
    nl = load("nested_linear.json")
    rows.append(["`nested_linear.json`", f"{nl['device']}, {nl['machine']['cpu_count']} cores", str(nl["threads"]),
                 load_avg(nl["machine"].get("load_average_1m")), ""])
    ts = load("train_step.json")
    rows.append(["`train_step.json`", platform_machine(ts["machine"]), str(ts["machine"]["threads"]),
                 load_avg(ts.get("load_average_start")), ""])
    srv = load("serve.json")
    rows.append(["`serve.json`", f"{srv['machine']['cpu']}, {srv['machine']['cpu_count']} cores",
                 str(srv["threads_per_request"]), load_avg(srv["load_average_start"][0]), srv["date"]])
    rows = [[cell or "not recorded" for cell in row] for row in rows]
    return table(["results", "machine", "threads", "load average at start", "date"], "llrll", rows)


def block_cold_start(file: str = "cold_start_lastfm.json") -> list[str]:
    d = load(file)
    c = d["data"]
    pop = d["popularity"]
    rows = [["popularity", "", f4(pop["cold"]["ndcg_10"]), f4(pop["cold"]["recall_10"]), f4(pop["warm"]["ndcg_10"]),
             f4(pop["all"]["ndcg_10"])]]
    for model, r in d["models"].items():
        for size, g in r["by_size"].items():
            rows.append([model, size, f4(g["cold"]["ndcg_10"]), f4(g["cold"]["recall_10"]), f4(g["warm"]["ndcg_10"]),
                         f4(g["all"]["ndcg_10"])])
    load_start, load_end = d["load_average"]["start"][0], d["load_average"]["end"][0]
    lines = [
        f"`{d['command']}`" + (f" (then `{d['added']['command']}` for {', '.join(d['added']['models'])})" if "added" in d else "")
        + f" → `bench/results/cold_start_{d['name']}.json` ({d['date']}): {c['items']:,} of "
        f"{c['catalogue_items']:,} items held out of training (`prepare --cold-start-fraction {c['fraction']}`, seed "
        f"{c['seed']}; {c['events_removed']:,} events removed, {c['users_dropped']:,} users dropped); "
        f"{c['test_users']:,} of {c['users']:,} test users have a held-out target (cold), the others are warm; "
        f"full ranking, history {'masked' if d['mask_seen'] else 'not masked'}; settings of `{d['config']}`. "
        + measured_on(d["machine"], None, [load_start, load_end], "1 minute, at start / end"),
        "",
    ]
    lines += table(["model", "size", "cold NDCG@10", "cold Recall@10", "warm NDCG@10", "all NDCG@10"], "lrrrrr", rows)
    return lines


def block_search_lastfm() -> list[str]:
    d = load("search_lastfm.json")
    done = [t for t in d["trials"] if "failed" not in t]
    per_kind = ", ".join(f"{n} {kind}" for kind, n in d["trials_per_kind"].items())
    one_run_only = sorted({k for t in d["trials"] for k in t["params"]} - set(d["space"]))
    rows = []
    for c in d["comparison"]:
        b = c.get("bootstrap")
        rows.append([str(c["size"]),
                     f"{f4(c['one_run_ndcg_10'])} ± {f4(c['one_run_ndcg_10_std'])}",
                     f"{f4(c['alone_ndcg_10'])} ± {f4(c['alone_ndcg_10_std'])}",
                     ratio(c["one_run_ndcg_10"] / c["alone_ndcg_10"], 3),
                     interval(b) if b else "",
                     f"`{c['one_run_trial']}` / `{c['alone_trial']}`"])
    seeds = min(min(c["one_run_seeds"], c["alone_seeds"]) for c in d["comparison"])
    lines = [
        f"`{d['command']}` → `bench/results/search_lastfm.json` ({d['date']}): settings drawn from "
        f"{len(d['space'])} options (`{d['config']}` otherwise; the space and every trial are in the JSON); trials: "
        f"{per_kind} ({len(done)} of {len(d['trials'])} runs finished)"
        + (f"; the one run's extra trials add {', '.join(f'`{k}`' for k in one_run_only)}" if one_run_only else "")
        + f". Winners picked on validation; each winner trained with {seeds} seeds, figures on test (mean ± standard "
        f"deviation over seeds; the bootstrap over each user's seed-averaged NDCG@10). Measured on {d['machine']}.",
        "",
    ]
    lines += table(["size", "NDCG@10 one run (its winner)", "NDCG@10 alone (its winner)", "one run / alone",
                    "paired bootstrap 95%", "winning trials"], "rrrrrl", rows)
    return lines


def block_accuracy_sports_config() -> list[str]:
    """The Sports config as a user runs it: the one run, sizes trained alone, SASRec, against the papers."""
    report = load("accuracy_sports.json")
    published = published_ndcg()["sports"]
    lines = [protocol_line(report), source_line(report), ""]
    lines += accuracy_table(report)
    best = max([*report["matryoshka"]["rows"], *report.get("separate", [])], key=lambda r: r["ndcg_10"])
    full = report["matryoshka"]["rows"][-1]
    lines += [
        "",
        (sasrec_line(report) + " " if report.get("sasrec") else "")
        + "Published: " + ", ".join(f"{k} {f4(v)}" for k, v in published.items()) + " NDCG@10.",
        "",
        f"- Full size of the one run: NDCG@10 {f4(full['ndcg_10'])}, {f4(max(published.values()) - full['ndcg_10'])} "
        f"below the best published figure (goal not met)." if full["ndcg_10"] < max(published.values()) else
        f"- Full size of the one run: NDCG@10 {f4(full['ndcg_10'])}, above every published figure (goal met).",
        f"- Best model of any size (size {best['size']}, {'the one run' if best in report['matryoshka']['rows'] else 'trained alone'}): "
        f"NDCG@10 {f4(best['ndcg_10'])}, {f4(max(published.values()) - best['ndcg_10'])} below the best published figure.",
        epochs_line(report),
        f"- {cost_line(report, 'this run')}",
    ]
    return lines


def twins_goal_line(report: dict) -> str:
    """Each twin's ratio and whether the one run is significantly below it, against the goal."""
    ndcg = {r["size"]: r["ndcg_10"] for r in report["matryoshka"]["rows"]}
    below = {b["size"]: b["high"] < 0 for b in report["significance"]}
    ratios = {r["size"]: ndcg[r["size"]] / r["ndcg_10"] for r in report["separate"]}
    met_goal = all(x >= 0.99 for x in ratios.values()) and not any(below.values())
    parts = [f"{f3(ratios[s])}x at size {s}" + (" (significantly below)" if below[s] else "") for s in sorted(ratios)]
    return (f"- The one run against each size trained alone: {', '.join(parts)}; the goal (at least 0.99x, "
            f"none significantly below): {met(met_goal)}.")


def block_accuracy_ml1m_cpu() -> list[str]:
    """MovieLens-1M on the CPU: the reduced protocol, several seeds, the one run against its twins."""
    report = load("accuracy_ml-1m-cpu.json")
    published = published_ndcg()[accuracy_config(report["name"])]
    full = report["matryoshka"]["rows"][-1]
    lines = [protocol_line(report), source_line(report), ""]
    lines += accuracy_table(report)
    lines += [
        "",
        sasrec_line(report) + f" Mean ± standard deviation over {len(report['seeds'])} seeds; the bootstrap over "
        "each user's NDCG@10 averaged over the seeds.",
        "",
        twins_goal_line(report),
        f"- The largest size here ({full['size']}): NDCG@10 {f4(full['ndcg_10'])}. The published figures ("
        + ", ".join(f"{k} {f4(v)}" for k, v in published.items())
        + ") are for length 200 and size 256 trained to convergence, so they are not compared with these.",
        epochs_line(report),
        f"- {cost_line(report, 'one seed, mean')}",
    ]
    return lines


#: the arms on MovieLens-1M's reduced protocol, the baseline first: each a bench/accuracy.py run of
#: the config with one option changed, and the arm whose one run it is compared with (--baseline-from)
TWIN_ARMS = {
    "ml-1m-cpu-base": None,
    "ml-1m-cpu-temperature": "ml-1m-cpu-base",
    "ml-1m-cpu-separate-items": "ml-1m-cpu-base",
    "ml-1m-cpu-untied": "ml-1m-cpu-base",
    "ml-1m-cpu-untied-temperature": "ml-1m-cpu-untied",
    "ml-1m-cpu-prefix-gradient-0.5": "ml-1m-cpu-untied",
    "ml-1m-cpu-prefix-gradient-0": "ml-1m-cpu-untied",
    "ml-1m-cpu-untied-largest-loss-only": "ml-1m-cpu-untied",
    "ml-1m-cpu-slices-prefix-gradient-0": "ml-1m-cpu-prefix-gradient-0",
}
#: the same on Sports' reduced protocol (sizes up to 64, full softmax, LRURec's decay ring)
SPORTS_TWIN_ARMS = {
    "sports-cpu-slices-prefix-gradient-0": None,
    "sports-cpu-slices-each": "sports-cpu-slices-prefix-gradient-0",
    "sports-cpu-slices-tied-each": "sports-cpu-slices-each",
    "sports-cpu-slices-each-ema": "sports-cpu-slices-each",
    "sports-cpu-slices-each-distill": "sports-cpu-slices-each",
    "sports-cpu-slices-each-d32-5seeds": None,
    "sports-cpu-distill-ema": None,
    "sports-cpu-nodistill-ema-seed0": "sports-cpu-distill-ema",
}
#: the same on Last.fm's config (its own protocol: up to 40 epochs, history not masked)
LASTFM_TWIN_ARMS = {
    "lastfm-cpu-config": None,
    "lastfm-cpu-slices-each": "lastfm-cpu-config",
    "lastfm-cpu-slices-tied-each": "lastfm-cpu-config",
    "lastfm-cpu-distill": None,
}
#: overrides every arm shares (the reduced protocol), left out of what an arm changes
PROTOCOL_OVERRIDES = ("--trainer.max_epochs", "--data.max_len", "--model.sizes")


def arm_change(report: dict) -> str:
    """What an arm sets beyond the reduced protocol, as flags (``none`` for the baseline)."""
    overrides = report.get("overrides", [])
    changed = [f"{k} {v}" for k, v in zip(overrides[::2], overrides[1::2]) if k not in PROTOCOL_OVERRIDES]
    return ", ".join(f"`{c}`" for c in changed) or "none (the config)"


def own_best_validation(report: dict, size: int) -> str:
    """``one run / twin``: each one's best validation NDCG@10 at its own best epoch (means over the
    seeds; runs from before ``best_val_by_size`` was recorded leave it empty)."""
    seeds = report["seeds"]
    runs = [report["per_seed"].get(f"matryoshka-seed{n}", {}) for n in seeds]
    twins = [report["per_seed"].get(f"separate-d{size}-seed{n}", {}) for n in seeds]
    if any(not (r.get("best_val_by_size") or {}).get(f"d{size}") for r in runs) or any(t.get("best_val") is None for t in twins):
        return ""
    one = [r["best_val_by_size"][f"d{size}"] for r in runs]
    epochs = "/".join(str(int(epoch) + 1) for _, epoch in one)
    return (f"{f4(sum(v for v, _ in one) / len(one))} (epoch {epochs}) / "
            f"{f4(sum(t['best_val'] for t in twins) / len(twins))}")


def block_twin_arms(arms: dict[str, str | None] = TWIN_ARMS) -> list[str]:
    """The one run of each arm (an option changed) at every size: against the one run of the arm it
    extends (paired bootstrap), and against the twins at the twin sizes. An arm with twins of its own
    (trained with its option) has their bootstrap; an arm screened without twins is set against the
    twins of the arm it extends, same seeds, with no interval. The first arm is the baseline."""
    reports = [load(f"accuracy_{name}.json") for name in arms if (RESULTS / f"accuracy_{name}.json").exists()]
    base = reports[0]
    rows = []
    for report in reports:
        seeds = report["seeds"]
        own = {r["size"]: r["ndcg_10"] for r in report.get("separate", [])}
        against_twin = {b["size"]: b for b in report.get("significance", [])}
        against_base = {b["size"]: b for b in report.get("against_baseline", [])}
        for row in report["matryoshka"]["rows"]:
            size = row["size"]
            twin, note = own.get(size), ""
            if size in own:
                note = interval(against_twin[size])
            elif arms[report["name"]] and size in {r["size"] for r in base["separate"]}:
                theirs = load(f"accuracy_{arms[report['name']]}.json")  # the twins of the arm it extends
                alone = [theirs["per_seed"][f"separate-d{size}-seed{n}"]["rows"][0]["ndcg_10"] for n in seeds]
                twin, note = sum(alone) / len(alone), "its baseline's twins"
            rows.append([
                arm_change(report), " ".join(str(n) for n in seeds), str(size), f4(row["ndcg_10"]),
                interval(against_base[size]) if size in against_base else "",
                f4(twin) if twin is not None else "", f3(row["ndcg_10"] / twin) + "x" if twin is not None else "", note,
                own_best_validation(report, size),
            ])
    lines = [protocol_line(base), ""]
    lines += [f"- `{accuracy_command(r)}` → `bench/results/accuracy_{r['name']}.json` ({r['date']})"
              + (f"; its baseline: the work directory of `{arms[r['name']]}`" if arms[r["name"]] else "")
              for r in reports]
    lines += ["", *table(["arm (what it changes)", "seeds", "size", "NDCG@10 one run",
                          "one run - its baseline's one run, paired bootstrap 95%", "NDCG@10 twin", "one run / twin",
                          "one run - twin, paired bootstrap 95%",
                          "best validation NDCG@10 at its own best epoch: one run / twin"], "llrrrrrrr", rows)]
    threads = sorted({r.get("threads") for r in reports if r.get("threads") is not None}, reverse=True)
    lines += ["", measured_on(base["machine"], " or ".join(map(str, threads)) or None, None) + " The arms' runs took "
              "turns on the same two cores, several at a time (each arm's JSON has its threads per run)."]
    if arms is TWIN_ARMS:
        lines += ["", *nesting_step_cost()]
    return lines


def step_cost(arms: dict[str, str], what: str, change: str) -> list[str]:
    """What the second arm's settings cost per training step against the first's
    (``bench/train_step.py`` on MovieLens-1M, a quiet machine): ``arms`` maps each result's name
    (``train_step_ml-1m-<name>.json``) to the words after "with" that name it."""
    runs = {n: load(f"train_step_ml-1m-{n}.json") for n in arms if (RESULTS / f"train_step_ml-1m-{n}.json").exists()}
    if len(runs) < 2:
        return []
    (first, second), names = arms, "{" + ",".join(arms) + "}"
    step = {n: d["datasets"]["ml-1m"]["encoders"]["lru"]["length"]["mean_step_s"] for n, d in runs.items()}
    steps = runs[second]["datasets"]["ml-1m"]["encoders"]["lru"]["steps"]
    return [
        f"Training step, {what}: `{runs[first]['command']}` and the same with {change} → "
        f"`bench/results/train_step_ml-1m-{names}.json`: mean of {len(steps) if isinstance(steps, list) else steps} "
        f"steps, {step[first]:.2f} s with {arms[first]}, {step[second]:.2f} s with {arms[second]} "
        f"({step[second] / step[first]:.2f}x). "
        + measured_on(platform_machine(runs[second]["machine"]), None,
                      [runs[first]["load_average_start"][0], runs[second]["load_average_start"][0]], "1 minute, at the start of each"),
    ]


def nesting_step_cost() -> list[str]:
    """What slices cost per training step against blocks."""
    return step_cost({"blocks": "blocks", "slices": "slices"}, "the arms' settings with blocks and with slices",
                     '`nesting="slices"`')


def block_accuracy_ml1m_average() -> list[str]:
    """The averaged teacher's arm, and what its teacher costs per training step."""
    return [*block_accuracy_ml1m_converged("ml-1m-cpu-distill-average"), "",
            *step_cost({"teacher-largest": "the largest size as the teacher", "teacher-average": "the averaged teacher"},
                       "the recipe with distillation from the largest size and from its moving average",
                       '`distill_teacher="average"`')]


#: single Sports models of LRURec's size against its published figure: the yardstick question
#: one LRU of LRURec's size trained alone on Sports, per recipe: run -> the run it is compared with
SPORTS_YARDSTICK = {
    "sports-lru-d64-full": None,
    "sports-lru-d64-full-untied": "sports-lru-d64-full",
    "sports-lru-d64-idonly": "sports-lru-d64-full",
    "sports-lru-d64-idonly-untied": "sports-lru-d64-full-untied",
    "sports-lru-d64-init002": "sports-lru-d64-full",
    "sports-lru-d64-init002-untied": "sports-lru-d64-full-untied",
    "sports-lru-d64-postnorm": "sports-lru-d64-full",
    "sports-lru-d64-postnorm-untied": "sports-lru-d64-full-untied",
    "sports-lru-d64-outnorm-untied": "sports-lru-d64-full-untied",
    "sports-lru-d64-geluffn-untied": "sports-lru-d64-full-untied",
    # three seeds, against the size-64 twins of that arm (the config's recipe, the same seeds)
    "sports-lru-d64-outbias-untied": "sports-cpu-slices-each",
    "sports-lru-d64-ema-untied": "sports-cpu-slices-each",
}


def block_sports_yardstick() -> list[str]:
    """One LRU of LRURec's size trained alone on Sports, per recipe, against the published figure;
    each row against the row of the recipe it changes (paired bootstrap over users)."""
    published = published_ndcg()["sports"]
    names = [name for name in SPORTS_YARDSTICK if (RESULTS / f"accuracy_{name}.json").exists()]
    reports = {name: load(f"accuracy_{name}.json") for name in names}
    rows = []
    for number, name in enumerate(names, 1):
        report, baseline = reports[name], SPORTS_YARDSTICK[name]
        row = report["matryoshka"]["rows"][0]
        against = report.get("against_baseline", [])
        if not against or baseline is None:
            versus = ""
        elif baseline in names:
            versus = f"{interval(against[0])} (against #{names.index(baseline) + 1})"
        else:  # the twins of another arm at this size, the same seeds (linked as its baseline's one runs)
            versus = f"{interval(against[0])} (against the size-{row['size']} twins of `{baseline}`)"
        rows.append([str(number), arm_change(report), " ".join(map(str, report["seeds"])), str(row["size"]),
                     f4(row["ndcg_10"]), f4(row["recall_10"]), f3(row["ndcg_10"] / published["LRURec"]) + "x", versus,
                     str(int(report["matryoshka"]["epochs"]))])
    first = reports[names[0]]
    lines = [protocol_line(first), ""]
    lines += [f"- `{accuracy_command(r)}` → `bench/results/accuracy_{r['name']}.json` ({r['date']})" for r in reports.values()]
    lines += ["", *table(["#", "recipe (beyond the config of its date)", "seeds", "size", "NDCG@10 (mean over the seeds)",
                          "Recall@10", f"NDCG@10 / LRURec's {f4(published['LRURec'])}",
                          "NDCG@10 minus another row, paired bootstrap 95%", "epochs"], "rllrrrrrr", rows)]
    lines += ["", measured_on(first["machine"], first.get("threads"), None)]
    return lines


def block_accuracy_sports() -> list[str]:
    """The full softmax against the sampled one on Sports, one run each, and the smallest size alone."""
    full = load("accuracy_sports-4ep.json")
    sampled = {k: load(f"accuracy_sports-4ep-sampled{k}.json") for k in (256, 2048)}
    alone = {r["size"]: r for r in full["separate"]}
    runs = [("full softmax", full), *((f"sampled, {k} negatives", d) for k, d in sampled.items())]
    rows = []
    for label, d in runs:
        m = d["matryoshka"]
        by_size = " / ".join(f4(r["ndcg_10"]) for r in m["rows"])
        recall = " / ".join(f4(r["recall_10"]) for r in m["rows"])
        rows.append([label, by_size, recall, seconds(m["wall_s"]), count(m["peak_rss_mb"])])
    p = full["protocol"]
    sizes = " / ".join(str(r["size"]) for r in full["matryoshka"]["rows"])
    published = published_ndcg()["sports"]
    lines = [
        f"`{accuracy_command(full)}` and the same with `--skip-separate --set model.loss=sampled --set model.negatives=K` "
        f"(K = 256, 2048) → `bench/results/accuracy_sports-4ep*.json` ({full['date']}). Protocol: leave-one-out over "
        f"{count(p['users'])} users, full ranking over {count(p['items'])} items, history "
        f"{'masked' if p['mask_seen'] else 'not masked'}, max length {p['max_len']}, {p['epochs']} epochs ({p['label']}); "
        f"the four runs and other work shared the machine. {measured_on(full['machine'], full.get('threads'))}",
        "",
    ]
    lines += table([f"one run, sizes {sizes}", "NDCG@10", "Recall@10", "wall time", "peak RSS (MB)"], "lrrrr", rows)
    lines.append("")
    for sig in full["significance"]:
        s_ = sig["size"]
        one = next(r for r in full["matryoshka"]["rows"] if r["size"] == s_)
        lines.append(f"- Size {s_} trained alone: NDCG@10 {f4(alone[s_]['ndcg_10'])}; the full-softmax one run is "
                     f"{ratio(one['ndcg_10'] / alone[s_]['ndcg_10'], 3)} of it, difference {interval(sig)} (paired bootstrap).")
    best = max(r["ndcg_10"] for _, d in runs for r in d["matryoshka"]["rows"])
    lines.append(f"- Best full-size figure here {f4(best)} against published "
                 + ", ".join(f"{k} {f4(v)}" for k, v in published.items())
                 + f": {f4(max(published.values()) - best)} below the best (goal not met at {p['epochs']} epochs).")
    return lines


def block_serve() -> list[str]:
    d = load("serve.json")
    m, model = d["machine"], d["model"]
    trained = model["trained"]
    source = (f"the built-in recipe (`{trained['config']}`) trained {trained['epochs']} epochs "
              f"(test NDCG@10 {f4(trained['test']['ndcg_10'])} at size {model['size']})" if trained else "a given checkpoint")
    local = d["in_process"]
    rows = [["in-process `recommend`", "", f"{local['requests']:,}", f"{local['requests_per_s']:,.0f}",
             f"{local['p50_ms']:.2f}", f"{local['p99_ms']:.2f}", "", ratio(1.0)]]
    for name, r in (("endpoint, one client", d["single_client"]), ("endpoint, loaded", d["loaded"])):
        rows.append([name, str(r["clients"]), f"{r['requests']:,}", f"{r['requests_per_s']:,.0f}", f"{r['p50_ms']:.2f}",
                     f"{r['p99_ms']:.2f}", str(r["errors"]), ratio(r["p50_ms"] / local["p50_ms"])])
    after, rss = d["after_load"], d["server_rss_mb"]
    lines = [
        f"`{d['command']}` → `bench/results/serve.json` ({d['date']}): {source}, exported at size {model['size']} "
        f"({model['num_items']:,} items, {model['retriever']} search), served by `python -m serving.rest` in its own "
        f"process (at most {d['server_workers']} requests computed at once, each on {d['threads_per_request']} thread, as in process); "
        f"each request one real user's history (mean length {d['history_length_mean']:.1f}), k={d['k']}; "
        f"{local['seconds']:.0f} s in process, {d['single_client']['seconds']:.0f} s with one client, "
        f"{d['loaded']['seconds']:.0f} s loaded; {d['note']}. "
        + measured_on(f"{m['cpu']}, {m['cpu_count']} cores", None,
                      [d["load_average_start"][0], d["load_average_end"][0]], "1 minute, at start / end"),
        "",
    ]
    lines += table(["run", "clients", "requests", "requests/s", "p50 ms", "p99 ms", "errors", "p50 / in-process p50"],
                   "lrrrrrrr", rows)
    lines += [
        "",
        f"Afterwards {after['equal']} of {after['checked']} answers equalled in-process `recommend` exactly (ids and "
        f"scores), `/health` answered {after['health_status']}; the server's resident memory was {rss['before']:,.0f} MB "
        f"before the load and {rss['after']:,.0f} MB after; it exited with status {d['server_exit_code_on_sigterm']} on SIGTERM.",
    ]
    external = d.get("external_load")
    if external:
        local = external["in_process_same_batch"]
        tools = ", ".join(external["tools"].values())
        rows = [[r["endpoint"], r["tool"], str(r["clients"]), "on" if r["keep_alive"] else "off", f"{r['requests']:,}",
                 f"{r['requests_per_s']:,.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", str(r["errors"]),
                 f"{r['connections_accepted']:,}", ratio(r["p50_ms"] / local["p50_ms"])]
                for part in ("uvicorn", "ray_serve") if part in external for r in external[part]["runs"]]
        ray = external.get("ray_serve", {})
        lines += [
            "",
            f"An external client ({tools}) against the same export: one request body ({external['histories_per_request']} "
            f"history, k={external['k']}) sent {external['requests_per_run']:,} times per run, to `python -m serving.rest` "
            f"(uvicorn, {external['uvicorn_loop']} loop) and to `python -m serving.ray_serve` with {ray.get('replicas', '-')} replicas; "
            f"in process the same body takes p50 {local['p50_ms']:.2f} ms. Connections accepted: the TCP connections the "
            f"machine accepted during the run (one per client when keep-alive holds). {external['note'][:1].upper()}{external['note'][1:]}.",
            "",
            *table(["server", "client", "clients", "keep-alive", "requests", "requests/s", "p50 ms", "p99 ms", "errors",
                    "connections accepted", "p50 / in-process p50"], "llrlrrrrrrr", rows),
        ]
        if ray.get("after_load"):
            lines += ["", f"Ray Serve afterwards: {ray['after_load']['equal']} of {ray['after_load']['checked']} answers equal to "
                          f"in-process `recommend`, `/health` {ray['after_load']['health_status']}; it started in "
                          f"{ray['start_s']:.0f} s and exited with status {ray['exit_code_on_sigterm']} on SIGTERM."]
    return lines


def block_elastic(file: str = "elastic_sports.json") -> list[str]:
    """One grid run of (depth, width, size) triples against triples trained alone (bench/elastic.py)."""
    d = load(file)
    p, g = d["protocol"], d["grid"]
    twins = {t["triple"]: t for t in d["twins"]}
    # sizes trained alone by bench/accuracy.py under the same protocol are twins of the nested
    # triples (full depth, width = size); they kept no per-user ranks, so no interval
    plain = load(p["plain_one_run"]) if p.get("plain_one_run") else None
    same = plain is not None and plain["protocol"]["epochs"] == p["epochs"]
    deepest = max(r["depth"] for r in g["rows"])
    alone = {f"L{deepest}_w{r['size']}_d{r['size']}": r for r in plain["separate"]} if same else {}
    rows = []
    for r in g["rows"]:
        t, a = twins.get(r["triple"]), alone.get(r["triple"])
        twin = [f4(t["ndcg_10"]), ratio(t["ratio"], 3), interval(t["grid_minus_twin"])] if t else (
            [f4(a["ndcg_10"]) + " (accuracy run)", ratio(r["ndcg_10"] / a["ndcg_10"], 3), ""] if a else ["", "", ""])
        rows.append([r["triple"], count(r["parameters"]), f4(r["ndcg_10"]), f4(r["recall_10"]),
                     f"{r['encode_ms_per_1k']:.0f}", f"{r['retrieval_flops_per_user'] / 1e6:.2f}", *twin])
    c = d["cost"]
    lines = [
        f"`{d['commands']['bench']}` → `bench/results/{file}` ({d['date']}): one run trains {c['triples']} triples "
        + (f"(depths {g['depths']}, {g['grid']} grid over the [width, size] pairs {g['pairs']})" if g["pairs"] else
           "(`--model.triples`)") + "; each twin is its triple "
        f"trained alone (`--model.triples`). Settings of the config, up to {p['epochs']} epochs, early stopping with "
        f"patience {p['patience']} on validation NDCG@10 (the grid: the mean over its triples), seed {p['seed']}, test "
        f"metrics of the best checkpoint; runs {d['parallel']} at a time. Encoding time measured afterwards, alone, on "
        f"the same test histories (median of the passes). " + (f"{p['label']}. " if p.get("label") else "")
        + measured_on(d["machine"], None, d.get("load_average_at_timing"), "1 minute, when the timing began"),
        "",
    ]
    lines += table(["triple", "parameters", "NDCG@10", "Recall@10", "encode ms / 1k users", "retrieval MFLOPs / user",
                    "twin NDCG@10", "grid / twin", "grid - twin [95%]"], "lrrrrrrrl", rows)
    lines += ["", f"SASRec of the same width and depth encodes in {d['encode_ms_per_1k_sasrec']:.0f} ms per 1,000 users.", ""]
    goal = []
    for row in d["goal"]["sizes"]:
        base = row.get("plain_one_run_ndcg_10")
        nested = "nested" in row
        goal.append([str(row["size"]), row["best"], f4(row["ndcg_10"]), f"{row['encode_ms_per_1k']:.0f}",
                     f"{row['nested']} {f4(row['nested_ndcg_10'])}" if nested else "not trained",
                     ratio(row["gain_over_nested"], 3) if nested else "",
                     f4(base) if base is not None else "", ratio(row["gain_over_plain_one_run"], 3) if base is not None else "",
                     "met" if row["met"] else "not met"])
    lines += table(["size", "best triple no dearer than SASRec", "NDCG@10", "encode ms / 1k", "nested cut, same run",
                    "gain", "plain one run", "gain", "goal (1.2x)"], "llrrlrrrl", goal)
    worst = min(d["twins"], key=lambda t: t["ratio"])
    lines += [
        "",
        f"- Every twin at least 0.97x: {'yes' if d['goal']['twins_at_least_0.97'] else 'no'} (lowest {worst['triple']}, "
        f"{ratio(worst['ratio'], 3)}).",
        f"- Cost: the grid run took {seconds(c['grid_wall_s'])} ({g['epochs']} epochs) and {count(c['grid_peak_rss_mb'])} MB "
        f"peak RSS; its {c['twins']} twins together {seconds(c['twins_wall_s'])}, at most "
        f"{count(c['twins_peak_rss_mb'])} MB.",
        "",
        f"![NDCG@10 over the grid](../bench/results/{file.replace('.json', '.png')})",
    ]
    return lines


# issue 30: the training step against the baseline commit's, each as it trains by default
SPEED_GOAL = 2.0
SPEED_FLOOR_GOAL = 0.40


def block_train_speed() -> list[str]:
    lines: list[str] = []
    rows, misses, floors = [], [], []
    for file in ("train_speed.json", "train_speed_full_softmax.json"):
        d = load(file)
        m = d["machine"]
        lines.append(
            f"`{d['command']}` → `bench/results/{file}`: {d['arms']}; the baseline is commit `{d['baseline']}`; "
            f"{d['floor']}; the table's fractions are at the highest rate. " + measured_on(platform_machine(m), m.get("threads"),
                                             [d["load_average_start"][0], d["load_average_end"][0]], "1 minute, at start / end"))
        lines.append("")
        for name, data in d["datasets"].items():
            loss = data["model"].get("loss", "full")
            for encoder, r in data["encoders"].items():
                old, new = r["baseline"]["length"], r["current"]["length"]
                speedup = r["speedup"]["length"]
                # at the highest product rate its process measured: the conservative figure on a shared machine
                floors.append(new["floor_fraction_at_highest_rate"])
                label = f"{TRAIN_NAMES.get(name, name)}, {TRAIN_NAMES.get(encoder, encoder)}"
                if speedup < SPEED_GOAL:
                    misses.append(f"{label}, {loss} softmax ({ratio(speedup)})")
                rows.append([
                    TRAIN_NAMES.get(name, name), TRAIN_NAMES.get(encoder, encoder), loss,
                    f"{r['baseline']['precision']} / {r['current']['precision']}",
                    f"{old['mean_step_s']:.3f} / {new['mean_step_s']:.3f}",
                    f"{old['real_positions_per_s']:,.0f} / {new['real_positions_per_s']:,.0f}", ratio(speedup),
                    f"{percent(old['floor_fraction_at_highest_rate'])} / {percent(new['floor_fraction_at_highest_rate'])}",
                    f"{seconds(old['epoch_s_extrapolated'])} / {seconds(new['epoch_s_extrapolated'])}",
                    f"{r['baseline']['initial_loss']:.3f} / {r['current']['initial_loss']:.3f}",
                ])
    lines += table(["data", "encoder", "softmax", "precision", "step s", "real positions/s", "speed-up", "of floor",
                    "epoch (extrapolated)", "first loss"], "llllrrrrrr", rows)
    lines.append("")
    lines.append(f"- Real positions per second at least {ratio(SPEED_GOAL, 0)} the baseline's: met by "
                 f"{len(rows) - len(misses)} of {len(rows)}" + (f"; not met: {'; '.join(misses)}" if misses else "") + ".")
    lines.append(f"- At least {percent(SPEED_FLOOR_GOAL)} of the floor of the precision used: met by "
                 f"{sum(f >= SPEED_FLOOR_GOAL for f in floors)} of {len(floors)} (this checkout's rows: "
                 f"{span(floors, percent)}).")
    return lines


# issue 30: the one run's test metrics and wall time before and after (baseline float32, now bf16-mixed)
# (data, before, its commit where run for this, after, the commit the after runs trained at, a before
# run alone for its wall time: the earlier runs shared the cores two at a time)
SPEED_METRICS = (
    ("Last.fm", "accuracy_lastfm-2fd92c9.json", "2fd92c9", "accuracy_lastfm-bf16.json", "6c1277e", None),
    ("MovieLens-1M, reduced", "accuracy_ml-1m-cpu.json", None, "accuracy_ml-1m-cpu-bf16.json", "bccc252",
     "accuracy_ml-1m-cpu-2fd92c9.json"),
)


def _one_run_seeds(report: dict) -> list[dict]:
    return [v for k, v in report["per_seed"].items() if k.startswith("matryoshka-seed")] if "per_seed" in report else []


def block_speed_metrics() -> list[str]:
    lines: list[str] = []
    rows, held, total = [], 0, 0
    walls = []
    for label, old_file, old_commit, new_file, commit, old_alone_file in SPEED_METRICS:
        old, new = load(old_file), load(new_file)
        n_old, n_new = len(old.get("seeds", [0])), len(new.get("seeds", [0]))
        at = f" (the package of commit `{old_commit}`)" if old_commit else ""
        lines.append(f"- {label}, before{at}: {source_line(old)} {n_old} seeds, {old['parallel']} run(s) at a time.")
        lines.append(f"- {label}, after (the package of commit `{commit}`): {source_line(new)} {n_new} seeds, "
                     f"{new['parallel']} run(s) at a time.")
        if old_alone_file:
            alone = load(old_alone_file)
            lines.append(f"- {label}, before, alone for its wall time (the package of commit `2fd92c9`): {source_line(alone)}")
        for o, n in zip(old["matryoshka"]["rows"], new["matryoshka"]["rows"]):
            so, sn = o.get("ndcg_10_std", 0.0), n.get("ndcg_10_std", 0.0)
            bound = 2 * math.sqrt(so**2 / n_old + sn**2 / n_new)
            diff = n["ndcg_10"] - o["ndcg_10"]
            ok = abs(diff) <= bound
            held += ok
            total += 1
            rows.append([label, str(o["size"]), f"{f4(o['ndcg_10'])} ± {f4(so)}", f"{f4(n['ndcg_10'])} ± {f4(sn)}",
                         f"{diff:+.4f}", f"{bound:.4f}", "yes" if ok else "no"])
        alone = load(old_alone_file) if old_alone_file else old
        before = [r["wall_s"] for r in _one_run_seeds(alone)] or [alone["cost"]["matryoshka_wall_s"]]
        after = [r["wall_s"] for r in _one_run_seeds(new)] or [new["cost"]["matryoshka_wall_s"]]
        epochs_before = [r["epochs"] for r in _one_run_seeds(alone)]
        epochs_after = [r["epochs"] for r in _one_run_seeds(new)]
        walls.append(f"{label}: {seconds(sum(before) / len(before))} before"
                     + (f" ({'/'.join(map(str, epochs_before))} epochs" + (", the run alone" if old_alone_file else "") + ")"
                        if epochs_before else "")
                     + f", {seconds(sum(after) / len(after))} after ({'/'.join(map(str, epochs_after))} epochs), "
                     f"{ratio(sum(before) / len(before) / (sum(after) / len(after)))}")
    lines.append("")
    lines += table(["data", "size", "NDCG@10 before", "NDCG@10 after", "after − before", "2 × its standard error",
                    "within"], "lrrrrrl", rows)
    lines += ["", f"- Metrics held (the difference of the seed means within twice its standard error): {held} of {total}.",
              "- Wall time of the one run, mean per seed (training with early stopping, validation every epoch, "
              "the test, the per-size results): " + "; ".join(walls) + "."]
    return lines


BLOCKS: dict[str, Callable[[], list[str]]] = {
    "machines": block_machines,
    "promise": block_promise,
    "accuracy-ml-1m": block_accuracy_ml1m,
    "accuracy-ml-1m-cpu": block_accuracy_ml1m_cpu,
    "accuracy-lastfm": block_accuracy_lastfm,
    "loss": block_loss,
    "retrieval": block_retrieval,
    "funnel": block_funnel,
    "funnel-own": lambda: block_funnel("funnel_own.json"),
    "funnel-sports-distill": lambda: block_funnel_pair("funnel_sports-nodistill.json", "funnel_sports-distill.json",
                                                       "distillation"),
    "funnel-sports-real-distill": lambda: block_funnel_pair("funnel_sports-real-nodistill.json", "funnel_sports-real-distill.json",
                                                            "distillation"),
    "encoders": block_encoders,
    "candidates": block_candidates,
    "prepare": block_prepare,
    "nested-linear": block_nested_linear,
    "train-step": block_train_step,
    "train-speed": block_train_speed,
    "speed-metrics": block_speed_metrics,
    "cold-start": block_cold_start,
    "cold-start-sports": lambda: block_cold_start("cold_start_sports.json"),
    "loss-sports": lambda: block_loss("loss_sports.json"),
    "search-lastfm": block_search_lastfm,
    "accuracy-sports-config": block_accuracy_sports_config,
    "accuracy-ml-1m-cpu-converged": block_accuracy_ml1m_converged,
    "accuracy-ml-1m-cpu-distill": lambda: block_accuracy_ml1m_converged("ml-1m-cpu-distill"),
    "accuracy-ml-1m-cpu-distill-next": lambda: block_accuracy_ml1m_converged("ml-1m-cpu-distill-next"),
    "accuracy-ml-1m-cpu-distill-average": block_accuracy_ml1m_average,
    "accuracy-sports": block_accuracy_sports,
    "twin-arms-ml-1m-cpu": block_twin_arms,
    "twin-arms-sports-cpu": lambda: block_twin_arms(SPORTS_TWIN_ARMS),
    "twin-arms-lastfm-cpu": lambda: block_twin_arms(LASTFM_TWIN_ARMS),
    "sports-yardstick": block_sports_yardstick,
    "heldout-sports-cpu-slices-each": lambda: block_heldout("sports-cpu-slices-each"),
    "heldout-ml-1m-cpu-converged": lambda: block_heldout("ml-1m-cpu-converged"),
    "heldout-sports-cpu-slices-each-d32-5seeds": lambda: block_heldout("sports-cpu-slices-each-d32-5seeds"),
    "heldout-sports-cpu-slices-each-distill": lambda: block_heldout("sports-cpu-slices-each-distill"),
    "serve": block_serve,
    "elastic-sports": block_elastic,
    "elastic-sports-focus": lambda: block_elastic("elastic_sports-focus.json"),
    "elastic-ml-1m-cpu": lambda: block_elastic("elastic_ml-1m-cpu.json"),
    "elastic-lastfm": lambda: block_elastic("elastic_lastfm.json"),
}


# -- the page --------------------------------------------------------------------------------------


def section_bounds(page: str) -> tuple[int, int]:
    """Start and end offsets of the Measured results section (up to the next ``## `` heading)."""
    start = page.find(SECTION + "\n")
    if start < 0:
        raise SystemExit(f"{RESULTS_PAGE.name} has no '{SECTION}' section")
    end = page.find("\n## ", start + len(SECTION))
    return start, len(page) if end < 0 else end + 1


def render(page: str) -> str:
    """``page`` with every generated block of its Measured results section rewritten."""
    start, end = section_bounds(page)
    section = page[start:end]
    for name, build in BLOCKS.items():
        begin, finish = start_marker(name), end_marker(name)
        if section.count(begin) != 1 or section.count(finish) != 1:
            raise SystemExit(f"{RESULTS_PAGE.name}'s '{SECTION}' section needs exactly one {begin} ... {finish} pair")
        before, rest = section.split(begin, 1)
        _, after = rest.split(finish, 1)
        section = f"{before}{begin}\n" + "\n".join(build()) + f"\n{finish}{after}"
    return page[:start] + section + page[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the page differs")
    parser.add_argument("--page", type=Path, default=RESULTS_PAGE, help="the page to rewrite or check")
    args = parser.parse_args(argv)
    page = args.page.read_text(encoding="utf-8")
    updated = render(page)
    if args.check:
        if updated != page:
            print(f"{args.page}: the measured results are out of date: run python tools/results_tables.py",
                  file=sys.stderr)
            return 1
        print(f"{args.page}: the measured results are up to date")
        return 0
    if updated != page:
        args.page.write_text(updated, encoding="utf-8")
        print(f"rewrote {len(BLOCKS)} blocks in {args.page}")
    else:
        print(f"{args.page}: already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
