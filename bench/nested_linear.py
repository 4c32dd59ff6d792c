"""Nested linear: one masked dense product against one product per chunk (docs/method.md §1).

    .venv/bin/python bench/nested_linear.py

Forward+backward time of ``NestedLinear(mode="masked")`` and ``NestedLinear(mode="blocks")`` for
doubling sizes, the two modes taking turns (so machine noise hits both alike); medians of repeats.
Prints a table and writes bench/results/nested_linear.json. The blocks mode does about 2/3 of the
masked mode's FLOPs for doubling sizes but launches one product per chunk.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from recsys.nn.nested import NestedLinear
from recsys.atomic import write_json_atomically

OUT = Path(__file__).resolve().parent / "results" / "nested_linear.json"


def step_ms(layer: NestedLinear, x: torch.Tensor) -> float:
    start = time.perf_counter()
    layer(x).square().sum().backward()
    return (time.perf_counter() - start) * 1e3


def main(repeats: int = 15, out: Path = OUT) -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cases = []
    for width in (64, 256, 1024):
        sizes = [width // 16, width // 8, width // 4, width // 2, width]
        for rows, mult in ((4096, 1), (4096, 2)):
            x = torch.randn(rows, width)
            masked = NestedLinear(sizes, out_mult=mult, mode="masked")
            blocks = NestedLinear(sizes, out_mult=mult, mode="blocks")
            blocks.load_state_dict(masked.state_dict())
            times = {"masked": [], "blocks": []}
            for i in range(repeats + 2):
                for name, layer in (("masked", masked), ("blocks", blocks)):
                    t = step_ms(layer, x)
                    if i >= 2:
                        times[name].append(t)
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            cases.append({"rows": rows, "sizes": sizes, "out_mult": mult, "masked_ms": med["masked"],
                          "blocks_ms": med["blocks"], "blocks_over_masked": med["blocks"] / med["masked"]})
            print(f"D={width:5d} out x{mult} rows={rows}: masked {med['masked']:7.2f} ms  blocks {med['blocks']:7.2f} ms"
                  f"  blocks/masked {med['blocks'] / med['masked']:.2f}", flush=True)
    write_json_atomically(out, {
        "benchmark": "nested_linear", "device": "cpu", "threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
        "repeats": repeats, "cases": cases,
    }, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per mode and case (after 2 untimed)")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON written")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    main(args.repeats, args.out)
