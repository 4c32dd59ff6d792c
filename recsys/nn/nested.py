"""Nested (prefix-closed) building blocks: the one place that knows about sizes and chunks.

A model has sizes ``S = (s_1 < ... < s_M = D)``. Chunk ``i`` is the slice ``[s_{i-1}, s_i)``.
A module ``f`` is *nested* when ``f(x)[..., :s_k]`` depends only on ``x[..., :s_k]`` and the module
with its parameters cut to ``s_k`` computes exactly that prefix. Stacking nested modules keeps the
property, so cutting every nested module of a model to ``s_k`` gives a genuinely smaller network.

Every nested module derives from :class:`NestedModule` and implements ``_shrink_(size)``, which
slices its *own* parameters in place. :func:`cut_to_size` copies a whole model and shrinks each
nested module in it; training, export and serving all use that one function, and
:func:`cut_sizes` says which sizes a model can be cut to (a module that holds a part that is not
nested, such as a SASRec encoder, narrows them to its full width). It also cuts elastic
sub-models (``recsys/nn/grid.py``): an encoder width apart from the vector size, and a depth.

Two ways to share the weights between the sizes (``nesting``):

- ``"blocks"`` (the default, above): block-lower-triangular layers and one LayerNorm per chunk, so
  one forward pass at the full width computes every size (its prefixes);
- ``"slices"`` (slimmable networks): every weight dense, and the size-``s`` network is the top-left
  ``s``-slice of every weight, with LayerNorms over its whole width. The full width is then exactly
  a dense network (its twin's architecture), but a size is no longer a prefix of the full width's
  outputs: each size runs its own forward (:class:`SizeSlices`). :func:`cut_to_size` is the same
  slicing either way.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from recsys.nn.grid import StackedBlocks

__all__ = [
    "check_sizes",
    "chunk_bounds",
    "chunk_widths",
    "prefix_scores",
    "chunk_scores",
    "NestedModule",
    "NestedLinear",
    "NestedLayerNorm",
    "PrefixProjection",
    "ChunkwiseProjection",
    "cut_sizes",
    "cut_to_size",
    "nested_parameter_count",
    "shrink_parameter_",
    "linear_with_input_gradient",
    "scale_prefix_gradient",
    "set_prefix_gradient",
    "NESTINGS",
    "check_nesting",
    "SizeSlices",
    "truncated_normal_init_",
]

M = TypeVar("M", bound=nn.Module)

#: how the sizes share weights: block-lower-triangular prefixes, or top-left slices of dense weights
NESTINGS = ("blocks", "slices")


def check_nesting(nesting: str) -> str:
    if nesting not in NESTINGS:
        raise ValueError(f"nesting must be one of {', '.join(NESTINGS)}, got {nesting!r}")
    return nesting


def check_sizes(sizes: Sequence[int], width: int | None = None) -> tuple[int, ...]:
    """Validate a list of sizes and return it as a tuple.

    Sizes must be positive, strictly increasing integers; when ``width`` is given the largest
    size must equal it (the model width).
    """
    sizes = tuple(sizes)
    if not sizes:
        raise ValueError("sizes must not be empty")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
            raise ValueError(f"sizes must be positive integers, got {s!r} in {list(sizes)}")
    for a, b in zip(sizes, sizes[1:]):
        if b <= a:
            raise ValueError(f"sizes must be strictly increasing, got {list(sizes)}")
    if width is not None and sizes[-1] != width:
        raise ValueError(f"the largest size must equal the model width {width}, got {list(sizes)}")
    return sizes


def chunk_bounds(sizes: Sequence[int], mult: int = 1) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of every chunk, with all bounds multiplied by ``mult``."""
    starts = (0, *sizes[:-1])
    return [(mult * a, mult * b) for a, b in zip(starts, sizes)]


def chunk_widths(sizes: Sequence[int], mult: int = 1) -> tuple[int, ...]:
    """The width of every chunk, ``s_m - s_{m-1}``, multiplied by ``mult`` (what ``split`` takes)."""
    return tuple(b - a for a, b in chunk_bounds(sizes, mult))


