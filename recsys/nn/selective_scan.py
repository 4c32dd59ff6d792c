"""Selective scan (the S6 recurrence of Mamba) in PyTorch, and the dispatch to mamba_ssm's kernels.

For every channel ``d`` and state ``n`` the scan runs the diagonal, input-dependent recurrence

    h_t[d, n] = exp(delta_t[d] * A[d, n]) * h_{t-1}[d, n] + delta_t[d] * B_t[g(d), n] * u_t[d]
    y_t[d]    = sum_n C_t[g(d), n] * h_t[d, n] + D[d] * u_t[d]       (then y * SiLU(z) if z is given)

where ``g(d)`` is the channel's group: ``B`` and ``C`` have shape ``(batch, groups, N, L)`` and the
channels are split into ``groups`` equal, contiguous groups that share them. The argument layout is
exactly that of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``, so both implementations
are interchangeable: :func:`dispatch_selective_scan` uses the fused CUDA kernel when the tensors are
on a GPU and ``mamba_ssm`` imports, and :func:`selective_scan` (ours) everywhere else.

``mamba_ssm`` is imported lazily and only behind a CUDA check: its ``__init__`` loads compiled CUDA
extensions, so importing it fails on a CPU-only machine even where it is installed.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "selective_scan",
    "selective_scan_reference",
    "dispatch_selective_scan",
    "causal_depthwise_conv1d",
    "kernels_available",
]

logger = logging.getLogger(__name__)


def _prepare(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes, compute in at least float32, apply the step's bias and softplus, give B/C a group axis."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, dim, L), got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, N), got {tuple(A.shape)}")
    n_state = A.shape[1]
    if B.dim() == 3:  # one group: (batch, N, L)
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != n_state or t.shape[3] != length:
            raise ValueError(f"{name} must be (batch, groups, N={n_state}, L={length}), got {tuple(t.shape)}")
        if dim % t.shape[1] != 0:
            raise ValueError(f"{name} has {t.shape[1]} groups, which do not divide the {dim} channels evenly")
    dtype = torch.promote_types(u.dtype, torch.float32)  # half precision is scanned in float32
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u.to(dtype), delta, A.to(dtype), B.to(dtype), C.to(dtype)


def _finish(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Add the skip ``D * u`` and apply the gate ``SiLU(z)``, as the kernel does after the scan."""
    if D is not None:
        y = y + D.to(u.dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(u.dtype))
    return y.to(dtype)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The recurrence one time step at a time: slow, obviously right, used to test the others."""
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    per_group = dim // B.shape[1]
    B = B.repeat_interleave(per_group, dim=1)  # (batch, dim, N, L): each channel its group's B
    C = C.repeat_interleave(per_group, dim=1)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    return _finish(torch.stack(ys, dim=-1), u, D, z, dtype)


class _ChunkedScan(torch.autograd.Function):
    """The scan proper, ``y_t = C_t . h_t``, over chunked tensors, with a hand-written backward.

    Layout (time-in-chunk first, so that one step is one contiguous slice):
    ``u, delta``: ``(T, batch, groups, chunks, H)`` with ``H`` channels per group; ``A``:
    ``(groups, 1, H, N)``; ``B, C``: ``(T, batch, groups, chunks, N)``. Returns ``y`` like ``u``.

    The states ``(..., H, N)`` are ``N`` times larger than everything else. Plain autograd would
    keep several copies of them per layer; here the forward keeps only the state entering each
    chunk and the backward recomputes the rest, one layer at a time, as the CUDA kernel does.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        # Autocast off: the scan runs in the inputs' precision (at least float32, see _prepare).
        with torch.autocast(u.device.type, enabled=False):
            y, starts = _scan_forward(u, delta, A, B, C)
        ctx.save_for_backward(u, delta, A, B, C, starts)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):
            return _scan_backward(dy, *ctx.saved_tensors)


def _scan_forward(u, delta, A, B, C):
    """Outputs ``y`` and the state entering every chunk (all the backward pass needs to keep)."""
    decay = (delta.unsqueeze(-1) * A).exp_()  # a_t = exp(delta_t A), (T, batch, groups, chunks, H, N)
    drive = delta * u
    # The state each chunk would end in from a zero start, then carried across chunks.
    local_end = _walk_forward(decay, drive, B, torch.zeros_like(decay[0]))
    chunk_decay = torch.exp(delta.sum(0).unsqueeze(-1) * A)  # product of a_t over a chunk
    starts = torch.empty_like(local_end)
    h = torch.zeros_like(local_end[:, :, 0])
    for c in range(local_end.shape[2]):
        starts[:, :, c] = h
        h = chunk_decay[:, :, c] * h + local_end[:, :, c]
    y = torch.empty_like(u)
    _walk_forward(decay, drive, B, starts, C=C, y=y)
    return y, starts


