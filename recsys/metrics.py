"""Full-ranking evaluation per nested size (docs/method.md §5).

Every user is ranked against the whole catalogue, never a sampled set of negatives. The rank of
the target is ``1 + the number of items scoring strictly higher``; ties therefore favour the
target, and the metric does not depend on how a sort would break them. From the rank:
``NDCG@K = 1/log2(rank + 1)`` if ``rank <= K`` else 0, ``Recall@K = HR@K = [rank <= K]`` (one target
per user) and ``MRR = 1/rank``.

Counting strictly higher scores gives the same numbers as a top-k cut and needs no sort; items are
processed in blocks, so a ``users x items`` score matrix exists only one block at a time, and the
scores of all sizes are built from one product per block (size ``s_m``'s scores are size
``s_{m-1}``'s plus chunk ``m``'s product).

A non-finite score never wins: an item scoring NaN counts as higher than the target, and a target
scoring NaN or an infinity ranks below every item, so a diverged model gets the worst metrics, not
perfect ones (and the training loop stops before it ranks with non-finite vectors at all).

History masking (the LRURec/RecBole protocol): items the user has already seen are left out of
the count, except the target itself. Whether masking was on is the caller's to record.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from recsys.nn.nested import check_sizes, prefix_scores

__all__ = ["target_ranks", "popularity_scores_ranks", "RankingMetrics", "ndcg_of_ranks"]

log = logging.getLogger(__name__)


def _check_ids(name: str, ids: Tensor, low: int, high: int) -> None:
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < low or int(ids.max()) > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got values in [{int(ids.min())}, {int(ids.max())}]")


def _check_targets_and_seen(targets: Tensor, seen_ids: Tensor | None, batch: int, num_items: int) -> None:
    if targets.ndim != 1 or targets.shape[0] != batch:
        raise ValueError(f"targets must have shape ({batch},), got {tuple(targets.shape)}")
    _check_ids("targets", targets, 1, num_items)
    if seen_ids is not None:
        if seen_ids.ndim != 2 or seen_ids.shape[0] != batch:
            raise ValueError(f"seen_ids must have shape ({batch}, H), got {tuple(seen_ids.shape)}")
        _check_ids("seen_ids", seen_ids, 0, num_items)


def _seen_mask(seen_ids: Tensor, targets: Tensor, start: int, stop: int) -> Tensor:
    """``users x (stop - start)`` mask of the seen items among candidates ``start..stop-1``
    (candidate ``j`` is item ``j + 1``); padding ids and the target itself are never masked."""
    local = seen_ids.long() - 1 - start
    keep = (seen_ids > 0) & (seen_ids != targets.unsqueeze(1)) & (local >= 0) & (local < stop - start)
    mask = torch.zeros(seen_ids.shape[0], stop - start, dtype=torch.bool, device=seen_ids.device)
    rows, cols = keep.nonzero(as_tuple=True)
    mask[rows, local[rows, cols]] = True
    return mask


@torch.no_grad()
def target_ranks(
    user: Tensor,
    items: Tensor,
    targets: Tensor,
    sizes: Sequence[int],
    seen_ids: Tensor | None = None,
    item_block: int = 65536,
) -> Tensor:
    """Rank of each user's target among all catalogue items, at every size.

    Args:
        user: ``(B, D)`` user vectors.
        items: ``(N+1, D)`` item matrix; row 0 is padding and never counts.
        targets: ``(B,)`` target item indices in ``[1, N]``.
        sizes: the nested sizes, the largest equal to ``D``; size ``s`` scores with ``[:s]``.
        seen_ids: optional ``(B, H)`` item indices, 0-padded, to leave out of the count (history
            masking); the target is never left out, even when it appears there.
        item_block: items scored at once; memory is about ``B * item_block`` scores. A catalogue
            larger than one block is scored twice (first for the targets' own scores, see below).

    Returns:
        ``(M, B)`` int64 ranks, ``1 + #{items j in 1..N not masked : score_j > score_target}``.

    Ties are exact when scores are computed exactly (integer-valued inputs) and, in floating point,
    within one item block: an item identical to the target then ties with it. Across blocks the
    products come from separate matrix multiplications whose last-bit rounding may differ, so an
    exact duplicate of the target in another block may land either side of it.
    """
    if user.ndim != 2 or items.ndim != 2 or not user.is_floating_point() or not items.is_floating_point():
        raise ValueError(
            f"user (B, D) and items (N+1, D) must be 2-D floating tensors, got {tuple(user.shape)} "
            f"{user.dtype} and {tuple(items.shape)} {items.dtype}"
        )
    if items.shape[1] != user.shape[1]:
        raise ValueError(f"user has width {user.shape[1]} but items have width {items.shape[1]}")
    if items.shape[0] < 2:
        raise ValueError(f"items needs the padding row 0 and at least one item, got {items.shape[0]} rows")
    if isinstance(item_block, bool) or not isinstance(item_block, int) or item_block <= 0:
        raise ValueError(f"item_block must be a positive integer, got {item_block!r}")
    sizes = check_sizes(sizes, width=user.shape[1])
    batch, num_items = user.shape[0], items.shape[0] - 1
    _check_targets_and_seen(targets, seen_ids, batch, num_items)

    # Comparisons in at least float32, in one dtype for users and items.
    dtype = torch.promote_types(torch.promote_types(user.dtype, items.dtype), torch.float32)
    user, cand = user.to(dtype), items[1:].to(dtype)
    local_targets = (targets.long() - 1).unsqueeze(1)
    blocks = [(j, min(j + item_block, num_items)) for j in range(0, num_items, item_block)]

    # Every score comes from nested.prefix_scores on one item block, one buffer updated in place:
    # the target's score is read from these same products (never from a separate dot product, whose
    # rounding could differ and let the target outscore itself or its duplicates), and masked
    # (seen) items are set to -inf after the first chunk's product, where the sums keep them.
    # With several blocks the targets' scores are needed before counting starts: read them from
    # the very same block computation, so that they compare exactly with the other items' scores.
    target_scores = None
    if len(blocks) > 1:
        target_scores = torch.empty(len(sizes), batch, dtype=dtype, device=user.device)
        for start, stop in blocks:
            inside = ((local_targets >= start) & (local_targets < stop)).squeeze(1)
            cols = (local_targets - start).clamp(0, stop - start - 1)
            for m, scores in enumerate(prefix_scores(user, cand[start:stop], sizes, inplace=True)):
                target_scores[m] = torch.where(inside, scores.gather(1, cols).squeeze(1), target_scores[m])

    higher = torch.zeros(len(sizes), batch, dtype=torch.long, device=user.device)
    for start, stop in blocks:
        mask = None if seen_ids is None else _seen_mask(seen_ids, targets, start, stop)
        for m, scores in enumerate(prefix_scores(user, cand[start:stop], sizes, inplace=True, mask=mask)):
            own = scores.gather(1, local_targets) if target_scores is None else target_scores[m].unsqueeze(1)
            own = own.where(own.isfinite(), torch.nan)  # an infinite target score is no win either
            # "not lower or equal" is "higher" for numbers, and also holds for a NaN: another item's
            # NaN counts as higher, and a NaN target is below every item (a diverged model ranks
            # last, never first); the target itself, counted too, is taken off once
            higher[m] += (stop - start) - (scores <= own).sum(dim=1)
            if start == 0:
                higher[m] -= own.squeeze(1).isnan().long()
    return higher + 1


@torch.no_grad()
def popularity_scores_ranks(
    popularity: Tensor, targets: Tensor, seen_ids: Tensor | None, num_sizes: int
) -> Tensor:
    """Ranks under the popularity baseline: every user scores item ``j`` with ``popularity[j]``.

    The baseline the learning tests must beat. Same rules as :func:`target_ranks` (row 0 never
    counts, seen items other than the target are left out, strictly higher counts), repeated for
    each of the ``num_sizes`` sizes so that it feeds :class:`RankingMetrics` directly.

    Args:
        popularity: ``(N+1,)`` scores, e.g. training interaction counts (entry 0 is ignored).
        targets: ``(B,)`` target indices in ``[1, N]``.
        seen_ids: ``(B, H)`` 0-padded item indices to mask, or None.
        num_sizes: how many rows (sizes) to return.

    Returns:
        ``(num_sizes, B)`` int64 ranks.
    """
    if popularity.ndim != 1 or popularity.shape[0] < 2:
        raise ValueError(f"popularity must have shape (N+1,) with N >= 1, got {tuple(popularity.shape)}")
    if isinstance(num_sizes, bool) or not isinstance(num_sizes, int) or num_sizes <= 0:
        raise ValueError(f"num_sizes must be a positive integer, got {num_sizes!r}")
    if targets.ndim != 1:
        raise ValueError(f"targets must have shape (B,), got {tuple(targets.shape)}")
    num_items = popularity.shape[0] - 1
    _check_targets_and_seen(targets, seen_ids, targets.shape[0], num_items)
    pop = popularity.to(torch.float64)
    own = pop[targets.long()]
    ordered = torch.sort(pop[1:]).values
    higher = num_items - torch.searchsorted(ordered, own, right=True)
    if seen_ids is not None and seen_ids.numel():
        seen = torch.sort(seen_ids.long(), dim=1).values
        first = torch.ones_like(seen, dtype=torch.bool)
        first[:, 1:] = seen[:, 1:] != seen[:, :-1]  # count each seen item once
        masked = first & (seen > 0) & (seen != targets.long().unsqueeze(1)) & (pop[seen] > own.unsqueeze(1))
        higher = higher - masked.sum(dim=1)
    return (higher + 1).unsqueeze(0).repeat(num_sizes, 1)


def ndcg_of_ranks(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-user NDCG@k of target ranks (1 = best): ``1/log2(rank + 1)`` if ``rank <= k``, else 0."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)


class RankingMetrics:
    """Accumulates NDCG@K, Recall@K and MRR per size from target ranks, batch by batch.

    Sums are float64 and live on the CPU. :meth:`compute` adds them up across processes when
    ``torch.distributed`` is initialised with more than one process: each process evaluates a
    disjoint set of users, so the sum covers every user exactly once.

    With ``keep_ranks`` every user's ranks are kept too (``update`` then needs the users' ids), for
    per-user analyses such as a paired bootstrap between two models: :meth:`per_user_ranks`.
    """

    def __init__(self, sizes: Sequence[int], ks: Sequence[int] = (5, 10, 20), keep_ranks: bool = False) -> None:
        self.sizes = check_sizes(sizes)
        ks = tuple(ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in ks):
            raise ValueError(f"ks must be positive integers, got {list(ks)}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"ks must not repeat, got {list(ks)}")
        self.ks = ks
        self.keep_ranks = keep_ranks
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        m, k = len(self.sizes), len(self.ks)
        self._ndcg = torch.zeros(m, k, dtype=torch.float64)
        self._recall = torch.zeros(m, k, dtype=torch.float64)
        self._mrr = torch.zeros(m, dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.float64)
        self._users: list[np.ndarray] = []
        self._ranks: list[np.ndarray] = []

    def update(self, ranks: Tensor, users: Tensor | None = None) -> None:
        """Add a batch of ``(M, B)`` target ranks (1 = best), one row per size, and with
        ``keep_ranks`` the ``(B,)`` ids of the batch's users."""
        if ranks.ndim != 2 or ranks.shape[0] != len(self.sizes):
            raise ValueError(f"ranks must have shape ({len(self.sizes)}, B), got {tuple(ranks.shape)}")
        if ranks.is_floating_point() or ranks.is_complex() or ranks.dtype == torch.bool:
            raise ValueError(f"ranks must be an integer tensor, got {ranks.dtype}")
        if self.keep_ranks and (users is None or tuple(users.shape) != (ranks.shape[1],)):
            got = "none" if users is None else f"shape {tuple(users.shape)}"
            raise ValueError(f"keep_ranks needs the users' ids, shape ({ranks.shape[1]},), got {got}")
        if ranks.numel() == 0:
            return
        r = ranks.detach().to("cpu", torch.float64)
        if float(r.min()) < 1:
            raise ValueError(f"ranks start at 1, got a rank of {int(r.min())}")
        if self.keep_ranks:
            self._users.append(users.detach().cpu().numpy().astype(np.int64))
            self._ranks.append(ranks.detach().cpu().numpy().astype(np.int64))
        ks = torch.tensor(self.ks, dtype=torch.float64)
        hit = (r.unsqueeze(1) <= ks.view(1, -1, 1)).to(torch.float64)  # (M, K, B)
        gain = 1.0 / torch.log2(r + 1.0)
        self._ndcg += (hit * gain.unsqueeze(1)).sum(dim=2)
        self._recall += hit.sum(dim=2)
        self._mrr += (1.0 / r).sum(dim=1)
        self._count += r.shape[1]

    def _reduced(self) -> tuple[Tensor, Tensor, Tensor, float]:
        m, k = len(self.sizes), len(self.ks)
        packed = torch.cat([self._ndcg.flatten(), self._recall.flatten(), self._mrr, self._count.view(1)])
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            packed = packed.to(device)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            packed = packed.cpu()
        ndcg, recall = packed[: m * k].view(m, k), packed[m * k : 2 * m * k].view(m, k)
        return ndcg, recall, packed[2 * m * k : 2 * m * k + m], float(packed[-1])

    def per_user_ranks(self) -> tuple[np.ndarray, np.ndarray]:
        """``(users (U,), ranks (M, U))`` of every user added (on every process), sorted by user id.

        Needs ``keep_ranks``. Collective when distributed: every process must call it.
        """
        if not self.keep_ranks:
            raise RuntimeError("per_user_ranks() needs RankingMetrics(..., keep_ranks=True)")
        users = np.concatenate([np.empty(0, np.int64), *self._users])
        ranks = np.concatenate([np.empty((len(self.sizes), 0), np.int64), *self._ranks], axis=1)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (users, ranks))
            users = np.concatenate([u for u, _ in parts])
            ranks = np.concatenate([r for _, r in parts], axis=1)
        order = np.argsort(users, kind="stable")
        return users[order], ranks[:, order]

    def compute(self) -> dict[str, float]:
        """Averages over all users seen (on every process): ``ndcg_{k}/d{s}``, ``recall_{k}/d{s}``,
        ``mrr/d{s}`` and ``count``. Collective when distributed: every process must call it."""
        ndcg, recall, mrr, count = self._reduced()
        if count == 0:
            raise RuntimeError("RankingMetrics.compute() called before any user was added")
        out: dict[str, float] = {}
        for i, s in enumerate(self.sizes):
            for j, k in enumerate(self.ks):
                out[f"ndcg_{k}/d{s}"] = float(ndcg[i, j]) / count
                out[f"recall_{k}/d{s}"] = float(recall[i, j]) / count
            out[f"mrr/d{s}"] = float(mrr[i]) / count
        out["count"] = count
        return out