def prefix_scores(
    user: torch.Tensor,
    items: torch.Tensor,
    sizes: Sequence[int],
    *,
    inplace: bool = False,
    dtype: torch.dtype | None = None,
    mask: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """The scores at every size, smallest first: ``user[..., :s_m]`` against ``items[..., :s_m]``.

    The prefix-logit recurrence: the scores at size ``s_m`` are those at ``s_{m-1}`` plus chunk
    ``m``'s product, so all sizes together cost one full-width product. Shapes: ``user (P, D)`` with
    ``items (N, D)`` gives ``(P, N)``; ``user (B, D)`` with per-row candidates ``items (B, L, D)``
    gives ``(B, L)``. Products run in the inputs' dtype, the running sums in ``dtype`` (default
    the inputs'). ``inplace=True`` yields one buffer updated in place (read or copy each yield
    before the next); otherwise every size is a new tensor, and autograd can differentiate them.
    ``mask``, a boolean tensor broadcastable to the scores, sets those scores to ``-inf`` at every
    size: it is applied to the first chunk's product, and the sums keep ``-inf`` there (so does
    a ``-inf`` the caller writes into the in-place buffer).
    """
    batched = items.ndim == 3
    if batched and user.ndim == 2:
        user = user.unsqueeze(1)  # (B, 1, D): one query per candidate list
    total = None
    for a, b in chunk_bounds(sizes):
        u, z = user[..., a:b], items[..., a:b]
        if total is None:
            total = u @ z.transpose(-1, -2)
            if dtype is not None and total.dtype != dtype:
                total = total.to(dtype)
            if mask is not None:
                (total.squeeze(1) if batched else total).masked_fill_(mask, -math.inf)
        elif total.dtype != u.dtype:
            part = (u @ z.transpose(-1, -2)).to(total.dtype)
            total = total.add_(part) if inplace else total + part
        elif batched:
            total = total.baddbmm_(u, z.transpose(1, 2)) if inplace else torch.baddbmm(total, u, z.transpose(1, 2))
        else:
            total = total.addmm_(u, z.t()) if inplace else torch.addmm(total, u, z.t())
        yield total.squeeze(1) if batched else total


def chunk_scores(
    user: torch.Tensor, items: torch.Tensor, sizes: Sequence[int], *, dtype: torch.dtype | None = None
) -> Iterator[torch.Tensor]:
    """Every chunk's scores alone, smallest first: ``user[:, a:b]`` against ``items[:, a:b]`` for
    chunk ``(a, b)`` of ``sizes``. What sizes whose vectors lie side by side score (each size its
    own network, chunk ``m`` holding size ``m``'s vectors), where :func:`prefix_scores` sums the
    chunks up to each size. ``user (P, D)``, ``items (N, D)``: ``(P, N)`` each, in ``dtype``
    (default the inputs')."""
    for a, b in chunk_bounds(sizes):
        scores = user[:, a:b] @ items[:, a:b].t()
        yield scores if dtype is None else scores.to(dtype)


def sizes_up_to(sizes: Sequence[int], size: int) -> tuple[int, ...]:
    """The sizes of a model cut to ``size``; ``size`` must be one of ``sizes``."""
    if size not in sizes:
        raise ValueError(f"size {size} is not one of the model's sizes {list(sizes)}")
    return tuple(s for s in sizes if s <= size)


def shrink_parameter_(module: nn.Module, name: str, *slices: slice) -> None:
    """Replace parameter or buffer ``name`` of ``module`` by a contiguous copy of ``t[slices]``."""
    tensor = getattr(module, name)
    if tensor is None:
        return
    data = tensor.detach()[slices].clone().contiguous()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(data, requires_grad=tensor.requires_grad))
    else:
        persistent = name not in module._non_persistent_buffers_set
        delattr(module, name)
        module.register_buffer(name, data, persistent=persistent)