def _scan_backward(dy, u, delta, A, B, C, starts):
    """Gradients for ``u, delta, A, B, C``, recomputing the states chunk by chunk."""
    dy = dy.contiguous()
    steps = u.shape[0]
    decay = (delta.unsqueeze(-1) * A).exp_()
    drive = delta * u
    # Recompute every state: states[t + 1] = h_t, states[0] = the state entering the chunk.
    states = decay.new_empty((steps + 1, *decay.shape[1:]))
    _walk_forward(decay, drive, B, starts, states=states)

    # lam_t = dL/dh_t obeys the reversed recurrence lam_t = C_t dy_t + a_{t+1} lam_{t+1}.
    # First from a zero start at each chunk's end, giving lam at each chunk's first step ...
    local_first = _walk_backward(decay, dy, C, torch.zeros_like(starts))
    # ... then carry across chunks from the last: what flows into chunk c's end is
    # a_0 lam_0 of chunk c + 1; lam_0 of chunk c gets it times the product of a_1 .. a_{T-1}.
    inner_decay = torch.exp(delta[1:].sum(0).unsqueeze(-1) * A)
    incoming = torch.empty_like(starts)
    carry = torch.zeros_like(starts[:, :, 0])
    for c in range(starts.shape[2] - 1, -1, -1):
        incoming[:, :, c] = carry
        carry = decay[0, :, :, c] * (local_first[:, :, c] + inner_decay[:, :, c] * carry)
    lam = decay.new_empty(decay.shape)
    _walk_backward(decay, dy, C, incoming, out=lam)

    dC = (dy.unsqueeze(-2) @ states[1:]).squeeze(-2)  # sum over channels of dy_t h_t
    lam_B = (lam @ B.unsqueeze(-1)).squeeze(-1)  # sum over states of lam_t B_t
    dB = (drive.unsqueeze(-2) @ lam).squeeze(-2)  # sum over channels of lam_t delta_t u_t
    du = delta * lam_B
    # Through a_t = exp(delta_t A): dL/d(delta_t A) = lam_t a_t h_{t-1}. The three state-sized
    # buffers are reused for the products (no further state-sized allocations).
    through_decay = lam.mul_(decay).mul_(states[:-1])
    ddelta = u * lam_B + torch.mul(through_decay, A, out=decay).sum(-1)
    dA = torch.mul(through_decay, delta.unsqueeze(-1), out=states[1:]).sum((0, 1, 3)).unsqueeze(1)
    return du, ddelta, dA, dB, dC


def _walk_forward(decay, drive, B, h, C=None, y=None, states=None):
    """Run ``h_t = a_t h_{t-1} + drive_t B_t`` over the steps of every chunk at once.

    Writes ``y_t = C_t . h_t`` into ``y`` and every state into ``states`` when given; returns the
    last state. ``h`` (the start) is not modified.
    """
    if states is not None:
        states[0] = h
    for t in range(decay.shape[0]):
        h = decay[t] * h if states is None else torch.mul(decay[t], h, out=states[t + 1])
        h.addcmul_(drive[t].unsqueeze(-1), B[t].unsqueeze(-2))
        if y is not None:
            torch.matmul(h, C[t].unsqueeze(-1), out=y[t].unsqueeze(-1))
    return h


