"""Nested Linear Recurrent Unit encoder (the fMRLRec / LRURec sequence model, docs/method.md §3).

Each channel carries one complex state with a learned, time-invariant decay ``lambda``:

    h_t = lambda * h_{t-1} + gamma * (B x_t),      y_t = Re(C h_t) + d * x_t

The recurrence is diagonal, so it is nested as it is; ``B`` and ``C`` are nested linears (real and
imaginary parts separately), so the whole layer is nested.

How the recurrence runs is picked by device, with equal results (tests/test_lru.py): on CPU step
by step (:func:`linear_recurrence_steps`: one fused multiply-add per position, its backward the
same recurrence run backwards, so every state is read and written once), on a GPU as a log-depth
parallel scan (:func:`linear_recurrence_scan`, where ``L`` small steps would each cost a launch).
:func:`linear_recurrence_loop` is the plain reference both are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recsys.nn.dropout import Dropout
from recsys.nn.grid import StackedBlocks
from recsys.nn.nested import (
    NestedLayerNorm,
    NestedLinear,
    NestedModule,
    check_sizes,
    linear_with_input_gradient,
    shrink_parameter_,
)

__all__ = [
    "linear_recurrence_scan",
    "linear_recurrence_steps",
    "linear_recurrence_last",
    "linear_recurrence_loop",
    "LRULayer",
    "FeedForward",
    "NestedLRUEncoder",
]


def linear_recurrence_scan(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """All states of ``h_t = decay * h_{t-1} + inputs_t`` (``h_{-1} = 0``) in ``ceil(log2 L)`` steps.

    ``decay``: ``(D,)``, ``inputs``: ``(B, L, D)`` (real or complex). Hillis-Steele doubling: after
    step ``k`` every position holds the sum over its last ``2^(k+1)`` inputs, weighted by powers of
    the decay. Because the decay is time-invariant, its power at step ``k`` is one vector.
    """
    states = inputs
    power = decay
    length = inputs.shape[1]
    shift = 1
    while shift < length:
        earlier = torch.cat([torch.zeros_like(states[:, :shift]), states[:, :-shift]], dim=1)
        states = states + power * earlier
        power = power * power
        shift *= 2
    return states


def _run_recurrence(decay: torch.Tensor, inputs: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """``h_t = decay * h_{t-1} + inputs_t`` over dim 1 (from the end with ``reverse``), each step
    one ``addcmul`` written straight into its slice of the result."""
    states = torch.empty_like(inputs)
    length = inputs.shape[1]
    order = range(length - 1, -1, -1) if reverse else range(length)
    state = None
    for t in order:
        state = states[:, t].copy_(inputs[:, t]) if state is None else torch.addcmul(inputs[:, t], decay, state, out=states[:, t])
    return states


class _LinearRecurrence(torch.autograd.Function):
    """Autograd of the step-by-step recurrence, written out: with ``a_t`` the gradient reaching
    ``h_t`` (its own plus what flows back from ``h_{t+1}``), ``a_t = g_t + conj(lambda) a_{t+1}``
    is the same recurrence run backwards; ``inputs_t`` gets ``a_t`` and ``lambda`` gets
    ``sum_t conj(h_{t-1}) a_t`` (PyTorch's convention for complex gradients)."""

    @staticmethod
    def forward(ctx, decay, inputs):  # noqa: D102
        states = _run_recurrence(decay, inputs)
        ctx.save_for_backward(decay, states)
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        decay, states = ctx.saved_tensors
        grad_inputs = _run_recurrence(decay.conj().resolve_conj(), grad.contiguous(), reverse=True)
        grad_decay = None
        if ctx.needs_input_grad[0]:
            grad_decay = (states[:, :-1].conj() * grad_inputs[:, 1:]).sum(dim=(0, 1))
            if not decay.is_complex():
                grad_decay = grad_decay.real
        return grad_decay, grad_inputs


def linear_recurrence_steps(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The states of :func:`linear_recurrence_scan`, computed step by step (the CPU's choice).

    ``L`` fused multiply-adds over ``(B, D)``, each state read and written once (the scan reads and
    writes all of them ``log2 L`` times), and a backward that is the same loop run backwards, so
    autograd keeps no graph per step: about 10x the scan's speed on CPU at length 200.
    """
    if inputs.shape[1] == 0:
        return inputs.clone()
    return _LinearRecurrence.apply(decay, inputs)


def linear_recurrence_last(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The last state alone, ``h_{L-1} = sum_t decay^(L-1-t) * inputs_t``, as ``(B, 1, D)``.

    One weighted sum (the decay's powers taken in polar form), all a serving pass needs of the
    last layer: cheaper than any scan of every state.
    """
    steps = torch.arange(inputs.shape[1] - 1, -1, -1, device=inputs.device, dtype=decay.abs().dtype).unsqueeze(1)
    powers = torch.polar(decay.abs().unsqueeze(0) ** steps, decay.angle().unsqueeze(0) * steps)
    return (inputs * powers).sum(dim=1, keepdim=True)


def linear_recurrence_loop(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Reference: the same recurrence one step at a time, as plainly as it can be written."""
    state = torch.zeros_like(inputs[:, 0])
    states = []
    for t in range(inputs.shape[1]):
        state = decay * state + inputs[:, t]
        states.append(state)
    return torch.stack(states, dim=1)


class LRULayer(NestedModule):
    """One LRU layer over nested channels; padded positions (``mask`` False) contribute nothing."""

    def __init__(self, sizes: Sequence[int], r_min: float = 0.0, r_max: float = 0.1, max_phase: float = 2 * math.pi,
                 nesting: str = "blocks"):
        super().__init__()
        self.sizes = check_sizes(sizes)
        if not 0.0 <= r_min < r_max <= 1.0:
            raise ValueError(f"need 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
        d = self.sizes[-1]
        # |lambda| uniform on the ring r_min..r_max (by area, as in the LRU paper), phase in [0, max_phase).
        radius_sq = torch.empty(d).uniform_(r_min**2, r_max**2).clamp_min(1e-8)
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(radius_sq)))
        self.theta_log = nn.Parameter(torch.log(torch.empty(d).uniform_(1e-3, max_phase)))
        self.gamma_log = nn.Parameter(0.5 * torch.log1p(-radius_sq))  # log sqrt(1 - |lambda|^2)
        self.b_re, self.b_im, self.c_re, self.c_im = (NestedLinear(self.sizes, bias=False, nesting=nesting) for _ in range(4))
        self.skip = nn.Parameter(torch.randn(d) * 0.1)

    def decay(self) -> torch.Tensor:
        """Complex ``lambda = exp(-exp(nu) + i exp(theta))`` per channel."""
        return torch.polar(torch.exp(-torch.exp(self.nu_log)), torch.exp(self.theta_log))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, sequential: bool | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """``(B, L, D)`` outputs; with ``last_only`` the last position's alone, ``(B, 1, D)``.

        ``sequential``: run the recurrence step by step (default on CPU) or as the parallel scan
        (default on a GPU); both give the same states.

        ``B`` and ``C`` each run as one product. ``B``'s real and imaginary rows are interleaved
        (and scaled by ``gamma``), so its output, read as ``(re, im)`` pairs, is the complex drive
        without a copy; ``C`` reads the states' ``(re, im)`` pairs through ``[C_re, -C_im]``
        interleaved the same way, which is ``Re(C h)``.
        """
        x = x * mask.unsqueeze(-1).to(x.dtype)
        gamma = torch.exp(self.gamma_log).repeat_interleave(2).unsqueeze(1)
        w_in = torch.stack([self.b_re.masked_weight(), self.b_im.masked_weight()], dim=1).flatten(0, 1) * gamma
        drive = torch.view_as_complex(
            linear_with_input_gradient(x, w_in, None, self._input_gradient_of("b", w_in)).float().unflatten(-1, (-1, 2))
        )
        if last_only:
            states, x = linear_recurrence_last(self.decay(), drive), x[:, -1:]
        else:
            if sequential is None:
                sequential = x.device.type == "cpu"
            recurrence = linear_recurrence_steps if sequential else linear_recurrence_scan
            states = recurrence(self.decay(), drive)
        w_out = torch.stack([self.c_re.masked_weight(), -self.c_im.masked_weight()], dim=2).flatten(1)
        states = torch.view_as_real(states).flatten(-2)
        return linear_with_input_gradient(states, w_out, None, self._input_gradient_of("c", w_out)) + self.skip * x

    def _input_gradient_of(self, which: str, weight: torch.Tensor) -> torch.Tensor | None:
        """``B``'s or ``C``'s interleaved weight with the blocks that read earlier chunks scaled
        (``prefix_gradient``), laid out like ``weight``; None when the gradient is plain."""
        mask = (self.b_re if which == "b" else self.c_re).input_gradient_mask()
        if mask is None:
            return None
        # B: rows (re, im) interleaved per channel; C: columns
        return weight * mask.repeat_interleave(2, dim=0 if which == "b" else 1)

    def _shrink_(self, size: int) -> None:
        for name in ("nu_log", "theta_log", "gamma_log", "skip"):
            shrink_parameter_(self, name, slice(0, size))


#: the feed-forward layers of an LRU block (:class:`FeedForward`)
FFN_KINDS = ("gated", "gelu")


class FeedForward(NestedModule):
    """Feed-forward layer with nested linears expanding by ``mult``: ``gated``,
    ``W2(SiLU(G x) * W1 x)``, or ``gelu``, ``W2(GELU(W1 x))`` (LRURec's, at ``mult`` 4)."""

    def __init__(self, sizes: Sequence[int], mult: int = 2, dropout: float = 0.1, nesting: str = "blocks",
                 kind: str = "gated"):
        super().__init__()
        if kind not in FFN_KINDS:
            raise ValueError(f"unknown feed-forward layer {kind!r}; choose one of {', '.join(FFN_KINDS)}")
        self.sizes = check_sizes(sizes)
        self.gate = NestedLinear(self.sizes, out_mult=mult, nesting=nesting) if kind == "gated" else None
        self.up = NestedLinear(self.sizes, out_mult=mult, nesting=nesting)
        self.down = NestedLinear(self.sizes, in_mult=mult, nesting=nesting)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.up(x)) if self.gate is None else F.silu(self.gate(x)) * self.up(x)
        return self.down(self.dropout(hidden))


class LRUBlock(NestedModule):
    """Residual block, pre-norm: ``h = x + LRU(LN1(x))``, ``out = h + FFN(LN2(h))``; or with
    ``post_norm`` (LRURec's): ``h = LN1(x + LRU(x))``, ``out = LN2(h + FFN(h))``. ``ffn`` is the
    feed-forward layer's kind (:class:`FeedForward`), ``ffn_mult`` its expansion."""

    def __init__(self, sizes: Sequence[int], dropout: float, r_min: float, r_max: float, ffn_mult: int,
                 nesting: str = "blocks", post_norm: bool = False, ffn: str = "gated"):
        super().__init__()
        self.sizes = check_sizes(sizes)
        self.post_norm = post_norm
        self.norm_lru = NestedLayerNorm(self.sizes, nesting=nesting)
        self.lru = LRULayer(self.sizes, r_min=r_min, r_max=r_max, nesting=nesting)
        self.norm_ffn = NestedLayerNorm(self.sizes, nesting=nesting)
        self.ffn = FeedForward(self.sizes, mult=ffn_mult, dropout=dropout, nesting=nesting, kind=ffn)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, sequential: bool | None = None, last_only: bool = False) -> torch.Tensor:
        residual = x[:, -1:] if last_only else x
        if self.post_norm:
            h = self.norm_lru(residual + self.dropout(self.lru(x, mask, sequential=sequential, last_only=last_only)))
            return self.norm_ffn(h + self.dropout(self.ffn(h)))
        h = residual + self.dropout(self.lru(self.norm_lru(x), mask, sequential=sequential, last_only=last_only))
        return h + self.dropout(self.ffn(self.norm_ffn(h)))


class NestedLRUEncoder(StackedBlocks, NestedModule):
    """Stack of nested LRU blocks and a final nested LayerNorm.

    ``forward(x, mask)`` takes left-padded item vectors ``(B, L, D)`` and ``mask`` ``(B, L)`` (True
    for real items) and returns ``(B, L, D)``; the user state is the output at the last position.
    ``depth_states`` and the depth cut come from :class:`~recsys.nn.grid.StackedBlocks`.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        n_blocks: int = 2,
        dropout: float = 0.1,
        r_min: float = 0.0,
        r_max: float = 0.1,
        ffn_mult: int = 2,
        nesting: str = "blocks",
        post_norm: bool = False,
        ffn: str = "gated",
    ):
        super().__init__()
        self.sizes = check_sizes(sizes)
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be at least 1, got {n_blocks}")
        self.blocks = nn.ModuleList(
            LRUBlock(self.sizes, dropout=dropout, r_min=r_min, r_max=r_max, ffn_mult=ffn_mult, nesting=nesting,
                     post_norm=post_norm, ffn=ffn)
            for _ in range(n_blocks)
        )
        self.final_norm = NestedLayerNorm(self.sizes, nesting=nesting)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, sequential: bool | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask, sequential=sequential)
        return self.final_norm(x)

    def final_state(self, x: torch.Tensor, mask: torch.Tensor, sequential: bool | None = None) -> torch.Tensor:
        """The output at the last position alone, ``(B, D)``: equal to ``forward(x, mask)[:, -1]``.

        Every block but the last runs whole (its recurrence by device, see :class:`LRULayer`); the
        last block computes only what its last position needs: the recurrence's last state (one
        weighted sum), then the output projection, the FFN and the final norm at that position.
        """
        for block in self.blocks[:-1]:
            x = block(x, mask, sequential=sequential)
        return self.final_norm(self.blocks[-1](x, mask, last_only=True))[:, 0]
