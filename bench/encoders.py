"""Train-step time and peak memory of the sequence encoders at equal size and length (bench/README.md §5).

For every (length, width) setting, each encoder (nested LRU, nested Mamba, SASRec) runs forward +
backward of the encoder alone under a dummy loss on left-padded random input. Step time: the median
over repeats after one warm-up step, the encoders taking turns step by step so that other load on a
shared machine hits all of them alike. Peak memory: measured in a fresh child process per encoder,
the high-water mark of resident memory during one step (after a warm-up step) minus the resident
memory just before it, i.e. activations, temporaries and gradients on top of the model and inputs
(on CUDA: ``torch.cuda.max_memory_allocated`` above the allocated baseline).
Also reported: the chunked PyTorch selective scan against the step-by-step recurrence (largest
difference and forward+backward time) at the Mamba layer's real shapes.

    python bench/encoders.py                        # CPU, 2 threads, writes bench/results/encoders.json
    python bench/encoders.py --device cuda          # on a GPU (Mamba then uses mamba_ssm when installed)

Machines here are shared and noisy: compare the encoders by the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from recsys.atomic import write_json_atomically

logger = logging.getLogger("bench.encoders")

ENCODERS = ("lru", "mamba", "sasrec")


def sizes_for(width: int, smallest: int) -> list[int]:
    """Doubling sizes from ``smallest`` up to ``width``."""
    sizes = [smallest]
    while sizes[-1] * 2 <= width:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != width:
        raise ValueError(f"width {width} is not {smallest} times a power of two")
    return sizes


def build(name: str, sizes: list[int], length: int) -> torch.nn.Module:
    if name == "lru":
        from recsys.nn.lru import NestedLRUEncoder

        return NestedLRUEncoder(sizes, n_blocks=2, dropout=0.1, r_min=0.0, r_max=0.1)
    if name == "mamba":
        from recsys.nn.mamba import NestedMambaEncoder

        return NestedMambaEncoder(sizes, n_blocks=2, dropout=0.1)
    if name == "sasrec":
        from recsys.nn.sasrec import SASRecEncoder

        return SASRecEncoder(sizes, n_blocks=2, n_heads=2, dropout=0.2, max_len=max(200, length))
    raise ValueError(name)


def batch_inputs(batch: int, length: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random item vectors, left-padded: row lengths spread uniformly over 1..length."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, width, generator=g)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = torch.arange(length) >= (length - lengths)[:, None]
    return x.to(device), mask.to(device)


def _proc_status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident high-water mark) of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_rss_peak() -> None:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(name: str, sizes: list[int], batch: int, length: int, device: torch.device) -> tuple[torch.nn.Module, object]:
    """An encoder in training mode and a closure running one forward + backward under a dummy loss."""
    torch.manual_seed(0)
    encoder = build(name, sizes, length).to(device).train()
    x, mask = batch_inputs(batch, length, sizes[-1], device)
    x.requires_grad_()

    def step() -> None:
        encoder.zero_grad(set_to_none=True)
        x.grad = None
        out = encoder(x, mask)
        out[mask].square().mean().backward()  # dummy loss over all real positions

    return encoder, step


def measure_memory(spec: dict) -> dict:
    """Child process: peak memory of one training step above what is resident before it.

    On CPU the parent starts this process with a fixed glibc mmap threshold, so every large
    buffer is returned to the system when freed and resident memory follows the live tensors.
    A warm-up step first faults in code and one-time buffers; then the high-water mark is reset
    and the measured step's peak is read against the resident size just before it.
    """
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    sizes = sizes_for(spec["width"], spec["smallest"])
    encoder, step = make_step(spec["encoder"], sizes, spec["batch"], spec["length"], device)
    step()  # warm-up
    encoder.zero_grad(set_to_none=True)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _proc_status_bytes("VmRSS")
        _reset_rss_peak()
        step()
        peak = _proc_status_bytes("VmHWM") - base
    return {"peak_mib": peak / 2**20, "parameters": sum(p.numel() for p in encoder.parameters())}


def measure_times(names: list[str], sizes: list[int], batch: int, length: int, repeats: int, device: torch.device) -> dict:
    """Median step time of each encoder; the encoders take turns, so load on a shared machine hits all alike."""
    steps = {name: make_step(name, sizes, batch, length, device)[1] for name in names}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def scan_agreement(batch: int, length: int, width: int, repeats: int, device: torch.device) -> dict:
    """Chunked scan vs step-by-step recurrence at a Mamba layer's shapes (expand 2, N 16, groups)."""
    from recsys.nn.selective_scan import selective_scan, selective_scan_reference

    g = torch.Generator().manual_seed(0)
    dim, n_state, groups = 2 * width, 16, width // 16
    tensors = dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) - 3.0,
        A=-torch.arange(1, n_state + 1, dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(batch, groups, n_state, length, generator=g),
        C=torch.randn(batch, groups, n_state, length, generator=g),
        D=torch.ones(dim),
        z=torch.randn(batch, dim, length, generator=g),
    )
    tensors = {k: v.to(device).requires_grad_() for k, v in tensors.items()}
    result: dict = {"batch": batch, "length": length, "channels": dim, "d_state": n_state, "groups": groups}
    outs = {}
    for name, fn in (("chunked", selective_scan), ("step_by_step", selective_scan_reference)):
        times = []
        for _ in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            out = fn(**tensors, delta_softplus=True)
            out.square().mean().backward()
            _sync(device)
            times.append(time.perf_counter() - start)
        outs[name] = out.detach()
        result[f"{name}_ms"] = 1000 * statistics.median(times[1:])
    result["max_abs_diff"] = (outs["chunked"] - outs["step_by_step"]).abs().max().item()
    result["max_abs_output"] = outs["step_by_step"].abs().max().item()
    return result


