"""Process settings that make the same code fast on this machine: the allocator and the precision.

Both are picked at run time from what the machine is, and both are measured
(bench/results/train_speed.json, docs/results.md "Training speed"):

- :func:`reuse_freed_memory`: glibc hands every allocation above 128 KiB-32 MiB back to the
  kernel when it is freed, so each new activation of a training step (tens of MB) is a fresh
  mapping whose pages fault in on first touch: on two cores a multiply over a 50 MB tensor took
  21 ms that way against 3.6 ms on reused memory. Keeping freed memory in the heap (no ``mmap``
  for large blocks, no trimming) removes that; the process's peak memory is unchanged, its
  resident memory no longer shrinks between steps.
- :func:`default_precision`: ``bf16-mixed`` (products in bfloat16, weights, optimizer and the
  softmax passes in float32) on a CPU with native bfloat16 arithmetic (AVX-512 BF16 or AMX), where
  it is faster and the metrics hold; ``32-true`` elsewhere, GPUs included (not measured there yet).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

import torch

__all__ = ["default_precision", "native_bfloat16", "reuse_freed_memory"]

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def reuse_freed_memory() -> bool:
    """Keep memory freed by the process for its next allocations (glibc on Linux; elsewhere nothing).

    Returns whether the setting took. Call it once, early, in a process that runs training or
    batch inference; it is safe to call again.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    if not ok:
        log.debug("mallopt refused; freed memory is returned to the system as usual")
    return ok


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (oneDNN's check: AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_precision() -> str:
    """Lightning's ``precision`` for a run on this machine (see the module docstring)."""
    if torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if native_bfloat16() else "32-true"
