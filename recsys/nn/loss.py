"""The Matryoshka cross-entropy: one softmax loss per nested size, summed (docs/method.md §4).

For every position ``t`` with target item ``y_t`` and every size ``s_m``::

    CE_m = -log softmax(u_t[:s_m] @ Z[:, :s_m]^T)[y_t]          total = sum_m w_m * CE_m

Row 0 of the item matrix is the padding item: it is never a candidate, and positions whose target
is 0 are ignored (left out of the mean).

With ``distill > 0`` every size but the largest also learns the detached softmax of a teacher
(the largest size, or the next larger one): ``total += distill * sum_{m < M} KL(p_teacher || p_m)``,
computed in the same block pass (docs/method.md §4). With ``teacher_vectors`` the teacher is a
network outside the loss (its detached user vectors and item matrix, of any width), and every size
learns from it. With ``side_by_side`` the sizes are networks of their own (``nesting="slices"``,
their own item vectors): their vectors lie side by side and each size scores with its own chunk
alone, all in one pass, so each teacher's softmax is computed once per block.

Why a custom autograd function. The obvious implementation (:func:`naive_matryoshka_cross_entropy`)
builds M logit tensors of ``positions x items`` and autograd keeps all of them, so memory and time
grow with the number of sizes. But the logits at size ``s_m`` are the running sum over chunks
``c <= m`` of ``u[chunk c] @ Z[:, chunk c]^T``, and the gradient of chunk ``c``'s product is
``G_c = sum_{m >= c} w_m (softmax_m - onehot) / n_valid``. So for one block of positions we build
the logits of every size from the previous size's plus one chunk product (one full product in all),
then replace them by their softmax, then walk the sizes from largest to smallest turning size
``m``'s softmax into the running sum ``S_m = sum_{m' >= m} w_m' softmax_m' / n`` that gives chunk
``m``'s gradients. A block covers ``block_rows // M`` positions, so the logits held at once are
about ``block_rows x items`` floats whatever M is, and nothing that large outlives its block.

Why it is written this way (each choice measured, docs/method.md §4). What all sizes cost beyond
the largest alone is the elementwise work on the ``positions x items`` buffers, and on a busy
machine also the number of operations (every multi-threaded operation waits for all its threads).
So the code makes few passes over those buffers and few, large operations:

- all sizes' logits live in one ``(M, rows, N)`` buffer, and one in-place ``softmax`` over it
  handles every size at once (no separate buffer for the probabilities);
- the cross-entropy is ``-log`` of the target's probability, gathered from that softmax, so no
  pass looks for the row maxima or the log-sum-exp. That is exact while the probability is a
  normal float; rows whose target probability underflowed (a target logit some 87 below the
  row's top in float32) are recomputed exactly after the blocks;
- the running sum ``S_m`` is built in place, one ``add`` per size, and each chunk's gradient
  products write straight into their column slice of ``dU`` and ``dZ`` (no concatenation);
- the blocks are made equal in size, so there is no small last block.

(The other exact order, computing only the full-size logits and subtracting chunk ``m``'s product
to step down a size, holds fewer buffers per position but computes every chunk product twice; on
CPU it was about a fifth slower at equal memory. Summing the chunk products with one ``cumsum``
over the buffer instead of ``addmm`` onto a copy of the previous size was not consistently faster. A
``torch.compile``-fused softmax pass was tried too and gave no measurable gain over the eager
softmax.)

Why the gradients are computed in the forward pass. The loss is a scalar, so its backward only
scales the gradients by the incoming scalar. Computing them while the block's logits are at hand
(as fused linear-cross-entropy kernels do) saves recomputing every block's logits in backward; the
price is holding ``dU`` and ``dZ`` (the size of the inputs) between forward and backward. When no
input needs a gradient (evaluation, ``torch.no_grad``), only the losses are computed.

Precision: logits, softmax and gradient accumulation are float32 (float64 for float64 inputs).
Under autocast the inputs are cast to the autocast dtype and the matrix products run in it, as
autocast would run the naive loss's products; the softmax part stays float32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from recsys.nn.nested import check_sizes, chunk_bounds, chunk_scores, chunk_widths, prefix_scores

__all__ = [
    "MatryoshkaLoss",
    "matryoshka_cross_entropy",
    "naive_matryoshka_cross_entropy",
    "sampled_matryoshka_cross_entropy",
]

log = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class MatryoshkaLoss(NamedTuple):
    """``total``: the weighted sum over sizes (a scalar that carries gradients).
    ``per_size``: the mean cross-entropy at each size, shape ``(M,)``, detached (for logging).
    ``distill``: the mean self-distillation KL at each size, ``(M,)``, detached (0 for the
    largest size and without distillation)."""

    total: Tensor
    per_size: Tensor
    distill: Tensor | None = None


# -- input checks ---------------------------------------------------------------------------------


def _check_inputs(
    user: Tensor,
    items: Tensor,
    targets: Tensor,
    sizes: Sequence[int],
    weights: Sequence[float] | None,
    block_rows: int,
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Validate everything up front and return ``(sizes, weights)`` as tuples."""
    if not isinstance(user, Tensor) or user.ndim != 2 or not user.is_floating_point():
        raise ValueError(f"user must be a 2-D floating tensor (positions, D), got {_describe(user)}")
    if not isinstance(items, Tensor) or items.ndim != 2 or not items.is_floating_point():
        raise ValueError(f"items must be a 2-D floating tensor (N+1, D), got {_describe(items)}")
    if items.shape[1] != user.shape[1]:
        raise ValueError(f"user has width {user.shape[1]} but items have width {items.shape[1]}")
    if items.shape[0] < 2:
        raise ValueError(f"items needs the padding row 0 and at least one item, got {items.shape[0]} rows")
    if user.dtype != items.dtype:
        raise ValueError(f"user and items must have the same dtype, got {user.dtype} and {items.dtype}")
    if user.device != items.device or targets.device != user.device:
        raise ValueError(
            f"user, items and targets must be on one device, got {user.device}, {items.device}, {targets.device}"
        )
    if targets.ndim != 1 or targets.shape[0] != user.shape[0]:
        raise ValueError(f"targets must have shape ({user.shape[0]},), got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= items.shape[0]):
        raise ValueError(
            f"targets must lie in [0, {items.shape[0] - 1}] (0 = ignored position), "
            f"got values in [{int(targets.min())}, {int(targets.max())}]"
        )
    sizes = check_sizes(sizes, width=user.shape[1])
    if weights is None:
        weights = (1.0,) * len(sizes)
    else:
        weights = tuple(float(w) for w in weights)
        if len(weights) != len(sizes):
            raise ValueError(f"got {len(weights)} weights for {len(sizes)} sizes {list(sizes)}")
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"weights must be finite and non-negative, got {list(weights)}")
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows <= 0:
        raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}")
    return sizes, weights