def lru_available() -> bool:
    try:
        from recsys.nn.lru import NestedLRUEncoder  # noqa: F401
    except ImportError as err:
        logger.warning("nested LRU not measured: %s", err)
        return False
    return True


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-of", json.dumps(spec)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # see measure_memory
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        logger.error("%s failed:\n%s", spec, done.stderr[-2000:])
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--smallest", type=int, default=16, help="smallest nested size; sizes double up to the width")
    parser.add_argument("--encoders", nargs="+", choices=ENCODERS, default=list(ENCODERS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "encoders.json")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # child process: one memory measurement
    args = parser.parse_args()

    if args.memory_of:
        print(json.dumps(measure_memory(json.loads(args.memory_of))))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    encoders = [e for e in args.encoders if e != "lru" or lru_available()]
    skipped = sorted(set(args.encoders) - set(encoders))

    rows = []
    for length in args.lengths:
        for width in args.widths:
            sizes = sizes_for(width, args.smallest)
            row = {"batch": args.batch, "length": length, "width": width, "sizes": sizes}
            for name in encoders:
                spec = dict(
                    encoder=name, batch=args.batch, length=length, width=width, smallest=args.smallest,
                    threads=args.threads, device=args.device,
                )
                row[name] = run_child(spec)
            for name, ms in measure_times(encoders, sizes, args.batch, length, args.repeats, device).items():
                row[name]["step_ms"] = ms
            logger.info("B=%d L=%d D=%d: %s", args.batch, length, width, {e: row[e] for e in encoders})
            rows.append(row)

    scan = scan_agreement(args.batch, max(args.lengths), min(args.widths), max(1, args.repeats // 2), device)

    header = f"{'B':>4} {'L':>5} {'D':>5} | " + " | ".join(f"{e + ' ms':>12} {e + ' MiB':>12}" for e in encoders)
    header += " | " + " ".join(f"{e + '/sasrec':>12}" for e in encoders if e != "sasrec")
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for e in encoders:
            r = row[e]
            cells.append(f"{r.get('step_ms', float('nan')):12.1f} {r.get('peak_mib', float('nan')):12.1f}")
        base = row.get("sasrec", {}).get("step_ms") if "sasrec" in encoders else None
        ratios = [
            f"{row[e]['step_ms'] / base:12.2f}" if base and "step_ms" in row[e] else f"{'-':>12}"
            for e in encoders
            if e != "sasrec"
        ]
        lines.append(f"{row['batch']:>4} {row['length']:>5} {row['width']:>5} | " + " | ".join(cells) + " | " + " ".join(ratios))
    table = "\n".join(lines)
    scan_line = (
        f"selective scan, B={scan['batch']} L={scan['length']} channels={scan['channels']} N={scan['d_state']} "
        f"groups={scan['groups']}: chunked {scan['chunked_ms']:.1f} ms vs step-by-step {scan['step_by_step_ms']:.1f} ms "
        f"(forward+backward), max |diff| {scan['max_abs_diff']:.2e} (outputs up to {scan['max_abs_output']:.2f})"
    )
    print(f"train step (forward+backward, encoder alone), median of {args.repeats}, {args.threads} threads, {args.device}")
    print(table)
    print(scan_line)
    if skipped:
        print("not measured:", ", ".join(skipped))

    result = {
        "machine": {
            "device": args.device if device.type == "cpu" else torch.cuda.get_device_name(device),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "repeats": args.repeats,
        "peak_memory": "one training step's resident-memory high-water mark above the resident size before it "
        "(child process, after a warm-up step, glibc mmap threshold fixed at 128 KiB)"
        if device.type == "cpu"
        else "torch.cuda.max_memory_allocated above the baseline",
        "rows": rows,
        "selective_scan": scan,
        "not_measured": skipped,
    }
    write_json_atomically(args.out, result, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