def _walk_backward(decay, dy, C, lam, out=None):
    """Run ``lam_t = C_t dy_t + a_{t+1} lam_{t+1}`` backwards over every chunk at once.

    ``lam`` is what flows into the last step of each chunk from the next one. Writes every
    ``lam_t`` into ``out`` when given; returns ``lam`` at each chunk's first step.
    """
    steps = decay.shape[0]
    for t in range(steps - 1, -1, -1):
        target = None if out is None else out[t]
        if t == steps - 1:  # a fresh tensor, so the caller's start is left intact
            lam = lam.clone() if target is None else target.copy_(lam)
        else:
            lam = decay[t + 1] * lam if target is None else torch.mul(decay[t + 1], lam, out=target)
        lam.addcmul_(dy[t].unsqueeze(-1), C[t].unsqueeze(-2))
    return lam


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Chunked selective scan in PyTorch; same arguments and result as ``selective_scan_fn``.

    Shapes: ``u, delta, z``: ``(batch, dim, L)``; ``A``: ``(dim, N)``; ``B, C``: ``(batch, groups,
    N, L)`` or ``(batch, N, L)``; ``D, delta_bias``: ``(dim,)``. Returns ``(batch, dim, L)``.

    The sequence is cut into chunks of ``T`` steps (``ceil(sqrt(L))`` by default), so the Python
    loops run about ``T + L/T`` times instead of ``L`` times:

    1. a walk over the ``T`` steps of every chunk at once, from zero, gives the state each chunk
       would end in on its own;
    2. a loop over the chunks carries the true state from one chunk into the next;
    3. a second walk over the steps, each chunk starting from its carried-in state, reads out
       ``y_t = C_t . h_t``.

    All decays are ``exp(A * delta)`` with ``A <= 0 <= delta`` (products of them, never ratios), so
    nothing overflows however strong the decay. The backward pass (:class:`_ChunkedScan`) runs the
    same three stages on the reversed recurrence of the gradients. The channel axis is viewed as
    ``(groups, channels per group)`` so a group's ``B``/``C`` broadcast over its channels without
    being copied per channel.
    """
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    per_group = dim // groups

    steps = chunk_size if chunk_size is not None else max(1, math.ceil(math.sqrt(length)))
    if steps < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    n_chunks = math.ceil(length / steps)
    pad = n_chunks * steps - length

    # Padding at the end is harmless: a zero step keeps the state, a zero input adds nothing, and
    # those outputs are dropped.
    def per_channel(t: torch.Tensor) -> torch.Tensor:  # (batch, dim, L) -> (T, batch, groups, chunks, H)
        t = (F.pad(t, (0, pad)) if pad else t).reshape(batch, groups, per_group, n_chunks, steps)
        return t.permute(4, 0, 1, 3, 2).contiguous()

    def per_group_(t: torch.Tensor) -> torch.Tensor:  # (batch, groups, N, L) -> (T, batch, groups, chunks, N)
        t = (F.pad(t, (0, pad)) if pad else t).reshape(batch, groups, n_state, n_chunks, steps)
        return t.permute(4, 0, 1, 3, 2).contiguous()

    y = _ChunkedScan.apply(
        per_channel(u), per_channel(delta), A.view(groups, 1, per_group, n_state), per_group_(B), per_group_(C)
    )
    y = y.permute(1, 2, 4, 3, 0).reshape(batch, dim, n_chunks * steps)
    y = y[..., :length] if pad else y
    return _finish(y, u, D, z, dtype)


# --- GPU kernels -----------------------------------------------------------------------------


@functools.cache
def _mamba_selective_scan_fn() -> Callable | None:
    """``mamba_ssm``'s fused ``selective_scan_fn``, or None where it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, or OSError/RuntimeError from its compiled extension
        logger.info("mamba_ssm kernels unavailable (%s: %s); using the PyTorch selective scan", type(err).__name__, err)
        return None
    return selective_scan_fn


@functools.cache
def _causal_conv1d_fn() -> Callable | None:
    """``causal_conv1d``'s fused ``causal_conv1d_fn``, or None where it cannot be imported."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception as err:
        logger.info("causal_conv1d kernel unavailable (%s: %s); using F.conv1d", type(err).__name__, err)
        return None
    return causal_conv1d_fn


def kernels_available(device: torch.device | str) -> bool:
    """Whether ``mamba_ssm``'s selective-scan kernel can run on ``device`` (a CUDA device only)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and _mamba_selective_scan_fn() is not None


def _use_kernels(use_kernels: bool | None, device: torch.device, what: str) -> bool:
    if use_kernels is None:
        return kernels_available(device)
    if use_kernels and not kernels_available(device):
        raise RuntimeError(
            f"use_kernels=True but the {what} kernel cannot run here (device {device}; it needs CUDA tensors "
            "and an importable mamba_ssm, from the 'gpu' install profile); pass use_kernels=None or False"
        )
    return use_kernels


def dispatch_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    use_kernels: bool | None = None,
) -> torch.Tensor:
    """Selective scan by ``mamba_ssm``'s fused kernel on GPU, by :func:`selective_scan` elsewhere.

    ``use_kernels``: None picks the kernel when it can run, True demands it (error if it cannot),
    False always uses the PyTorch scan.
    """
    if not _use_kernels(use_kernels, u.device, "selective scan"):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    scan_fn = _mamba_selective_scan_fn()
    # The kernel wants A, D and delta_bias in float32 and the variable B/C in the dtype of u.
    dtype = u.dtype
    return scan_fn(
        u,
        delta.to(dtype),
        A.float(),
        B.to(dtype),
        C.to(dtype),
        D=None if D is None else D.float(),
        z=None if z is None else z.to(dtype),
        delta_bias=None if delta_bias is None else delta_bias.float(),
        delta_softplus=delta_softplus,
    )


def causal_depthwise_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu: bool = False,
    use_kernels: bool | None = None,
) -> torch.Tensor:
    """Causal depth-wise convolution of ``x`` ``(batch, dim, L)`` with ``weight`` ``(dim, width)``.

    Output ``t`` reads inputs ``t - width + 1 .. t`` of its own channel (zeros before the start).
    On GPU with ``causal_conv1d`` installed (and ``use_kernels`` not False) its fused kernel runs,
    which supports widths 2 to 4; otherwise ``F.conv1d``.
    """
    width = weight.shape[1]
    kernel = None
    if x.is_cuda and 2 <= width <= 4 and _use_kernels(use_kernels, x.device, "selective scan"):
        kernel = _causal_conv1d_fn()
    if kernel is not None:
        # Channel-first contiguous: the kernel's channel-last path has extra divisibility rules.
        return kernel(
            x.contiguous(),
            weight.to(x.dtype),
            None if bias is None else bias.to(x.dtype),
            activation="silu" if silu else None,
        )
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if silu else out
