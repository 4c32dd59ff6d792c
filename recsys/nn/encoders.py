"""Builds a sequence encoder by name, so configs and exports can say ``encoder: lru|mamba|sasrec``.

All encoders share one interface: ``forward(x (B, L, D), mask (B, L)) -> (B, L, D)`` over
left-padded sequences, a ``sizes`` attribute, and (for the nested ones) :func:`cut_to_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

ENCODERS = ("lru", "mamba", "sasrec")


def build_encoder(name: str, sizes: Sequence[int], **options: Any) -> nn.Module:
    """The encoder called ``name``; ``options`` are its constructor's keyword arguments."""
    if name == "lru":
        from recsys.nn.lru import NestedLRUEncoder as cls
    elif name == "mamba":
        from recsys.nn.mamba import NestedMambaEncoder as cls
    elif name == "sasrec":
        from recsys.nn.sasrec import SASRecEncoder as cls
    else:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return cls(sizes, **options)
