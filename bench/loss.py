"""Cost of "all sizes at once" in the loss: the memory-flat Matryoshka loss against the naive one
and against the largest size alone (docs/method.md §4, bench/README.md §2).

One train step of the loss = forward + backward of the logits' matrix products and the softmax
cross-entropy, from the user states ``U (P, D)`` and the item matrix ``Z (N+1, D)`` (both leaves
that need gradients) to their gradients. Variants:

- ``largest_alone``: plain autograd ``F.cross_entropy`` at the largest size only (the reference);
- ``flat_all@R``: :func:`matryoshka_cross_entropy` over all sizes with ``block_rows=R`` (logit
  rows held at once over all sizes; one entry per ``--block-rows``);
- ``naive_all``: :func:`naive_matryoshka_cross_entropy` over all sizes (M logit tensors);
- ``flat_largest@R``: the memory-flat loss with the largest size only (its overhead at M = 1);
- ``flat_distill@R`` (``--distill``): all sizes with in-place self-distillation from the largest;
- ``flat_top{k}@R`` (``--sweep-sizes``): the memory-flat loss over the ``k`` largest sizes, to show
  how time and memory go with the number of sizes at a fixed ``block_rows``.

Time: all variants in one process, interleaved round by round, median (and min) over repeats after
a warm-up step, for each ``--threads`` count. Machines here are shared and noisy: compare the ratios
within one run. On an oversubscribed machine every multi-threaded operation also waits for its
threads to be scheduled, which penalises code made of many operations (the blocked loss) far more
than its arithmetic; one thread shows the arithmetic cost. The load average is recorded.

Peak memory: each variant in a fresh child process with glibc's mmap threshold pinned to 64 KiB
(``MALLOC_MMAP_THRESHOLD_``) so that every tensor buffer is mapped on allocation and unmapped on free,
and resident memory follows live tensor memory. After a warm-up step the kernel's high-water mark
is reset (``/proc/self/clear_refs``), and the figure is ``VmHWM`` during one step minus ``VmRSS``
just before it: bytes really touched by the step, gradients included. Without ``clear_refs`` the
child skips the warm-up and uses ``ru_maxrss`` instead (the JSON names the method).

    python bench/loss.py                        # the scale of docs/method.md §4, 2 threads, writes bench/results/loss.json
    python bench/loss.py --block-rows 1024 2048 4096 --threads 2 1 --repeats 9
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from recsys.nn.loss import (
    matryoshka_cross_entropy,
    naive_matryoshka_cross_entropy,
    sampled_matryoshka_cross_entropy,
)
from recsys.atomic import write_json_atomically

logger = logging.getLogger("bench.loss")


# -- one variant ----------------------------------------------------------------------------------


def make_inputs(spec: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random states and items at the scale of a trained model's logits (std of a logit ~ 2)."""
    g = torch.Generator().manual_seed(0)
    d = spec["sizes"][-1]
    scale = (2.0 / d) ** 0.5
    user = (torch.randn(spec["positions"], d, generator=g) * scale).requires_grad_()
    items = (torch.randn(spec["items"] + 1, d, generator=g) * scale).requires_grad_()
    targets = torch.randint(1, spec["items"] + 1, (spec["positions"],), generator=g)
    return user, items, targets


