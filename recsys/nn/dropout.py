"""Dropout whose mask costs what a multiply costs on CPU (``nn.Dropout``'s contract otherwise).

``torch.nn.Dropout`` on CPU draws its mask with ``bernoulli_``, one random float per element, and
on two cores that is 25-30x the time of a multiply over the same tensor: on MovieLens-1M at length
200 it took a third of the LRU encoder's forward (torch.profiler, bfloat16). Here every 64-bit
draw of the generator gives the bits of four elements: an element is kept when its 16 bits, read
as an integer in ``[0, 65536)``, are at least ``round(p * 65536)``. So the dropout probability is
``p`` rounded to a multiple of 1/65536 (0.2 becomes 0.1999969...), and the kept values are scaled
by ``1 / (1 - that probability)``, which keeps every element's expectation exact.

The draws come from torch's default generator, so ``torch.manual_seed`` makes them repeatable.
On other devices (a GPU, where ``nn.Dropout`` draws its mask inside a fused kernel) this is
``torch.nn.functional.dropout``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Dropout", "dropout"]

_LEVELS = 1 << 16  # a 16-bit draw per element


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 <= p < 1:
        raise ValueError(f"dropout probability must lie in [0, 1), got {p!r}")
    return float(p)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Each element zeroed with probability ``p`` (to 1/65536), the rest scaled by ``1 / (1 - p)``."""
    return _dropout(x, _check_p(p), training)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """:func:`dropout` with ``p`` already checked (a module checks it once, when it is built)."""
    if not training or p == 0 or x.numel() == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    threshold = round(p * _LEVELS)
    if threshold == 0:
        return x
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # 64 random bits each
    keep = words.view(torch.int16)[:n].view(x.shape) >= threshold - _LEVELS // 2  # int16 is offset by 2^15
    return (x * keep).mul_(_LEVELS / (_LEVELS - threshold))


class Dropout(nn.Module):
    """Drop-in for ``nn.Dropout(p)`` (no parameters, active in training mode only), with the mask
    drawn as :func:`dropout` draws it."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = _check_p(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