TEACHERS = ("largest", "next")


def _check_distill(distill: float, teacher: str) -> float:
    if isinstance(distill, bool) or not isinstance(distill, (int, float)) or not math.isfinite(distill) or distill < 0:
        raise ValueError(f"distill must be a finite non-negative number, got {distill!r}")
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {', '.join(TEACHERS)}, got {teacher!r}")
    return float(distill)


def _check_logit_scales(logit_scales: Tensor | None, sizes: tuple[int, ...], distill: float) -> None:
    if logit_scales is None:
        return
    if not isinstance(logit_scales, Tensor) or logit_scales.shape != (len(sizes),) or not logit_scales.is_floating_point():
        raise ValueError(f"logit_scales must be a floating tensor of shape ({len(sizes)},), got {_describe(logit_scales)}")
    if not bool(torch.isfinite(logit_scales).all() and (logit_scales > 0).all()):
        raise ValueError(f"logit_scales must be finite and positive, got {logit_scales.detach().tolist()}")
    if distill > 0:
        raise ValueError("logit_scales and distill do not combine (the distillation's teacher is unscaled)")


def _check_teacher_vectors(teacher_vectors, user: Tensor, items: Tensor, distill: float) -> tuple[Tensor, Tensor] | None:
    """An outside teacher's ``(user vectors, item matrix)``, detached: as many rows as ``user`` and
    ``items``, one width of their own."""
    if teacher_vectors is None:
        return None
    if distill <= 0:
        raise ValueError("teacher_vectors needs distill > 0 (it is the softmax the sizes learn)")
    if not (isinstance(teacher_vectors, (tuple, list)) and len(teacher_vectors) == 2):
        raise ValueError(f"teacher_vectors must be a pair (user vectors, item matrix), got {_describe(teacher_vectors)}")
    t_user, t_items = teacher_vectors
    for name, t, rows in (("user vectors", t_user, user.shape[0]), ("item matrix", t_items, items.shape[0])):
        if not isinstance(t, Tensor) or t.ndim != 2 or not t.is_floating_point() or t.shape[0] != rows:
            raise ValueError(f"the teacher's {name} must be a 2-D floating tensor with {rows} rows, got {_describe(t)}")
        if t.device != user.device:
            raise ValueError(f"the teacher's {name} are on {t.device}, the user vectors on {user.device}")
    if t_user.shape[1] != t_items.shape[1] or t_user.dtype != t_items.dtype:
        raise ValueError(f"the teacher's user vectors ({_describe(t_user)}) and item matrix ({_describe(t_items)}) do not match")
    return t_user.detach(), t_items.detach()