def loss_fn(variant: str, spec: dict):
    """``(user, items, targets) -> scalar loss`` for a variant name like ``flat_all@512``."""
    name, _, block = variant.partition("@")
    sizes = tuple(spec["sizes"])
    block_rows = int(block) if block else spec["block_rows"][0]
    if name == "largest_alone":
        return lambda u, z, t: naive_matryoshka_cross_entropy(u, z, t, sizes[-1:]).total
    if name == "naive_all":
        return lambda u, z, t: naive_matryoshka_cross_entropy(u, z, t, sizes).total
    if name == "flat_all":
        return lambda u, z, t: matryoshka_cross_entropy(u, z, t, sizes, block_rows=block_rows).total
    if name.startswith("flat_top"):
        top = sizes[-int(name.removeprefix("flat_top")) :]
        return lambda u, z, t: matryoshka_cross_entropy(u, z, t, top, block_rows=block_rows).total
    if name == "flat_largest":
        return lambda u, z, t: matryoshka_cross_entropy(u, z, t, sizes[-1:], block_rows=block_rows).total
    if name == "flat_distill":
        return lambda u, z, t: matryoshka_cross_entropy(u, z, t, sizes, block_rows=block_rows, distill=1.0).total
    if name == "sampled":  # sampled@K: K uniform negatives shared by the batch, with the log-Q correction
        k = int(block)
        negatives = torch.randint(1, spec["items"] + 1, (k,), generator=torch.Generator().manual_seed(1))
        log_q = torch.full((spec["items"] + 1,), -math.log(spec["items"]))
        return lambda u, z, t: sampled_matryoshka_cross_entropy(u, z, t, sizes, negatives, log_q).total
    raise ValueError(f"unknown variant {variant!r}")