class NestedModule(nn.Module):
    """Base of every module whose parameters follow the sizes.

    Subclasses keep ``self.sizes`` and override :meth:`_shrink_` when they hold parameters of
    their own (children are shrunk by :func:`cut_to_size`, which visits every module).
    """

    sizes: tuple[int, ...]

    @property
    def width(self) -> int:
        return self.sizes[-1]

    @property
    def cut_sizes(self) -> tuple[int, ...]:
        """The sizes this module can be cut to: all of its sizes, unless it says otherwise."""
        return self.sizes

    def _shrink_(self, size: int) -> None:
        """Slice this module's own parameters to ``size``; containers have nothing to slice."""


def cut_sizes(model: nn.Module) -> tuple[int, ...]:
    """The sizes ``model`` can be cut to: those every nested module in it can be cut to.

    The full width is always among them (cutting to it is a plain copy).
    """
    nested = [m for m in model.modules() if isinstance(m, NestedModule)]
    if not nested:
        raise TypeError(f"{type(model).__name__} has no nested modules to cut")
    allowed = set(nested[0].cut_sizes)
    for module in nested[1:]:
        allowed &= set(module.cut_sizes)
    return tuple(sorted(allowed))


def cut_to_size(model: M, size: int, width: int | None = None, depth: int | None = None) -> M:
    """A copy of ``model`` cut to ``size``: every nested module keeps chunks up to ``size``.

    The copy is a smaller network (fewer parameters, fewer FLOPs) whose outputs equal the first
    ``size`` dimensions of the full model's outputs; cut to its full width it is a plain copy.

    Elastic sub-models (``recsys/nn/grid.py``): ``width`` (default ``size``) is the width the nested
    modules are cut to and ``size <= width`` the vector size; ``depth`` (default: all) keeps encoder
    blocks ``1..depth`` (every module with ``keep_blocks_``). A module with ``select_vector_`` (the
    recommender) is told the triple, and keeps the head that maps the ``width``-wide state to
    ``size`` dimensions (one is needed when ``size < width``).
    """
    width = size if width is None else width
    if size > width:
        raise ValueError(f"the vector size {size} may not exceed the width {width}")
    allowed = cut_sizes(model)
    if width not in allowed:
        sizes = next(m for m in model.modules() if isinstance(m, NestedModule)).sizes
        if width in sizes:
            raise ValueError(
                f"{type(model).__name__} can be cut to sizes {list(allowed)} only, not {width}: "
                "a part of it is not nested"
            )
        raise ValueError(f"size {width} is not one of the model's sizes {list(sizes)}")
    selectors = [m for m in model.modules() if hasattr(m, "select_vector_")]
    if size < width and not selectors:
        raise ValueError(f"{type(model).__name__} has no vector heads: its vector size is its width ({width}), not {size}")
    small = copy.deepcopy(model)
    for module in small.modules():
        if isinstance(module, NestedModule):
            module._shrink_(width)
            module.sizes = sizes_up_to(module.sizes, width)
    if depth is not None:
        stacks = [m for m in small.modules() if isinstance(m, StackedBlocks)]
        if not stacks:
            raise ValueError(f"{type(model).__name__} has no blocks to cut to depth {depth}")
        for module in stacks:
            module.keep_blocks_(depth)
    for module in small.modules():
        if hasattr(module, "select_vector_"):
            module.select_vector_(size)
    return small


def nested_parameter_count(model: nn.Module) -> int:
    """Parameters that the model really uses (masked-out blocks of nested linears excluded)."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, (NestedLinear, ChunkwiseProjection)) and name == "weight":
                total += int(module.mask.sum().item())
            else:
                total += p.numel()
    return total


def _passed_through(y: torch.Tensor) -> torch.Tensor:
    """Exact zeros that carry ``y``'s gradient: added to a value, they change nothing but its backward."""
    return y - y.detach()


