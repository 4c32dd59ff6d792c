"""Nested Mamba encoder (docs/method.md §3, beyond the paper).

A Mamba block projects the input into an expanded branch ``x`` and a gate ``z``, runs a causal
depth-wise convolution and SiLU over ``x``, then a selective scan whose step ``dt``, input map
``B_t`` and read-out ``C_t`` depend on the input, and returns ``out_proj(y * SiLU(z))``.

What makes it nested (the size-``s`` prefix of the output depends only on the size-``s`` prefix of
the input, and cutting the parameters to ``s`` computes exactly that prefix):

- the in/out projections are expanding nested linears, so expanded chunk ``i`` is the slice
  ``[expand*s_{i-1}, expand*s_i)``;
- the convolution, SiLU, gate, skip ``D`` and the recurrence itself act channel by channel;
- ``dt`` comes from a nested linear over the expanded channels (full rank, no low-rank bottleneck
  that would mix all channels);
- vanilla Mamba computes one ``B_t, C_t`` from *all* channels and shares it; here every chunk ``i``
  has its own ``B_t^(i), C_t^(i)`` computed from ``x_t[:expand*s_i]`` and used by its channels only.

The scan gets ``B``/``C`` in ``mamba_ssm``'s grouped layout ``(batch, groups, N, L)`` with groups as
wide as the smallest chunk, each chunk's ``B``/``C`` repeated over the groups it covers; so every
chunk must be a whole number of smallest chunks (checked when the encoder is built).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from recsys.nn.dropout import Dropout
from recsys.nn.grid import StackedBlocks
from recsys.nn.nested import (
    ChunkwiseProjection,
    NestedLayerNorm,
    NestedLinear,
    NestedModule,
    check_sizes,
    chunk_widths,
    shrink_parameter_,
)
from recsys.nn.selective_scan import causal_depthwise_conv1d, dispatch_selective_scan

__all__ = ["check_group_sizes", "NestedMambaMixer", "NestedMambaBlock", "NestedMambaEncoder"]


def check_group_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    """How many smallest chunks each chunk spans; raises if a chunk is not a whole number of them."""
    sizes = check_sizes(sizes)
    smallest = sizes[0]
    widths = chunk_widths(sizes)
    bad = [w for w in widths if w % smallest]
    if bad:
        raise ValueError(
            f"nested Mamba needs every chunk width to be a multiple of the smallest size {smallest} (its B/C "
            f"groups are that wide), but sizes {list(sizes)} give chunk widths {list(widths)}; use e.g. doubling sizes"
        )
    return tuple(w // smallest for w in widths)


class NestedMambaMixer(NestedModule):
    """The Mamba mixer over nested channels; padded positions (``mask`` False) contribute nothing.

    Padding is handled by zeroing the ``x`` branch at padded positions twice: before the
    convolution (so a real position's window sees zeros there, exactly as at the start of an
    unpadded sequence) and after it (so the scan's input is zero there and its state stays zero
    until the first real item, whatever the convolution's bias makes of the zeros).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        use_kernels: bool | None = None,
    ) -> None:
        super().__init__()
        self.sizes = check_sizes(sizes)
        spans = torch.tensor(check_group_sizes(self.sizes))
        if d_state < 1 or d_conv < 1 or expand < 1:
            raise ValueError(f"d_state, d_conv and expand must be positive, got {d_state}, {d_conv}, {expand}")
        self.d_state, self.d_conv, self.expand, self.use_kernels = d_state, d_conv, expand, use_kernels
        inner = expand * self.sizes[-1]
        # The scan's B/C groups are as wide as the smallest chunk; group j reads chunk_of_group[j]'s.
        self.register_buffer("chunk_of_group", torch.arange(len(self.sizes)).repeat_interleave(spans), persistent=False)

        self.in_x = NestedLinear(self.sizes, out_mult=expand, bias=False)
        self.in_z = NestedLinear(self.sizes, out_mult=expand, bias=False)
        # Depth-wise causal convolution, one filter per channel (init as nn.Conv1d: fan-in d_conv).
        bound = 1.0 / math.sqrt(d_conv)
        self.conv_weight = nn.Parameter(torch.empty(inner, d_conv).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.empty(inner).uniform_(-bound, bound))
        self.dt_proj = NestedLinear(self.sizes, in_mult=expand, out_mult=expand, bias=False)
        self.bc_proj = ChunkwiseProjection(self.sizes, 2 * d_state, in_mult=expand)
        # dt = softplus(dt_proj(x) + dt_bias) starts log-uniform in [dt_min, dt_max] (as in Mamba).
        dt = torch.exp(torch.empty(inner).uniform_(math.log(dt_min), math.log(dt_max))).clamp_min(1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        # A = -exp(A_log) = -(1, 2, ..., N) for every channel (S4D-real initialisation).
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = NestedLinear(self.sizes, in_mult=expand, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        u = self.in_x(x) * keep  # (B, L, E)
        z = self.in_z(x)
        u = causal_depthwise_conv1d(
            u.transpose(1, 2), self.conv_weight, self.conv_bias, silu=True, use_kernels=self.use_kernels
        )  # (B, E, L)
        u = u * keep.transpose(1, 2)
        u_last = u.transpose(1, 2)  # (B, L, E) view for the projections
        delta = self.dt_proj(u_last).transpose(1, 2)
        bc = self.bc_proj(u_last)  # (B, L, chunks, 2N)
        # Chunk i's B/C, repeated over the groups (smallest-chunk widths) it spans: (B, groups, 2N, L).
        bc = bc.permute(0, 2, 3, 1).index_select(1, self.chunk_of_group)
        B, C = bc.split(self.d_state, dim=2)
        y = dispatch_selective_scan(
            u,
            delta,
            -torch.exp(self.A_log),
            B,
            C,
            self.D,
            z=z.transpose(1, 2),
            delta_bias=self.dt_bias,
            delta_softplus=True,
            use_kernels=self.use_kernels,
        )
        return self.out_proj(y.transpose(1, 2))

    def _shrink_(self, size: int) -> None:
        channels = slice(0, self.expand * size)
        for name in ("conv_weight", "conv_bias", "dt_bias", "A_log", "D"):
            shrink_parameter_(self, name, channels)
        self.chunk_of_group = self.chunk_of_group[: size // self.sizes[0]].contiguous()

    def extra_repr(self) -> str:
        return f"sizes={list(self.sizes)}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}"


class NestedMambaBlock(NestedModule):
    """Pre-norm residual block ``h = x + Dropout(Mixer(NestedLN(x)))``."""

    def __init__(self, sizes: Sequence[int], dropout: float, **mixer_options) -> None:
        super().__init__()
        self.sizes = check_sizes(sizes)
        self.norm = NestedLayerNorm(self.sizes)
        self.mixer = NestedMambaMixer(self.sizes, **mixer_options)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.mixer(self.norm(x), mask))

    def _shrink_(self, size: int) -> None:
        """No parameters of its own; its norm and mixer are cut by :func:`cut_to_size`."""


class NestedMambaEncoder(StackedBlocks, NestedModule):
    """Stack of nested Mamba blocks and a final nested LayerNorm.

    ``forward(x, mask)`` takes left-padded item vectors ``(B, L, D)`` and ``mask`` ``(B, L)`` (True
    for real items) and returns ``(B, L, D)``; the user state is the output at the last position.
    ``use_kernels``: None uses ``mamba_ssm``'s kernels when the input is on a GPU and they import,
    True demands them, False always runs the PyTorch scan.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        n_blocks: int = 2,
        dropout: float = 0.1,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        use_kernels: bool | None = None,
    ) -> None:
        super().__init__()
        self.sizes = check_sizes(sizes)
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be at least 1, got {n_blocks}")
        self.blocks = nn.ModuleList(
            NestedMambaBlock(
                self.sizes, dropout, d_state=d_state, d_conv=d_conv, expand=expand, use_kernels=use_kernels
            )
            for _ in range(n_blocks)
        )
        self.final_norm = NestedLayerNorm(self.sizes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)

    def _shrink_(self, size: int) -> None:
        """No parameters of its own; the blocks and the final norm are cut by :func:`cut_to_size`."""
