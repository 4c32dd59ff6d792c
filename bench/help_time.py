"""How long each command takes to answer ``--help``: wall time of a fresh ``python -m CMD --help``.

    python bench/help_time.py                 # 5 runs per command -> bench/results/help_time.json
    python bench/help_time.py --runs 10 --tree ../other-checkout   # another checkout's code, same interpreter

Each run is a new interpreter, as a user's is (nothing cached but the operating system's files);
the figure per command is the median over the runs, with the minimum beside it. The 1-minute load
average is recorded before and after: on a shared machine the times scale with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["recsys.train", "recsys.data", "recsys.export", "serving.candidates"]


def time_help(command: str, tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", command, "--help"], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose commands are timed")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "help_time.json")
    args = parser.parse_args(argv)
    from recsys.atomic import write_json_atomically

    load_before = os.getloadavg()[0]
    times = {c: [time_help(c, args.tree.resolve()) for _ in range(args.runs)] for c in COMMANDS}
    load_after = os.getloadavg()[0]
    rows = [{"command": c, "median_s": statistics.median(t), "min_s": min(t), "runs": len(t)} for c, t in times.items()]
    for r in rows:
        print(f"python -m {r['command']} --help: {r['median_s']:.2f} s median, {r['min_s']:.2f} s min ({r['runs']} runs)")
    print(f"load average (1 minute): {load_before:.1f} before, {load_after:.1f} after; {os.cpu_count()} cores")
    write_json_atomically(args.out, {"command": f"python bench/help_time.py --runs {args.runs}", "rows": rows,
                                     "cores": os.cpu_count(),
                                     "load_average_1m": [load_before, load_after]}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