def _teacher_of(m: int, num_sizes: int, teacher: str) -> int:
    """The size whose softmax size ``m`` learns from: the largest, or the next larger one."""
    return num_sizes - 1 if teacher == "largest" else m + 1


def _scores(user: Tensor, cand: Tensor, sizes: Sequence[int], side_by_side: bool, dtype: torch.dtype) -> list[Tensor]:
    """Every size's logits: the prefix products, or with ``side_by_side`` each chunk's alone."""
    if side_by_side:
        return list(chunk_scores(user, cand, sizes, dtype=dtype))
    return list(prefix_scores(user, cand, sizes, dtype=dtype))


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.ndim}-D {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _autocast_inputs(user: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
    """Cast to the autocast dtype when autocast is on (the cast is recorded by autograd, so
    gradients flow back to the original float32 tensors). Done before the input checks: under
    autocast a float32 item matrix meets user vectors that a bfloat16 product made."""
    if not all(isinstance(x, Tensor) and x.is_floating_point() for x in (user, items)):
        return user, items  # the checks say what is wrong
    device_type = user.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return user.to(dtype), items.to(dtype)
    return user, items


# -- the memory-flat loss -------------------------------------------------------------------------


def _product_into(out: Tensor, a: Tensor, b: Tensor, add_to: Tensor | None = None, beta: float = 1.0) -> None:
    """``out = beta * add_to + a @ b`` (``out = a @ b`` without ``add_to``; ``add_to`` may be ``out``).

    The product runs in the inputs' dtype and lands in ``out``'s (the softmax precision). ``out``
    may be a strided view whose rows are contiguous, such as a column slice of a gradient: BLAS
    writes it in place, so no temporary and no later copy is needed.
    """
    if out.dtype == a.dtype:
        if add_to is None:  # beta=0: out's old contents are ignored (torch.mm would copy a strided out)
            torch.addmm(out, a, b, beta=0.0, out=out)
        elif add_to is out:
            out.addmm_(a, b, beta=beta)
        else:
            torch.addmm(add_to, a, b, beta=beta, out=out)
    elif add_to is None:
        out.copy_(a @ b)
    elif add_to is out:  # in place: torch.add(out, ab, out=out) with mixed dtypes is 3-4x slower on CPU
        (out.mul_(beta) if beta != 1.0 else out).add_(a @ b)
    else:
        out.copy_(a @ b).add_(add_to, alpha=beta)


def _blocked_forward(
    user: Tensor,
    items: Tensor,
    targets: Tensor,
    sizes: tuple[int, ...],
    weights: tuple[float, ...],
    block_rows: int,
    with_grads: bool,
    distill: float = 0.0,
    teacher: str = "largest",
    logit_scales: tuple[float, ...] | None = None,
    teacher_vectors: tuple[Tensor, Tensor] | None = None,
    side_by_side: bool = False,
    teach_largest: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Per-size cross-entropy and distillation sums over the valid rows and, if asked, the
    gradients of ``sum_m w_m * CE_m + distill * sum_{m < M-1} KL_m`` (means over valid rows)
    w.r.t. ``user`` and ``items``.

    With ``logit_scales`` ``t_m`` (no distillation), size ``m``'s logits are ``t_m`` times its
    prefix products: its softmax weight becomes ``t_m * c_m`` in ``S_c`` and ``Y_c``, and the
    gradient of the total w.r.t. ``t_m`` is ``c_m * sum_rows (E_p[R_m] - R_m[target])`` with
    ``R_m`` the unscaled logits, which is ``c_m / t_m * sum_rows (CE + sum_j p_j log p_j)``: one
    more pass per size over the softmax (``sum p log p``), and nothing more.

    The gradient of chunk ``c``'s product is ``G_c = S_c - Y_c`` with the softmax part
    ``S_c = sum_{m >= c} (c_m + a_m) softmax_m - a_m softmax_{T(m)}`` (``c_m = w_m / n``, the
    distillation weight ``a_m = distill / n`` for every size but the largest, ``T(m)`` its teacher,
    whose softmax is a constant: detached) and the one-hot part ``Y_c = (sum_{m >= c} c_m) onehot``.
    ``S_c`` needs the softmaxes and is built block by block; ``Y_c`` touches only the targets' rows
    and is applied once at the end, outside the blocks. An outside teacher (``teacher_vectors``)
    is one more level of the block's buffer, its logits a product of its own vectors: every size,
    the largest too unless ``teach_largest`` is false, has ``a_m = distill / n`` and it as ``T(m)``.

    ``side_by_side``: size ``m``'s logits are chunk ``m``'s product alone (no running sum), so
    chunk ``m``'s gradient comes from size ``m``'s terms alone: ``S_c = (c_c + a_c) softmax_c -
    a_c softmax_{T(c)}`` and ``Y_c = c_c onehot``.

    Returns ``(ce_sums (M,), kl_sums (M,), d_user or None, d_items or None, d_scales or None)``.
    """
    dtype = torch.float32 if user.dtype in _LOW_PRECISION else user.dtype
    num_sizes, device = len(sizes), user.device
    bounds = chunk_bounds(sizes)
    valid = targets > 0
    n_valid = int(valid.sum())
    all_valid = n_valid == targets.shape[0]
    rows = None if all_valid else valid.nonzero().squeeze(1)
    # the padding row 0 keeps a zero gradient; rows 1.. are the candidates'
    d_items = torch.zeros(items.shape, dtype=dtype, device=device) if with_grads else None
    scaled = logit_scales is not None
    tau = logit_scales if scaled else (1.0,) * num_sizes
    outside = teacher_vectors is not None
    levels_count = num_sizes + outside  # the sizes' logits, then an outside teacher's
    if n_valid == 0:
        d_user = torch.zeros_like(user, dtype=dtype) if with_grads else None
        zeros = torch.zeros(num_sizes, dtype=dtype, device=device)
        return zeros, zeros.clone(), d_user, d_items, (zeros.clone() if with_grads and scaled else None)

    # Row 0 (padding) is simply left out of the candidates, so no -inf column is needed.
    cand = items[1:]
    num_cand = cand.shape[0]
    chunks = [cand[:, a:b] for a, b in bounds]  # strided views for the products
    u_valid = user if all_valid else user[rows]
    t_valid = (targets if all_valid else targets[rows]).long() - 1  # index into the candidates
    # c_m = w_m / n: the weight of size m's softmax in the gradient of the mean loss; a_m the
    # distillation's (none for the largest size, which is every other size's teacher or theirs)
    scale = [w * t / n_valid for w, t in zip(weights, tau)]
    distilled = range(num_sizes if outside and teach_largest else num_sizes - 1) if distill > 0 else range(0)
    alpha = distill / n_valid

    def teacher_level(m: int) -> int:
        return num_sizes if outside else _teacher_of(m, num_sizes, teacher)

    if outside:
        t_user, t_items = teacher_vectors
        t_user_valid, t_cand = (t_user if all_valid else t_user[rows]), t_items[1:]
    # the softmax probability of every row's target at every size (its CE is -log of it)
    target_prob = torch.empty(num_sizes, n_valid, dtype=dtype, device=device)
    kl_sums = torch.zeros(num_sizes, dtype=dtype, device=device)
    plogp_sums = torch.zeros(num_sizes, dtype=dtype, device=device)  # sum p log p per size (logit_scales)
    # the softmax part of the user gradient, written chunk by chunk in place
    d_valid = torch.empty(n_valid, user.shape[1], dtype=dtype, device=device) if with_grads else None
    # One block holds the logits of all M sizes for its positions, block_rows rows in all, and
    # never more than the three positions x items buffers the plain single-size loss holds at its
    # peak. The blocks are made equal, so that the last one is not a sliver.
    positions = max(1, min(block_rows, 3 * n_valid) // levels_count)
    positions = -(-n_valid // -(-n_valid // positions))
    buffer = torch.empty(levels_count * positions * num_cand, dtype=dtype, device=device)
    # distillation needs every size's softmax intact while the running sum is built: one more
    # positions x items buffer (also the scratch of the KL values), 1/M more memory
    spare = torch.empty(positions * num_cand, dtype=dtype, device=device) if distilled or (scaled and with_grads) else None

    for r0 in range(0, n_valid, positions):
        r1 = min(r0 + positions, n_valid)
        u, t = u_valid[r0:r1], t_valid[r0:r1]
        levels = buffer[: levels_count * (r1 - r0) * num_cand].view(levels_count, r1 - r0, num_cand)
        # upward: size m's logits are size m-1's plus chunk m's product (side by side: the product alone)
        for m, (a, b) in enumerate(bounds):
            u_chunk = u[:, a:b] * tau[m] if scaled else u[:, a:b]  # t_m R_m = (t_m/t_{m-1}) t_{m-1} R_{m-1} + t_m u_m z_m
            carry = m > 0 and not side_by_side
            _product_into(levels[m], u_chunk, chunks[m].t(), add_to=levels[m - 1] if carry else None,
                          beta=tau[m] / tau[m - 1] if carry else 1.0)
        if outside:
            _product_into(levels[num_sizes], t_user_valid[r0:r1], t_cand.t())
        # every size's softmax in one operation, in place: the logits are not needed any more
        torch.softmax(levels, dim=2, out=levels)
        target_prob[:, r0:r1] = levels[:num_sizes].gather(2, t.view(1, -1, 1).expand(num_sizes, -1, 1)).squeeze(2)
        if distilled:
            work = spare[: (r1 - r0) * num_cand].view(r1 - r0, num_cand)
            entropy: dict[int, Tensor] = {}  # sum p_T log p_T, once per teacher
            for m in distilled:  # KL(p_T || p_m) = sum p_T log p_T - sum p_T log p_m
                k = teacher_level(m)
                if k not in entropy:
                    entropy[k] = _sum_p_log_q(levels[k], levels[k], work)
                kl_sums[m] += entropy[k] - _sum_p_log_q(levels[k], levels[m], work)
        if not with_grads:
            continue
        if scaled:
            work = spare[: (r1 - r0) * num_cand].view(r1 - r0, num_cand)
            for m in range(num_sizes):
                plogp_sums[m] += _sum_p_log_q(levels[m], levels[m], work)
        # downward: S accumulates S_m = S_{m+1} + (c_m + a_m) softmax_m - a_m softmax_T(m) (side by
        # side, S starts afresh at every size); chunk m's gradients come from it. Without
        # distillation it lives in the softmax buffer it starts from, whose size needs it no more.
        S = None
        for m in range(num_sizes - 1, -1, -1):
            a, b = bounds[m]
            weight = scale[m] + (alpha if m in distilled else 0.0)
            if S is None or side_by_side:
                S = work if distilled else levels[m]
                torch.mul(levels[m], weight, out=S)
            else:
                S.add_(levels[m], alpha=weight)
            if m in distilled:  # the teacher's softmax (an outside teacher's: the largest learns from it too)
                S.sub_(levels[teacher_level(m)], alpha=alpha)
            g = S if S.dtype == u.dtype else S.to(u.dtype)
            _product_into(d_valid[r0:r1, a:b], g, chunks[m])
            d_chunk = d_items[1:, a:b]
            _product_into(d_chunk, g.t(), u[:, a:b], add_to=d_chunk)
    del buffer, spare

    ce_sums = _cross_entropy_from_probs(target_prob, u_valid, cand, t_valid, sizes, positions, tau, side_by_side).sum(dim=1)
    if not with_grads:
        return ce_sums, kl_sums, None, None, None
    d_scales = None
    if scaled:
        factor = torch.tensor([w / (t * n_valid) for w, t in zip(weights, tau)], dtype=dtype, device=device)
        d_scales = (ce_sums + plogp_sums) * factor
    # one-hot part: column j of chunk c carries sum_{m >= c} w_m t_m / n (side by side: w_c t_c / n)
    own = torch.tensor([w * t for w, t in zip(weights, tau)], dtype=torch.float64) / n_valid
    tail = own if side_by_side else own.flip(0).cumsum(0).flip(0)
    col_scale = tail.repeat_interleave(torch.tensor(chunk_widths(sizes))).to(device, dtype)
    d_valid -= cand[t_valid].to(dtype) * col_scale
    d_items.index_add_(0, t_valid + 1, u_valid.to(dtype) * col_scale, alpha=-1.0)
    if all_valid:
        d_user = d_valid
    else:
        d_user = torch.zeros_like(user, dtype=dtype)
        d_user[rows] = d_valid
    return ce_sums, kl_sums, d_user, d_items, d_scales


def _sum_p_log_q(p: Tensor, q: Tensor, work: Tensor) -> Tensor:
    """``sum p log q`` over a block's softmaxes, through ``work`` (their shape). A probability ``q``
    that underflowed counts as the smallest normal float, so a zero ``p`` adds nothing (as with
    ``xlogy``, which is not vectorised on CPU and about twice as slow)."""
    log_q = torch.clamp(q, min=torch.finfo(q.dtype).tiny, out=work).log_()
    return torch.dot(p.reshape(-1), log_q.view(-1))


def _cross_entropy_from_probs(
    target_prob: Tensor, user: Tensor, cand: Tensor, targets: Tensor, sizes: tuple[int, ...], positions: int,
    logit_scales: Sequence[float], side_by_side: bool,
) -> Tensor:
    """``CE[m, r] = -log softmax_m[r, target]`` from the target probabilities ``(M, n)``.

    That is exact while the probability is a normal float. Where it underflowed (a target logit
    some 87 below the row's largest in float32), those rows' logits are recomputed, ``positions``
    rows at a time, and their CE taken as ``logsumexp - target logit``: rare, and few rows.
    """
    ce = target_prob.log().neg_()
    far = target_prob < torch.finfo(target_prob.dtype).tiny
    if not bool(far.any()):
        return ce
    far_rows = far.any(dim=0).nonzero().squeeze(1)
    for rows in far_rows.split(positions):
        t = targets[rows].unsqueeze(1)
        for m, logits in enumerate(_scores(user[rows], cand, sizes, side_by_side, target_prob.dtype)):
            logits = logits * logit_scales[m]
            exact = torch.logsumexp(logits, dim=1) - logits.gather(1, t).squeeze(1)
            ce[m, rows] = torch.where(far[m, rows], exact, ce[m, rows])
    return ce


class _MatryoshkaCrossEntropy(torch.autograd.Function):
    """Autograd wrapper around :func:`_blocked_forward`; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, user, items, targets, sizes, weights, block_rows, with_grads, distill, teacher, logit_scales,  # noqa: D102
                teacher_vectors, side_by_side, teach_largest):
        scales = None if logit_scales is None else tuple(float(t) for t in logit_scales.detach().tolist())
        ce_sums, kl_sums, d_user, d_items, d_scales = _blocked_forward(
            user, items, targets, sizes, weights, block_rows, with_grads, distill, teacher, scales, teacher_vectors,
            side_by_side, teach_largest,
        )
        n_valid = max(int((targets > 0).sum()), 1)
        per_size, per_size_kl = ce_sums / n_valid, kl_sums / n_valid
        total = (per_size * per_size.new_tensor(weights)).sum() + distill * per_size_kl.sum()
        ctx.mark_non_differentiable(per_size, per_size_kl)
        if with_grads:
            ctx.save_for_backward(d_user.to(user.dtype), d_items.to(items.dtype),
                                  None if d_scales is None else d_scales.to(logit_scales.dtype))
        ctx.with_grads = with_grads
        return total, per_size, per_size_kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, grad_per_size, grad_kl):  # noqa: D102
        if not ctx.with_grads:
            raise RuntimeError("matryoshka_cross_entropy was computed without gradients")
        d_user, d_items, d_scales = ctx.saved_tensors
        if float(grad_total) != 1.0:  # the usual loss.backward() needs no copy
            scale = grad_total.to(d_user.dtype)
            d_user, d_items = d_user * scale, d_items * scale
            d_scales = None if d_scales is None else d_scales * scale.to(d_scales.dtype)
        return (d_user if ctx.needs_input_grad[0] else None, d_items if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None, None, d_scales if ctx.needs_input_grad[9] else None, None, None, None)


def matryoshka_cross_entropy(
    user: Tensor,
    items: Tensor,
    targets: Tensor,
    sizes: Sequence[int],
    weights: Sequence[float] | None = None,
    block_rows: int = 1024,
    distill: float = 0.0,
    teacher: str = "largest",
    logit_scales: Tensor | None = None,
    teacher_vectors: tuple[Tensor, Tensor] | None = None,
    side_by_side: bool = False,
    teach_largest: bool = True,
) -> MatryoshkaLoss:
    """Matryoshka cross-entropy over all ``sizes`` with memory that does not grow with their number.

    Args:
        user: ``(P, D)`` user states, one row per position.
        items: ``(N+1, D)`` item matrix; row 0 is the padding item and never a candidate.
        targets: ``(P,)`` target item indices in ``[0, N]``; 0 marks an ignored position.
        sizes: the nested sizes, strictly increasing, the largest equal to ``D``.
        weights: weight ``w_m`` of each size (default 1.0 each), finite and non-negative.
        block_rows: logit rows held at once, over all sizes: each block covers about
            ``block_rows // M`` positions (at least one; the blocks are made equal) and holds
            their logits at every size, about ``block_rows * N`` floats whatever the number of
            sizes. Larger blocks mean fewer operations but more memory touched per step.
            Small batches are split too, so that at most ``3 * P * N`` floats are held, what
            plain autograd cross-entropy at one size holds at its peak.
        distill: in-place self-distillation: every size but the largest also learns the softmax
            of its ``teacher`` (detached), adding ``distill * KL(p_teacher || p_m)`` (mean over
            valid positions) per size; computed in the same block pass, with one more
            ``positions x items`` buffer (memory ``1 + 1/M`` times). 0 = off.
        teacher: ``largest`` (every smaller size learns from the largest) or ``next`` (a cascade:
            each size learns from the next larger one).
        logit_scales: ``(M,)`` positive factors, one per size, that multiply its logits (an
            inverse softmax temperature; may require gradients, which are exact). Without
            distillation only. None: every factor 1.
        teacher_vectors: ``(user vectors (P, D_T), item matrix (N+1, D_T))`` of a teacher outside
            this loss, of its own width (detached; no gradient reaches them): with ``distill > 0``
            every size, the largest too, learns its softmax instead of ``teacher``'s. One more
            ``positions x items`` level per block.
        teach_largest: with ``teacher_vectors``, whether the largest size learns the outside
            teacher's softmax too; false: only the smaller sizes do, as with the loss's own teacher.
        side_by_side: ``user`` and ``items`` hold every size's own vectors side by side, size
            ``m``'s in chunk ``m`` (``sizes`` are the chunks' ends), and size ``m`` scores with its
            chunk alone, not with the prefix up to it: sizes that are networks of their own
            (``nesting="slices"``, their own item vectors) in one pass, where each teacher's
            softmax is computed once per block.

    Returns:
        ``MatryoshkaLoss(total, per_size, distill)``; ``per_size[m]`` is ``CE_m`` and
        ``distill[m]`` is ``KL_m`` (means over valid positions, ``KL`` 0 for the largest size
        unless the teacher is outside and ``teach_largest``),
        ``total = sum_m w_m * CE_m + distill * sum_m KL_m``. With no valid position all are 0.
    """
    user, items = _autocast_inputs(user, items)
    sizes, weights = _check_inputs(user, items, targets, sizes, weights, block_rows)
    distill = _check_distill(distill, teacher)
    _check_logit_scales(logit_scales, sizes, distill)
    teacher_vectors = _check_teacher_vectors(teacher_vectors, user, items, distill)
    if teacher_vectors is not None:
        teacher_vectors = _autocast_inputs(*teacher_vectors)
    with_grads = torch.is_grad_enabled() and (
        user.requires_grad or items.requires_grad or (logit_scales is not None and logit_scales.requires_grad)
    )
    with torch.autocast(user.device.type, enabled=False):
        total, per_size, per_size_kl = _MatryoshkaCrossEntropy.apply(
            user, items, targets, sizes, weights, block_rows, with_grads, distill, teacher, logit_scales, teacher_vectors,
            bool(side_by_side), bool(teach_largest),
        )
    return MatryoshkaLoss(total, per_size, per_size_kl)


# -- the reference ----------------------------------------------------------------------------------


def naive_matryoshka_cross_entropy(
    user: Tensor,
    items: Tensor,
    targets: Tensor,
    sizes: Sequence[int],
    weights: Sequence[float] | None = None,
    block_rows: int = 1024,
    distill: float = 0.0,
    teacher: str = "largest",
    logit_scales: Tensor | None = None,
    teacher_vectors: tuple[Tensor, Tensor] | None = None,
    side_by_side: bool = False,
    teach_largest: bool = True,
) -> MatryoshkaLoss:
    """The obvious implementation: one ``F.cross_entropy`` (and ``F.kl_div``) per size over its
    own logit tensor.

    Same arguments and result as :func:`matryoshka_cross_entropy` (``block_rows`` is accepted
    and unused). Autograd keeps M ``P x N`` logit tensors: the reference for tests and benchmarks.
    The logits come from :func:`~recsys.nn.nested.prefix_scores`, with the same precision as the
    memory-flat loss: products in the (autocast) input dtype, the sums and softmax in float32.
    """
    user, items = _autocast_inputs(user, items)
    sizes, weights = _check_inputs(user, items, targets, sizes, weights, block_rows)
    distill = _check_distill(distill, teacher)
    _check_logit_scales(logit_scales, sizes, distill)
    teacher_vectors = _check_teacher_vectors(teacher_vectors, user, items, distill)
    dtype = torch.float32 if user.dtype in _LOW_PRECISION else user.dtype
    valid = targets > 0
    n_valid = max(int(valid.sum()), 1)
    per_size, per_size_kl = [], []
    with torch.autocast(user.device.type, enabled=False):
        logits = list(_scores(user, items[1:], sizes, side_by_side, dtype))
        if logit_scales is not None:
            logits = [z * t for z, t in zip(logits, logit_scales.to(dtype))]
        if teacher_vectors is not None:
            t_user, t_items = _autocast_inputs(*teacher_vectors)
            (outside,) = prefix_scores(t_user, t_items[1:], (t_user.shape[1],), dtype=dtype)
        for m, z in enumerate(logits):
            per_size.append(F.cross_entropy(z, targets.long() - 1, ignore_index=-1, reduction="sum") / n_valid)
            if distill > 0 and ((teacher_vectors is not None and teach_largest) or m < len(sizes) - 1):
                t_logits = outside if teacher_vectors is not None else logits[_teacher_of(m, len(sizes), teacher)]
                p_teacher = F.softmax(t_logits[valid], dim=1).detach()
                per_size_kl.append(F.kl_div(F.log_softmax(z[valid], dim=1), p_teacher, reduction="sum") / n_valid)
            else:
                per_size_kl.append(z.new_zeros(()))
    total = sum(w * ce for w, ce in zip(weights, per_size)) + distill * sum(per_size_kl)
    return MatryoshkaLoss(total, torch.stack(per_size).detach(), torch.stack(per_size_kl).detach())



# -- large catalogues: sampled softmax ------------------------------------------------------------


def sampled_matryoshka_cross_entropy(
    user: Tensor,
    items: Tensor,
    targets: Tensor,
    sizes: Sequence[int],
    negatives: Tensor,
    log_q: Tensor | None = None,
    weights: Sequence[float] | None = None,
    logit_scales: Tensor | None = None,
) -> MatryoshkaLoss:
    """Sampled-softmax Matryoshka loss for catalogues where a full softmax does not fit.

    Every position is scored against its target and one set of ``K`` negatives shared by the whole
    batch (uniform samples, or the batch's own targets for in-batch negatives). With ``log_q``, the
    log-probability with which each item is drawn as a candidate, every candidate's logit is
    corrected by ``- log_q[item]`` (the log-Q correction, which makes the sampled softmax an
    unbiased stand-in for the full one as K grows). A negative equal to a position's target (an
    accidental hit) is left out for that position. The nested form is the same as the full loss:
    size ``s_m``'s logits are size ``s_{m-1}``'s plus chunk ``m``'s product, here on a
    ``P x (1 + K)`` matrix that autograd can simply keep.

    Args:
        user, items, targets, sizes, weights: as in :func:`matryoshka_cross_entropy`.
        negatives: ``(K,)`` item indices in ``[1, N]``, repeats allowed (sampling with replacement).
        log_q: optional ``(N+1,)`` log sampling probabilities, indexed by item.
        logit_scales: as in :func:`matryoshka_cross_entropy` (the factor multiplies the scores
            before the log-Q correction, which estimates the full softmax of the scaled logits).

    With ``negatives`` = every item once and no ``log_q`` this is exactly the full loss.
    """
    user, items = _autocast_inputs(user, items)
    sizes, weights = _check_inputs(user, items, targets, sizes, weights, 1)
    _check_logit_scales(logit_scales, sizes, 0.0)
    num_items = items.shape[0] - 1
    if not isinstance(negatives, Tensor) or negatives.ndim != 1 or negatives.numel() == 0:
        raise ValueError(f"negatives must be a non-empty 1-D tensor of item indices, got {_describe(negatives)}")
    if negatives.is_floating_point() or negatives.is_complex() or negatives.dtype == torch.bool:
        raise ValueError(f"negatives must be an integer tensor, got {negatives.dtype}")
    if int(negatives.min()) < 1 or int(negatives.max()) > num_items:
        raise ValueError(
            f"negatives must lie in [1, {num_items}] (the padding item 0 is never a candidate), "
            f"got values in [{int(negatives.min())}, {int(negatives.max())}]"
        )
    if log_q is not None and (log_q.ndim != 1 or log_q.shape[0] != num_items + 1):
        raise ValueError(f"log_q must have shape ({num_items + 1},), got {tuple(log_q.shape)}")

    dtype = torch.float32 if user.dtype in _LOW_PRECISION else user.dtype
    valid = targets > 0
    n_valid = int(valid.sum())
    u, t, negatives = user[valid], targets[valid].long(), negatives.long()
    pos, neg = items[t], items[negatives]
    hit = negatives.unsqueeze(0) == t.unsqueeze(1)  # (n, K) accidental hits
    per_size = []
    with torch.autocast(user.device.type, enabled=False):
        # each position against its own target (a one-candidate list) and against the shared negatives
        levels = zip(prefix_scores(u, pos.unsqueeze(1), sizes, dtype=dtype), prefix_scores(u, neg, sizes, dtype=dtype))
        for m, (pos_logit, neg_logit) in enumerate(levels):
            p, n = pos_logit.squeeze(1), neg_logit
            if logit_scales is not None:
                p, n = p * logit_scales[m].to(dtype), n * logit_scales[m].to(dtype)
            if log_q is not None:
                p = p - log_q[t].to(dtype)
                n = n - log_q[negatives].to(dtype)
            logits = torch.cat([p.unsqueeze(1), n.masked_fill(hit, -math.inf)], dim=1)
            ce = (torch.logsumexp(logits, dim=1) - logits[:, 0]).sum()
            per_size.append(ce / max(n_valid, 1))
    stacked = torch.stack(per_size)
    total = (stacked * stacked.new_tensor(weights)).sum()
    return MatryoshkaLoss(total, stacked.detach())
