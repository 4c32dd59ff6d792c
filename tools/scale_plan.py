"""Write the scale plan of docs/scale.md (the block between its markers) from measured results.

    python tools/scale_plan.py            # rewrite the block
    python tools/scale_plan.py --check    # exit 1 when the block is not what the results give

Inputs (all measured on one 2-core CPU machine, see each file):

- ``bench/results/candidates.json``: users/s of the whole single-process candidate job at 10^6 items
  per size ``s`` (k=100, exact search, seen items excluded): ``r_s``;
- ``bench/results/ray_candidates.json``: the Ray Data job's fixed overhead against the single-process
  job at 10^5 users (``overhead_s``, actors' start and staging) and the local Ray start (``ray_init_s``);
- ``bench/results/train_step.json``: the mean training step (Sports, LRU encoder, length batching,
  batch 128, sizes up to 256) and the encoder's parameter count.

Formulas (projections; symbols: ``U`` users, ``N = 10^6`` items, ``M`` machines, ``s`` size):

- candidates time = ``U / (M * r_s) + o``, with ``o`` = max(0, the Ray overhead) + the Ray start when
  ``M > 1`` (0 for the single-process job on one machine): shards are independent, so throughput
  adds up. The measured overhead is negative on the loaded bench machine (the Ray job was faster);
  the projection does not count on that and takes the single-process rate per machine;
- candidates memory per process = item table ``N * s * 4`` B (float32) + the list of every input
  user, ``U * 8`` B (each shard lists all users to assign them) + one part in flight
  (10^5 users x 20 events x 24 B + 10^5 x k rows x 24 B);
- training epoch time = ``ceil(U / 128) * t_step / M`` (one window per user as in Sports, data
  parallel with perfect scaling: a projection, DDP was run on 2 CPU processes only);
- training memory per process = the item ID table and its gradient and AdamW state,
  ``N * 256 * 4 * 4`` B, divided by ``M`` when sharded row-wise (torchrec), plus the measured model's
  other parameters x 16 B.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scale.md"
BEGIN, END = "<!-- scale-plan:begin (tools/scale_plan.py) -->", "<!-- scale-plan:end -->"
USERS = (10**6, 10**7, 10**8)
MACHINES = (1, 4, 16)
ITEMS = 10**6
SIZES = (64, 256)
MAX_SIZE = 256
K = 100
PART_USERS, EVENTS_PER_USER, EVENT_BYTES, ROW_BYTES = 10**5, 20, 24, 24
BATCH = 128


def _load(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / name).read_text())


def _time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes < 1e10 else f"{num_bytes / 1e9:.0f} GB"


def _users(u: int) -> str:
    return f"10^{round(math.log10(u))}"


def inputs() -> dict:
    cand = _load("candidates.json")
    rates = {r["size"]: r["users_per_s"] for r in cand["rows"] if r["num_items"] == ITEMS}
    ray = _load("ray_candidates.json")
    lru = _load("train_step.json")["datasets"]["sports"]
    step = lru["encoders"]["lru"]["length"]["mean_step_s"]
    params = lru["encoders"]["lru"]["parameters"]
    return {
        "rates": rates, "cand_load": cand["machine"]["load_average"], "overhead_s": ray["overhead_s"],
        "ray_init_s": ray["ray_init_s"], "ray_users": ray["users"], "ray_actors": ray["actors"],
        "ray_single_s": ray["single_s"], "ray_s": ray["ray_s"], "step_s": step, "params": params,
        "sports_windows": lru["windows"],
    }


def block(x: dict) -> str:
    lines = [
        "Measured (one 2-core CPU machine, shared; see each JSON for its load average):",
        "",
        "| input | value | from |",
        "|---|---|---|",
    ]
    for s in SIZES:
        lines.append(f"| candidate job at 10^6 items, size {s}, k={K} | {x['rates'][s]:.0f} users/s | bench/results/candidates.json |")
    lines += [
        f"| Ray job overhead at {x['ray_users']:,} users ({x['ray_actors']} actors) | {x['overhead_s']:+.1f} s "
        f"({x['ray_single_s']:.1f} s single-process, {x['ray_s']:.1f} s Ray) | bench/results/ray_candidates.json |",
        f"| local Ray start | {x['ray_init_s']:.1f} s | bench/results/ray_candidates.json |",
        f"| training step, Sports, LRU, batch {BATCH}, length batching | {x['step_s']:.3f} s | bench/results/train_step.json |",
        f"| model parameters (Sports, LRU, sizes to 256) | {x['params']:,} | bench/results/train_step.json |",
        "",
        f"Projected for 10^6 items (every figure below; formulas in tools/scale_plan.py and above). Time of the"
        " candidate job and of one training epoch; memory per process:",
        "",
        "| users | machines | candidates s=64 | candidates s=256 | candidates memory s=64 / s=256 "
        "| training epoch | training memory (replicated / sharded) |",
        "|---|---|---|---|---|---|---|",
    ]
    fixed = max(0.0, x["overhead_s"]) + x["ray_init_s"]
    part = PART_USERS * EVENTS_PER_USER * EVENT_BYTES + PART_USERS * K * ROW_BYTES
    table = ITEMS * MAX_SIZE * 4 * 4
    other = x["params"] * 16
    for u in USERS:
        for m in MACHINES:
            o = fixed if m > 1 else 0.0
            times = [_time(u / (m * x["rates"][s]) + o) for s in SIZES]
            mems = [_gb(ITEMS * s * 4 + u * 8 + part) for s in SIZES]
            epoch = _time(math.ceil(u / BATCH) * x["step_s"] / m)
            train = f"{_gb(table + other)} / {_gb(table / m + other)}"
            lines.append(f"| {_users(u)} | {m} | {times[0]} | {times[1]} | {mems[0]} / {mems[1]} | {epoch} | {train} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when docs/scale.md is not up to date")
    args = parser.parse_args(argv)
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        print(f"{DOC}: the markers {BEGIN} ... {END} are missing", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{block(inputs())}\n{END}{tail}"
    if args.check:
        if new != text:
            print(f"{DOC} is out of date: run python tools/scale_plan.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
