"""Length-aware training order: each batch holds windows of similar length, so little of it is padding.

A batch is as long as its longest window (``recsys/data/batches.py``). Drawn at random, a batch of
128 short histories almost always holds one long one, and on data with short histories (Amazon
Sports: median 6 events, at most 50 after truncation) most encoded positions are then padding.

:class:`LengthGroupedSampler` orders one rank's share of an epoch so that every run of
``batch_size`` consecutive indices is a batch of similar lengths; a plain ``BatchSampler`` (the
:class:`~recsys.data.resumable.ResumableBatchSampler`) cuts it into batches. Per epoch:

1. a random permutation of all windows, seeded by ``seed + epoch`` (as ``DistributedSampler``),
   padded by repeating its first indices to a multiple of the number of ranks, and this rank's
   share taken as every ``num_replicas``-th index, so every rank has the same number of windows;
2. the share cut into *pools* of ``pool_batches`` batches, each pool sorted by window length (a
   stable sort of the shuffled order, so windows of equal length are still in random order);
3. each pool cut into batches, and the order of all full batches shuffled; a last, partial batch
   (when the share is not a multiple of ``batch_size``) stays last, so that the batch sampler's
   cuts fall on batch boundaries.

Why pools and not one global sort: the pool bounds how deterministic a batch's company is. Sorted
globally, the same long windows would always meet in the same few batches; within a pool of many
batches, a window is batched with windows of its length drawn from a random part of the epoch.
Pools of 64 batches already make most positions real (``bench/train_step.py`` reports the fraction
on Sports and MovieLens-1M), and larger pools gain little.

The order depends only on ``(seed, epoch, rank, num_replicas)`` and the lengths, never on earlier
iteration, so a resumed run that skips the first batches of an epoch sees the same remaining ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["LengthGroupedSampler", "POOL_BATCHES", "real_fraction"]

#: batches per pool sorted by length (see the module docstring)
POOL_BATCHES = 64


class LengthGroupedSampler(Sampler[int]):
    """One rank's indices for an epoch, in batches of similar ``lengths`` (see the module docstring).

    Has ``set_epoch`` and ``epoch`` like ``DistributedSampler``, which Lightning and
    :class:`~recsys.data.resumable.ResumableDataLoader` rely on.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        pool_batches: int = POOL_BATCHES,
    ) -> None:
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be positive, got {batch_size} and {pool_batches}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank {rank} of {num_replicas}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.pool_batches = pool_batches
        self.epoch = 0
        self.num_samples = -(-len(self.lengths) // num_replicas)  # windows per rank, as DistributedSampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def order(self) -> np.ndarray:
        """This rank's indices for the current epoch, batch after batch."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.lengths)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        permutation = torch.randperm(n, generator=generator).numpy()
        total = self.num_samples * self.num_replicas
        permutation = np.resize(permutation, total)  # pads by repeating from the start
        share = permutation[self.rank :: self.num_replicas]

        pool = self.pool_batches * self.batch_size
        pools = [share[i : i + pool] for i in range(0, len(share), pool)]
        ordered = np.concatenate([p[np.argsort(self.lengths[p], kind="stable")] for p in pools])

        full = len(ordered) // self.batch_size
        batches = ordered[: full * self.batch_size].reshape(full, self.batch_size)
        shuffled = batches[torch.randperm(full, generator=generator).numpy()].reshape(-1)
        return np.concatenate([shuffled, ordered[full * self.batch_size :]])


def real_fraction(lengths: np.ndarray, batches: list[np.ndarray] | list[list[int]]) -> float:
    """Real positions over encoded positions when each batch is padded to its longest length."""
    lengths = np.asarray(lengths)
    real = padded = 0
    for batch in batches:
        batch_lengths = lengths[np.asarray(batch, dtype=np.int64)]
        real += int(batch_lengths.sum())
        padded += int(batch_lengths.max()) * len(batch_lengths)
    return real / padded if padded else 1.0
