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


def matmul_gflops(n: int | None = None, repeats: int = 5, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> float:
    """Median GFLOP/s of an ``n x n`` by ``n x n`` torch matmul on ``device`` now, on random data
    (``n``: 2048 on a CPU, 8192 on a GPU). On a GPU float32 products follow the current
    ``torch.backends.cuda.matmul.allow_tf32`` (TF32 or not), so call it under the precision to rate."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9