def linear_with_input_gradient(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, input_gradient_weight: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, exactly, whose gradient to ``x`` goes through
    ``input_gradient_weight`` instead of ``weight`` (the weights' own gradients are unchanged).
    ``None``: the plain product."""
    if input_gradient_weight is None:
        return F.linear(x, weight, bias)
    return F.linear(x.detach(), weight, bias) + _passed_through(F.linear(x, input_gradient_weight.detach()))


def scale_prefix_gradient(x: torch.Tensor, start: int, factor: float) -> torch.Tensor:
    """``x`` unchanged, with the gradient to ``x[..., :start]`` multiplied by ``factor``: a size's
    loss reading the chunks of the smaller sizes (``prefix_gradient``)."""
    if factor == 1 or start == 0:
        return x
    head = x[..., :start]
    return torch.cat([head.detach() + factor * _passed_through(head), x[..., start:]], dim=-1)


def _own_blocks(out_bounds: Sequence[tuple[int, int]], in_bounds: Sequence[tuple[int, int]], shape) -> torch.Tensor:
    """0/1 mask of the blocks where an output chunk reads its own input chunk."""
    own = torch.zeros(shape)
    for (o0, o1), (i0, i1) in zip(out_bounds, in_bounds):
        own[o0:o1, i0:i1] = 1.0
    return own


class PrefixGradient:
    """Mixin of the nested products: ``prefix_gradient`` (1 unless :func:`set_prefix_gradient`
    says otherwise) multiplies the gradient that an output chunk sends back to the input chunks
    of the smaller sizes. Forward values never change; at 0 a chunk's weights learn only from
    its own size's loss and the larger sizes' losses reach them only through their own outputs."""

    prefix_gradient: float = 1.0

    def input_gradient_mask(self) -> torch.Tensor | None:
        """The weight's mask with the blocks that read earlier chunks scaled by ``prefix_gradient``:
        times the weight, what inputs take their gradient through (None: the weight itself)."""
        if self.prefix_gradient == 1 or not torch.is_grad_enabled():
            return None
        return self.own_mask + self.prefix_gradient * (self.mask - self.own_mask)

    def input_gradient_weight(self) -> torch.Tensor | None:
        mask = self.input_gradient_mask()
        return None if mask is None else self.weight * mask


def set_prefix_gradient(model: nn.Module, factor: float) -> None:
    """Set ``prefix_gradient`` on every nested product of ``model`` (1: plain backpropagation)."""
    if not 0 <= factor <= 1:
        raise ValueError(f"prefix_gradient must be in [0, 1], got {factor}")
    for module in model.modules():
        if isinstance(module, PrefixGradient):
            module.prefix_gradient = float(factor)


class NestedLinear(PrefixGradient, NestedModule):
    """Block-lower-triangular linear map between nested spaces.

    Input chunks are ``in_mult`` times the size chunks, output chunks ``out_mult`` times them
    (``out_mult=r`` gives the expanding form ``D -> r*D``). Output chunk ``i`` is
    ``W_i @ x[..., :in_mult*s_i] + b_i``: it reads only the input prefix up to its own size.

    The weight is stored as one dense matrix with a fixed 0/1 mask. ``mode`` picks how forward
    computes: ``"masked"`` (one dense product with the masked weight) or ``"blocks"`` (one product
    per output chunk over its input prefix, about 2/3 of the FLOPs for doubling sizes). Both give
    the same numbers; ``bench/nested_linear.py`` measures which is faster.

    ``nesting="slices"``: no mask (a dense layer); the size-``s`` layer is the weight's top-left
    slice. Each size's ring of weights (in its slice, outside the smaller size's) is initialised
    with the fan-in of its own slice, so every size starts as a dense layer of its width would.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        in_mult: int = 1,
        out_mult: int = 1,
        bias: bool = True,
        mode: str = "masked",
        nesting: str = "blocks",
    ) -> None:
        super().__init__()
        if mode not in ("masked", "blocks"):
            raise ValueError(f"mode must be 'masked' or 'blocks', got {mode!r}")
        self.sizes = check_sizes(sizes)
        self.nesting = check_nesting(nesting)
        self.in_mult, self.out_mult = in_mult, out_mult
        self.mode = "masked" if nesting == "slices" else mode
        d = self.sizes[-1]
        self.weight = nn.Parameter(torch.empty(out_mult * d, in_mult * d))
        self.bias = nn.Parameter(torch.zeros(out_mult * d)) if bias else None
        self.register_buffer("mask", self._make_mask(), persistent=False)
        self.register_buffer("own_mask", _own_blocks(
            chunk_bounds(self.sizes, out_mult), chunk_bounds(self.sizes, in_mult), self.mask.shape
        ), persistent=False)
        self.reset_parameters()

    def _make_mask(self) -> torch.Tensor:
        d = self.sizes[-1]
        if self.nesting == "slices":
            return torch.ones(self.out_mult * d, self.in_mult * d)
        mask = torch.zeros(self.out_mult * d, self.in_mult * d)
        for (o0, o1), (_, i1) in zip(
            chunk_bounds(self.sizes, self.out_mult), chunk_bounds(self.sizes, self.in_mult)
        ):
            mask[o0:o1, :i1] = 1.0
        return mask

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.nesting == "slices":  # each size's slice like nn.Linear of its width, smaller slices last
            for size in reversed(self.sizes):
                rows, cols = self.out_mult * size, self.in_mult * size
                bound = 1.0 / math.sqrt(cols)
                self.weight[:rows, :cols].uniform_(-bound, bound)
                if self.bias is not None:
                    self.bias[:rows].uniform_(-bound, bound)
            return
        # Each output chunk has its own fan-in (its input prefix); initialise it like nn.Linear.
        for (o0, o1), (_, i1) in zip(
            chunk_bounds(self.sizes, self.out_mult), chunk_bounds(self.sizes, self.in_mult)
        ):
            bound = 1.0 / math.sqrt(i1)
            self.weight[o0:o1].uniform_(-bound, bound)
            if self.bias is not None:
                self.bias[o0:o1].uniform_(-bound, bound)
        self.weight.mul_(self.mask)

    @property
    def in_features(self) -> int:
        return self.in_mult * self.sizes[-1]

    @property
    def out_features(self) -> int:
        return self.out_mult * self.sizes[-1]

    def masked_weight(self) -> torch.Tensor:
        """The weight with its masked-out blocks zeroed: the dense matrix the layer applies."""
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backward = self.input_gradient_weight()
        if self.mode == "masked" or backward is not None:
            return linear_with_input_gradient(x, self.masked_weight(), self.bias, backward)
        outs = []
        for (o0, o1), (_, i1) in zip(
            chunk_bounds(self.sizes, self.out_mult), chunk_bounds(self.sizes, self.in_mult)
        ):
            b = None if self.bias is None else self.bias[o0:o1]
            outs.append(F.linear(x[..., :i1], self.weight[o0:o1, :i1], b))
        return torch.cat(outs, dim=-1)

    def _shrink_(self, size: int) -> None:
        shrink_parameter_(self, "weight", slice(0, self.out_mult * size), slice(0, self.in_mult * size))
        shrink_parameter_(self, "bias", slice(0, self.out_mult * size))
        self.mask = self.mask[: self.out_mult * size, : self.in_mult * size].contiguous()
        self.own_mask = self.own_mask[: self.out_mult * size, : self.in_mult * size].contiguous()

    def extra_repr(self) -> str:
        return (
            f"sizes={list(self.sizes)}, in={self.in_features}, out={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode}, nesting={self.nesting}"
        )


