"""The network that is trained, cut to a size, exported and served: items + sequence encoder.

``items`` is the item tower while training (``Z`` recomputed from features) and a
:class:`FixedItemMatrix` once exported (``Z[:, :s]`` precomputed); both are nested, so
``cut_to_size(recommender, s)`` gives the size-``s`` model either way.

With a ``grid`` of (depth, width, size) triples (``recsys/nn/grid.py``) it also holds the vector
heads of the triples whose size is below their width; ``cut_to_size(recommender, s, width=w,
depth=d)`` keeps the one head of that triple, and the cut model's user vectors are ``s``-dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recsys.nn.dropout import Dropout
from recsys.nn.grid import StackedBlocks, Triple, VectorGroup, VectorHeads, head_key
from recsys.nn.nested import NestedModule

__all__ = ["SequentialRecommender"]


class SequentialRecommender(NestedModule):
    """User vector = encoder output at the last position of ``Dropout(Z[history])``.

    ``grid``: the trained triples (None: no grid, no heads). ``vector_size`` is the size of the
    vectors :meth:`user_vectors` returns: the width, unless the model was cut to a smaller size.
    """

    def __init__(
        self,
        items: NestedModule,
        encoder: nn.Module,
        input_dropout: float = 0.0,
        grid: Sequence[Triple] | None = None,
    ):
        super().__init__()
        self.sizes = items.sizes
        if tuple(getattr(encoder, "sizes", ())) != tuple(self.sizes):
            raise ValueError(f"encoder sizes {getattr(encoder, 'sizes', None)} differ from item sizes {list(self.sizes)}")
        self.items = items
        self.encoder = encoder
        self.input_dropout = Dropout(input_dropout)
        self.grid = None if grid is None else tuple(grid)
        if self.grid is not None and any(t.uses_head for t in self.grid):
            self.heads = VectorHeads(self.grid)
        self.vector_size = self.sizes[-1]
        self._head: str | None = None  # the head a cut model serves through

    def item_matrix(self) -> torch.Tensor:
        """``Z``: ``(num_items + 1, width)``, row 0 (padding) zero."""
        return self.items()

    def sequence_states(self, input_ids: torch.Tensor, item_matrix: torch.Tensor) -> torch.Tensor:
        """Encoder outputs ``(B, L, width)`` for left-padded item indices ``(B, L)`` (0 = padding)."""
        mask = input_ids > 0
        x = self.input_dropout(item_matrix[input_ids]) * mask.unsqueeze(-1)
        return self.encoder(x, mask)

    def depth_states(self, input_ids: torch.Tensor, item_matrix: torch.Tensor, depths: Sequence[int]) -> dict[int, torch.Tensor]:
        """``{d: (B, L, width)}``: the encoder's state after block ``d`` (final norm applied), one pass."""
        if not isinstance(self.encoder, StackedBlocks):
            raise TypeError(f"{type(self.encoder).__name__} has no blocks to read states at depths from")
        mask = input_ids > 0
        x = self.input_dropout(item_matrix[input_ids]) * mask.unsqueeze(-1)
        return self.encoder.depth_states(x, mask, depths)

    def group_vectors(self, group: VectorGroup, state: torch.Tensor) -> torch.Tensor:
        """The tensor whose prefixes are ``group``'s vectors, from the state at its depth."""
        if group.head is None:
            return state[..., : group.sizes[-1]]
        return self.heads(group.head, state)[..., : group.sizes[-1]]

    def user_vectors(self, input_ids: torch.Tensor, item_matrix: torch.Tensor | None = None) -> torch.Tensor:
        """One vector ``(B, vector_size)`` per left-padded history: the state after its last item
        (through the kept head in a model cut to a size below its width).

        An encoder with a ``final_state(x, mask)`` (the LRU) computes that state alone, without
        the other positions' outputs; the others run whole and keep the last position.
        """
        z = self.item_matrix() if item_matrix is None else item_matrix
        final_state = getattr(self.encoder, "final_state", None)
        if final_state is None:
            state = self.sequence_states(input_ids, z)[:, -1]
        else:
            mask = input_ids > 0
            state = final_state(self.input_dropout(z[input_ids]) * mask.unsqueeze(-1), mask)
        if self._head is not None:
            return self.heads(self._head, state)
        return state

    def select_vector_(self, size: int) -> None:
        """After :func:`~recsys.nn.nested.cut_to_size`: serve ``size``-dim vectors, keeping the one
        head of this depth and width when ``size`` is below the width (and no head otherwise)."""
        width = self.sizes[-1]
        key = None
        if size < width:
            depth = self.encoder.depth if isinstance(self.encoder, StackedBlocks) else None
            key = head_key(depth, width)
            if self.grid is None or not hasattr(self, "heads") or key not in self.heads.heads:
                trained = [t.label for t in self.grid or () if t.uses_head]
                raise ValueError(
                    f"no vector head was trained for depth {depth}, width {width} (size {size} < width); "
                    f"triples trained with a head: {trained or 'none'}"
                )
        if hasattr(self, "heads"):
            self.heads.keep_(key, size)
            if key is None:
                del self.heads
        self.grid = None if key is None else (Triple(self.encoder.depth, width, size),)
        self._head, self.vector_size = key, size

    @property
    def cut_sizes(self) -> tuple[int, ...]:
        """Every size with a nested encoder; the full width only with one that is not (SASRec)."""
        return self.sizes if isinstance(self.encoder, NestedModule) else (self.width,)