def train_step(fn, user: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> None:
    user.grad = None
    items.grad = None
    fn(user, items, targets).backward()


# -- memory (child process) -----------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(spec: dict, variant: str) -> dict:
    """Child process: resident memory added by one train step at its peak."""
    torch.set_num_threads(spec["threads"])
    user, items, targets = make_inputs(spec)
    fn = loss_fn(variant, spec)
    train_step(fn, user, items, targets)  # warm-up: lazy initialisation, thread pools
    user.grad = items.grad = None
    gc.collect()
    if _reset_high_water_mark():
        method = "VmHWM after clear_refs, minus VmRSS before the step"
        base = _proc_status_kib("VmRSS")
        train_step(fn, user, items, targets)
        peak = _proc_status_kib("VmHWM")
    else:  # no warm-up possible: the lifetime maximum must come from the step itself
        raise RuntimeError("clear_refs unavailable")
    return {"peak_mib": (peak - base) / 1024, "method": method}


def _measure_memory_fresh(spec: dict, variant: str) -> dict:
    """Fallback when clear_refs is unavailable: fresh process, no warm-up, ru_maxrss."""
    torch.set_num_threads(spec["threads"])
    user, items, targets = make_inputs(spec)
    fn = loss_fn(variant, spec)
    base = _proc_status_kib("VmRSS")
    train_step(fn, user, items, targets)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_mib": (peak - base) / 1024, "method": "ru_maxrss minus VmRSS before the first step"}


def run_memory_child(spec: dict, variant: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps({"spec": spec, "variant": variant})]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory child for {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- time (this process) --------------------------------------------------------------------------


def measure_times(spec: dict, variants: list[str], repeats: int) -> dict[str, list[float]]:
    user, items, targets = make_inputs(spec)
    fns = {v: loss_fn(v, spec) for v in variants}
    for fn in fns.values():
        train_step(fn, user, items, targets)  # warm-up
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(repeats):
        for v, fn in fns.items():
            start = time.perf_counter()
            train_step(fn, user, items, targets)
            times[v].append(time.perf_counter() - start)
        logger.info("round %d/%d done", r + 1, repeats)
    return times


def gradient_agreement(spec: dict) -> dict:
    """Largest difference between the memory-flat and the naive loss (float32, this scale)."""
    user, items, targets = make_inputs(spec)
    out = {}
    results = []
    for fn in (loss_fn("flat_all", spec), loss_fn("naive_all", spec)):
        user.grad = items.grad = None
        loss = fn(user, items, targets)
        loss.backward()
        results.append((loss.item(), user.grad, items.grad))
    (lf, duf, dzf), (ln, dun, dzn) = results
    out["loss_abs_diff"] = abs(lf - ln)
    out["d_user_max_abs_diff"] = (duf - dun).abs().max().item()
    out["d_items_max_abs_diff"] = (dzf - dzn).abs().max().item()
    out["d_items_max_abs"] = dzn.abs().max().item()
    return out


def machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=1600)
    parser.add_argument("--items", type=int, default=12101, help="catalogue size N (the item matrix has N+1 rows)")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64, 128, 256])
    parser.add_argument("--block-rows", type=int, nargs="+", default=[1024])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="one timing run per count")
    parser.add_argument("--sweep-sizes", action="store_true", help="also the k largest sizes, k = 2..M-1")
    parser.add_argument("--distill", action="store_true", help="also all sizes with self-distillation from the largest")
    parser.add_argument("--negatives", type=int, nargs="*", default=[],
                        help="also the sampled softmax over all sizes with K uniform shared negatives, per K")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "loss.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        job = json.loads(args.child)
        try:
            result = measure_memory(job["spec"], job["variant"])
        except RuntimeError:
            result = _measure_memory_fresh(job["spec"], job["variant"])
        print(json.dumps(result))
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = {
        "positions": args.positions,
        "items": args.items,
        "sizes": args.sizes,
        "block_rows": args.block_rows,
        "threads": args.threads[0],
    }
    variants = ["largest_alone", *(f"flat_all@{b}" for b in args.block_rows), "naive_all",
                f"flat_largest@{args.block_rows[0]}"]
    if args.distill:
        variants.append(f"flat_distill@{args.block_rows[0]}")
    variants += [f"sampled@{k}" for k in args.negatives]
    if args.sweep_sizes:
        variants += [f"flat_top{k}@{args.block_rows[0]}" for k in range(2, len(args.sizes))]
    load_before = os.getloadavg()
    torch.set_num_threads(args.threads[0])
    agreement = gradient_agreement(spec)
    # peak memory does not depend on the thread count: measured once, with the first count
    memory = {} if args.skip_memory else {v: run_memory_child(spec, v) for v in variants}
    base_mib = memory.get("largest_alone", {}).get("peak_mib")
    timings = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        load = os.getloadavg()
        times = measure_times(spec, variants, args.repeats)
        base_ms = 1000 * statistics.median(times["largest_alone"])
        base_min = 1000 * min(times["largest_alone"])
        rows = {}
        for v in variants:
            ms = 1000 * statistics.median(times[v])
            rows[v] = {
                "step_ms_median": ms,
                "step_ms_min": 1000 * min(times[v]),
                "step_ms_all": [1000 * t for t in times[v]],
                "time_ratio": ms / base_ms,
                "time_ratio_of_minima": 1000 * min(times[v]) / base_min,
            }
        timings[str(threads)] = {"load_average_before": load, "variants": rows}

        print(f"\nloss train step, P={args.positions}, N={args.items}, sizes={args.sizes}, "
              f"{threads} thread(s), median of {args.repeats}, load average {load[0]:.1f}")
        print(f"{'variant':<20}{'ms (median)':>12}{'ms (min)':>10}{'x time':>8}{'x min':>7}{'peak MiB':>10}{'x mem':>7}")
        for v, row in rows.items():
            mem = f"{memory[v]['peak_mib']:>10.1f}{memory[v]['peak_mib'] / base_mib:>7.2f}" if v in memory else ""
            print(f"{v:<20}{row['step_ms_median']:>12.1f}{row['step_ms_min']:>10.1f}"
                  f"{row['time_ratio']:>8.2f}{row['time_ratio_of_minima']:>7.2f}{mem}")
    load_after = os.getloadavg()
    print(f"flat vs naive, float32: {json.dumps(agreement)}")
    print(f"load average before/after: {load_before} / {load_after}")

    result = {
        "benchmark": "loss",
        "command": "python bench/loss.py " + " ".join(sys.argv[1:]),
        "spec": spec,
        "repeats": args.repeats,
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "memory_method": next(iter(memory.values()))["method"] if memory else None,
        "peak_memory": {
            v: {"peak_mib": m["peak_mib"], "memory_ratio": m["peak_mib"] / base_mib} for v, m in memory.items()
        },
        "timings_by_threads": timings,
        "flat_vs_naive": agreement,
    }
    write_json_atomically(args.out, result, indent=2)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