class NestedLayerNorm(NestedModule):
    """One LayerNorm per chunk, each normalising only its own slice of ``mult`` times the chunk.

    A single LayerNorm over all dimensions would mix large chunks into small ones and break nesting.
    ``nesting="slices"`` is that single LayerNorm: the size-``s`` network normalises its whole width
    (the first ``s`` dimensions, with the first ``s`` weights), as a dense network of that width does.
    """

    def __init__(self, sizes: Sequence[int], mult: int = 1, eps: float = 1e-6, nesting: str = "blocks") -> None:
        super().__init__()
        self.sizes = check_sizes(sizes)
        self.nesting = check_nesting(nesting)
        self.mult, self.eps = mult, eps
        self.weight = nn.Parameter(torch.ones(mult * self.sizes[-1]))
        self.bias = nn.Parameter(torch.zeros(mult * self.sizes[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nesting == "slices":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        widths = chunk_widths(self.sizes, self.mult)
        parts = zip(x.split(widths, dim=-1), self.weight.split(widths), self.bias.split(widths))
        return torch.cat([F.layer_norm(p, (p.shape[-1],), w, b, self.eps) for p, w, b in parts], dim=-1)

    def _shrink_(self, size: int) -> None:
        shrink_parameter_(self, "weight", slice(0, self.mult * size))
        shrink_parameter_(self, "bias", slice(0, self.mult * size))

    def extra_repr(self) -> str:
        return f"sizes={list(self.sizes)}, mult={self.mult}, nesting={self.nesting}"


class PrefixProjection(NestedModule):
    """Projection of a fixed input (``R^F``) into the nested space: nested for free.

    ``z[..., :s] = P[:s] @ x``, so cutting keeps the first ``s`` output rows.
    """

    def __init__(self, in_features: int, sizes: Sequence[int], bias: bool = True) -> None:
        super().__init__()
        self.sizes = check_sizes(sizes)
        self.in_features = in_features
        linear = nn.Linear(in_features, self.sizes[-1], bias=bias)
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _shrink_(self, size: int) -> None:
        shrink_parameter_(self, "weight", slice(0, size))
        shrink_parameter_(self, "bias", slice(0, size))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, sizes={list(self.sizes)}"


class ChunkwiseProjection(PrefixGradient, NestedModule):
    """Per chunk, a linear map from the input prefix of that chunk to ``out_features`` numbers.

    Output ``i`` is ``W_i @ x[..., :in_mult*s_i]``: unlike :class:`NestedLinear` every chunk gets
    the same number of outputs (here the ``B``/``C`` vectors of a chunk's state). Stored as one
    dense ``(chunks*out_features, in_mult*D)`` weight with a fixed block mask, so it runs as one
    matrix product. Returns ``(..., chunks, out_features)``.
    """

    def __init__(self, sizes: Sequence[int], out_features: int, in_mult: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.sizes = check_sizes(sizes)
        self.out_features, self.in_mult = out_features, in_mult
        n_chunks = len(self.sizes)
        self.weight = nn.Parameter(torch.empty(n_chunks * out_features, in_mult * self.sizes[-1]))
        self.bias = nn.Parameter(torch.zeros(n_chunks * out_features)) if bias else None
        mask = torch.zeros_like(self.weight)
        for i, (_, end) in enumerate(chunk_bounds(self.sizes, in_mult)):
            mask[i * out_features : (i + 1) * out_features, :end] = 1.0
        self.register_buffer("mask", mask, persistent=False)
        rows = [(i * out_features, (i + 1) * out_features) for i in range(n_chunks)]
        self.register_buffer("own_mask", _own_blocks(rows, chunk_bounds(self.sizes, in_mult), mask.shape), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for i, (_, end) in enumerate(chunk_bounds(self.sizes, self.in_mult)):
            rows = slice(i * self.out_features, (i + 1) * self.out_features)
            bound = 1.0 / math.sqrt(end)  # fan-in of chunk i is its prefix
            self.weight[rows].uniform_(-bound, bound)
            if self.bias is not None:
                self.bias[rows].uniform_(-bound, bound)
        self.weight.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear_with_input_gradient(x, self.weight * self.mask, self.bias, self.input_gradient_weight())
        return out.unflatten(-1, (len(self.sizes), self.out_features))

    def _shrink_(self, size: int) -> None:
        rows = slice(0, (self.sizes.index(size) + 1) * self.out_features)
        shrink_parameter_(self, "weight", rows, slice(0, self.in_mult * size))
        shrink_parameter_(self, "bias", rows)
        self.mask = self.mask[rows, : self.in_mult * size].contiguous()
        self.own_mask = self.own_mask[rows, : self.in_mult * size].contiguous()

    def extra_repr(self) -> str:
        return f"sizes={list(self.sizes)}, in_mult={self.in_mult}, out_per_chunk={self.out_features}"


class _MethodCall(nn.Module):
    """``forward(method, *args)`` calls ``net.method(*args)``: ``torch.func.functional_call`` calls
    ``forward`` alone, and a recommender is used through several methods."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.net, method)(*args, **kwargs)


class SizeSlices:
    """The size-``s`` networks of a ``nesting="slices"`` model, computing with the model's own weights.

    :func:`cut_to_size` copies a size's slices, which is what evaluation and export need; training
    needs them as views of the model's tensors, so that every size's loss reaches the shared
    weights. ``network(model, s)`` returns a callable ``net(method, *args)`` that runs
    ``cut_to_size(model, s).method(*args)`` with every parameter and buffer read as the top-left
    slice of the model's own (``torch.func.functional_call`` over a structure-only cut, kept on
    the meta device, so it holds no memory).

    ``prefix_gradient`` multiplies the gradient that the size-``s`` network sends to the slice of
    the size below it (forward values unchanged): at 0, a size's loss trains only its own ring of
    every weight, and the smallest size learns exactly as a dense network of its width would.
    """

    def __init__(self, model: nn.Module, sizes: Sequence[int]) -> None:
        self.sizes = check_sizes(sizes)
        self._frames = {s: _MethodCall(cut_to_size(model, s)).to("meta") for s in self.sizes}
        self._shapes = {
            s: {name[len("net."):]: t.shape for name, t in (*frame.named_parameters(), *frame.named_buffers())}
            for s, frame in self._frames.items()
        }
        self._scales: dict[tuple, torch.Tensor] = {}

    def network(self, model: nn.Module, size: int, prefix_gradient: float = 1.0):
        """``net(method, *args)``: the size-``size`` network's ``method`` on the model's weights."""
        frame = self._frames[size]
        frame.train(model.training)  # dropout as in the model
        below = self.sizes.index(size) - 1
        scaled = prefix_gradient != 1 and below >= 0 and torch.is_grad_enabled()
        views = {}
        for name, tensor in (*model.named_parameters(), *model.named_buffers()):
            shape = self._shapes[size].get(name)
            if shape is None:  # a tensor the network of this size does not have
                continue
            view = tensor[tuple(slice(0, n) for n in shape)]
            if scaled and view.requires_grad:
                view = view.detach() + _passed_through(view) * self._scale(size, name, view, prefix_gradient)
            views[f"net.{name}"] = view
        return lambda method, *args, **kwargs: torch.func.functional_call(frame, views, (method, *args), kwargs)

    def _scale(self, size: int, name: str, view: torch.Tensor, factor: float) -> torch.Tensor:
        """Ones, with ``factor`` over the slice of the size below ``size``."""
        key = (size, name, factor, view.device, view.dtype)
        if key not in self._scales:
            below = self._shapes[self.sizes[self.sizes.index(size) - 1]][name]
            scale = torch.ones_like(view)
            scale[tuple(slice(0, n) for n in below)] = factor
            self._scales[key] = scale
        return self._scales[key]


@torch.no_grad()
def truncated_normal_init_(model: nn.Module, std: float) -> None:
    """Draw every weight matrix and embedding table of ``model`` anew from a normal of ``std``
    truncated at two ``std``: LRURec's initialisation, where PyTorch's default scales a linear
    layer's weights by its fan-in. Masked nested layers keep their masks (their blocks above the
    diagonal stay zero); biases, norms and per-channel parameters (the LRU's decays and skips,
    Mamba's state matrix and convolution) keep their own initialisation."""
    kinds = (nn.Linear, nn.Embedding, nn.EmbeddingBag, NestedLinear, PrefixProjection, ChunkwiseProjection)
    for module in model.modules():
        if isinstance(module, kinds) and isinstance(getattr(module, "weight", None), nn.Parameter):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            mask = getattr(module, "mask", None)
            if mask is not None:
                module.weight.mul_(mask)
