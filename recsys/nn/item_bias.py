"""A per-item output bias as one more dimension of the scored vectors.

A score with a bias of its own per item, ``u . e_i + b_i``, is the inner product of ``[u, 1]`` and
``[e_i, b_i]``. Written that way, every scorer of inner products (the memory-flat loss, the ranking
metrics, a faiss index, the funnel's re-ranking) scores with the bias unchanged; the bias is the
last column of the item vectors and the user vectors end in a one.
"""

from __future__ import annotations

import torch

__all__ = ["with_bias_column", "with_ones_column"]


def with_bias_column(items: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``(N, s)`` item vectors and their ``(N,)`` biases as ``(N, s + 1)``, the bias last."""
    if bias.shape != items.shape[:1]:
        raise ValueError(f"one bias per item vector: {tuple(items.shape)} vectors, {tuple(bias.shape)} biases")
    return torch.cat([items, bias.to(items.dtype).unsqueeze(1)], dim=1)


def with_ones_column(users: torch.Tensor) -> torch.Tensor:
    """``(B, s)`` user vectors as ``(B, s + 1)``, ending in a one: their inner product with
    :func:`with_bias_column`'s vectors is the score plus the item's bias."""
    return torch.cat([users, users.new_ones(*users.shape[:-1], 1)], dim=-1)
