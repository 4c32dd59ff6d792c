"""A training DataLoader that a mid-epoch checkpoint can resume exactly.

Resuming from a checkpoint taken in the middle of an epoch, Lightning (2.6) restores the weights,
the optimizer and its step counters, but by default it starts the interrupted epoch's batch order
from the beginning: the batches trained before the kill are trained again and the rest of the epoch
is never seen. It also does not restore the global torch RNG that dropout draws from.

:class:`ResumableDataLoader` records the sampler's epoch, how many batches of that epoch it has
handed out and the torch RNG state; after ``load_state_dict`` its next pass skips those batches (by
index, without building them) and dropout continues from the saved state. It draws worker seeds
from its own generator, so starting a pass does not advance the global RNG. A run killed mid-epoch
and resumed from its last checkpoint then trains on the same batches with the same dropout masks as
a run that was never interrupted (on CPU; on a GPU dropout draws from the CUDA generator, which is
not carried, and some kernels are not deterministic anyway).

Lightning saves and loads a training loader's ``state_dict`` itself, but it loads it only when the
loader is created after the checkpoint's loops are restored; a model whose ``configure_optimizers``
reads ``trainer.estimated_stepping_batches`` (ours does) creates it earlier and the state is never
loaded (Lightning issue #20550). :class:`~recsys.data.SequenceDataModule` therefore also carries the
state in its own ``state_dict``, which Lightning restores before anything else, and hands it to the
loader it creates.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader

__all__ = ["ResumableBatchSampler", "ResumableDataLoader"]


class ResumableBatchSampler(BatchSampler):
    """A ``BatchSampler`` whose next pass can start after its first ``skip`` batches."""

    def __init__(self, sampler, batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableBatchSampler` with Lightning's ``state_dict`` interface.

    The sampler inside the batch sampler must have ``set_epoch`` and ``epoch`` (``DistributedSampler``).
    ``len()`` stays the full epoch: Lightning counts the resumed batches itself.
    """

    def __init__(self, dataset, batch_sampler: ResumableBatchSampler, **kwargs: Any) -> None:
        if not isinstance(batch_sampler, ResumableBatchSampler):
            raise TypeError("ResumableDataLoader needs a ResumableBatchSampler")
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))  # worker seeds: not the global RNG
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._served = 0

    def __iter__(self) -> Iterator[Any]:
        # counted before each batch is handed out: a checkpoint taken after training on it includes it
        self._served = self.batch_sampler.skip
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": int(self.batch_sampler.sampler.epoch),
            "batches": int(self._served),
            "torch_rng_state": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self.batch_sampler):  # saved at the end of an epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        self.batch_sampler.sampler.set_epoch(epoch)
        self.batch_sampler.skip = batches
        if "torch_rng_state" in state:
            torch.set_rng_state(state["torch_rng_state"])
