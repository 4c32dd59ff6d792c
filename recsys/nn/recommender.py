"""The network that is trained, cut to a size, exported and served: items + sequence encoder.

``items`` is the item tower while training (``Z`` recomputed from features) and a
:class:`FixedItemMatrix` once exported (``Z[:, :s]`` precomputed); both are nested, so
``cut_to_size(recommender, s)`` gives the size-``s`` model either way.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.nn.nested import NestedModule

__all__ = ["SequentialRecommender"]


class SequentialRecommender(NestedModule):
    """User vector = encoder output at the last position of ``Dropout(Z[history])``."""

    def __init__(self, items: NestedModule, encoder: nn.Module, input_dropout: float = 0.0):
        super().__init__()
        self.sizes = items.sizes
        if tuple(getattr(encoder, "sizes", ())) != tuple(self.sizes):
            raise ValueError(f"encoder sizes {getattr(encoder, 'sizes', None)} differ from item sizes {list(self.sizes)}")
        self.items = items
        self.encoder = encoder
        self.input_dropout = nn.Dropout(input_dropout)

    def item_matrix(self) -> torch.Tensor:
        """``Z``: ``(num_items + 1, width)``, row 0 (padding) zero."""
        return self.items()

    def sequence_states(self, input_ids: torch.Tensor, item_matrix: torch.Tensor) -> torch.Tensor:
        """Encoder outputs ``(B, L, width)`` for left-padded item indices ``(B, L)`` (0 = padding)."""
        mask = input_ids > 0
        x = self.input_dropout(item_matrix[input_ids]) * mask.unsqueeze(-1)
        return self.encoder(x, mask)

    def user_vectors(self, input_ids: torch.Tensor, item_matrix: torch.Tensor | None = None) -> torch.Tensor:
        """One vector ``(B, width)`` per left-padded history: the state after its last item.

        An encoder with a ``final_state(x, mask)`` (the LRU) computes that state alone, without
        the other positions' outputs; the others run whole and keep the last position.
        """
        z = self.item_matrix() if item_matrix is None else item_matrix
        final_state = getattr(self.encoder, "final_state", None)
        if final_state is None:
            return self.sequence_states(input_ids, z)[:, -1]
        mask = input_ids > 0
        return final_state(self.input_dropout(z[input_ids]) * mask.unsqueeze(-1), mask)

    @property
    def cut_sizes(self) -> tuple[int, ...]:
        """Every size with a nested encoder; the full width only with one that is not (SASRec)."""
        return self.sizes if isinstance(self.encoder, NestedModule) else (self.width,)
