"""SASRec (Kang & McAuley, 2018): the causal self-attention baseline (docs/method.md §3).

Not nested: attention mixes all dimensions, so a prefix of its output is not a smaller SASRec.
It still carries ``sizes`` so the model can score and report each size by the prefix of the full
output, which is how a non-nested encoder is compared in a Matryoshka run. :func:`cut_to_size`
refuses it (it has no nested modules), and so does the size-specific export.

Inputs are left-padded. Positions are counted back from the end of the row, so the last position
(the one that gives the user state) always gets the same positional embedding and a sequence's
outputs do not depend on how much padding precedes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recsys.nn.dropout import Dropout, dropout
from recsys.nn.grid import StackedBlocks
from recsys.nn.nested import check_sizes

__all__ = ["CausalSelfAttention", "SASRecBlock", "SASRecEncoder"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position ``t`` attends to real positions ``<= t``.

    Every position may also attend to itself, real or not: a padded query would otherwise have
    nothing to attend to and softmax over an empty set gives NaN. Real queries never see padded
    keys, so this changes nothing at real positions.
    """

    def __init__(self, width: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if width % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide the width {width}")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        allowed = (causal & mask[:, None, :]) | torch.eye(length, dtype=torch.bool, device=x.device)
        if self.training and self.dropout > 0 and x.device.type == "cpu":
            # PyTorch's fused CPU attention takes no dropout, and its fallback draws the attention
            # dropout with bernoulli_: the same product written out, with our cheaper mask
            scores = (q @ k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5).masked_fill_(~allowed[:, None], -torch.inf)
            attended = dropout(torch.softmax(scores, dim=-1), self.dropout) @ v
        else:
            attended = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed[:, None], dropout_p=self.dropout if self.training else 0.0
            )
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class SASRecBlock(nn.Module):
    """Pre-norm block: ``h = x + Dropout(Attn(LN(x)))``, ``out = h + Dropout(FFN(LN(h)))``."""

    def __init__(self, width: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, n_heads, dropout)
        self.norm_ffn = nn.LayerNorm(width)
        # Point-wise feed-forward, as SASRec's two kernel-1 convolutions.
        self.ffn = nn.Sequential(nn.Linear(width, width), nn.GELU(), Dropout(dropout), nn.Linear(width, width))
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x + self.dropout(self.attn(self.norm_attn(x), mask))
        return h + self.dropout(self.ffn(self.norm_ffn(h)))


class SASRecEncoder(StackedBlocks, nn.Module):
    """SASRec over left-padded sequences, with the shared encoder interface.

    ``forward(x, mask)``: ``x`` ``(B, L, D)`` item vectors, ``mask`` ``(B, L)`` True for real items;
    returns ``(B, L, D)``, the user state being the output at the last position. ``L`` may not
    exceed ``max_len`` (the number of learned positions).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        n_blocks: int = 2,
        n_heads: int = 2,
        dropout: float = 0.2,
        max_len: int = 200,
    ) -> None:
        super().__init__()
        self.sizes = check_sizes(sizes)
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be at least 1, got {n_blocks}")
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        width = self.sizes[-1]
        self.max_len = max_len
        self.positions = nn.Embedding(max_len, width)  # index 0 = the last position of a row
        nn.init.normal_(self.positions.weight, std=0.02)
        self.input_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(width, n_heads, dropout) for _ in range(n_blocks))
        self.final_norm = nn.LayerNorm(width)

    @property
    def width(self) -> int:
        return self.sizes[-1]

    def _embed(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Item vectors plus positions (counted from the end), padding zeroed, input dropout."""
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds SASRec's max_len {self.max_len}")
        from_end = torch.arange(length - 1, -1, -1, device=x.device)
        keep = mask.unsqueeze(-1).to(x.dtype)
        return self.input_dropout((x + self.positions(from_end)) * keep)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self._embed(x, mask)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)
