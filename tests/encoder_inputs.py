"""Inputs shared by the encoder tests: left-padded batches with garbage under the padding."""

from __future__ import annotations

import torch

LENGTHS = (4, 1, 9)  # real items per row: a short row, a single item, a full row


def left_padded(lengths=LENGTHS, length=9, width=16, seed=0):
    """Random item vectors ``(len(lengths), length, width)``, left-padded to ``length``, and the
    mask of real positions; the padded positions hold large garbage, which must never matter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), length, width, generator=g)
    mask = torch.arange(length) >= (length - torch.tensor(lengths))[:, None]
    x[~mask] = torch.randn(int((~mask).sum()), width, generator=g) * 100
    return x, mask
