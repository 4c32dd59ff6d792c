"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import platform
import statistics
import time

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() where that is unreadable)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        return cpu


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Median float32 GFLOP/s of an ``n x n`` by ``n x n`` torch matmul on this machine now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9
