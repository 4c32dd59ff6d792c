"""``SequenceDataModule``: a prepared dataset as Lightning train/validation/test loaders.

The dataset is loaded in ``__init__`` (not in ``setup``), because the training CLI links
``num_items`` and ``item_features`` into the model when it builds it, before the Trainer runs.
Without ``data_dir`` the built-in synthetic log is generated and prepared once into a cache
directory (keyed by its config) and reused afterwards.

Multi-process training: the training CLI runs the Trainer with ``use_distributed_sampler=False``,
so this module shards itself when ``torch.distributed`` is initialised with more than one process.
Training windows go through a seeded, shuffling sampler (Lightning calls its ``set_epoch``) that
gives every rank the same number of windows; validation and test users are split into contiguous,
disjoint blocks with no padding and no duplicates, so metrics summed over ranks count every user
exactly once.

Length-aware batching (``length_batching``, the default): training batches hold windows of similar
length (:class:`~recsys.data.length_batching.LengthGroupedSampler`), and each rank's validation and
test users are ordered by history length before they are cut into batches, so that few encoded
positions are padding. Metrics are sums over users, so the evaluation order does not change them;
``length_batching=False`` gives the plain shuffled order (``DistributedSampler``) and users in id order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler

from recsys.data.batches import HeldOutTargets, TrainWindows, pass_through
from recsys.data.errors import DataValidationError
from recsys.data.length_batching import LengthGroupedSampler
from recsys.data.prepared import PreparedDataset, load_prepared
from recsys.data.resumable import ResumableBatchSampler, ResumableDataLoader
from recsys.data.synthetic import SyntheticConfig, prepared_synthetic
from recsys.item_features import ItemFeatures

__all__ = ["SequenceDataModule"]

log = logging.getLogger(__name__)


class SequenceDataModule(L.LightningDataModule):
    """Next-item training batches and leave-one-out evaluation batches from a prepared dataset.

    Args:
        data_dir: a directory written by ``python -m recsys.data prepare``; None = the built-in
            synthetic log (``synthetic``), prepared into ``synthetic_cache_dir`` on first use.
        synthetic: the synthetic log's config, used only when ``data_dir`` is None.
        synthetic_cache_dir: where the prepared synthetic log is kept.
        max_len: the longest input sequence (older items are cut off).
        batch_size: training windows per batch.
        eval_batch_size: users per validation/test batch.
        num_workers: DataLoader worker processes (batches are cheap to build; 0 is usually fine).
        seed: seed of the training shuffle (combined with the epoch).
        pad_to_max_len: always ``max_len`` columns instead of the batch's longest input.
        length_batching: batch windows (and evaluation users) of similar length together, so that
            batches are mostly real positions; False: random batches, users in id order.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        synthetic: SyntheticConfig | None = None,
        synthetic_cache_dir: str = "data/synthetic",
        max_len: int = 50,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        pad_to_max_len: bool = False,
        length_batching: bool = True,
    ) -> None:
        super().__init__()
        for name, value, least in (("max_len", max_len, 1), ("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                   ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DataValidationError(None, f"--data.{name} must be an integer of at least {least}, got {value!r}")
        if not isinstance(length_batching, bool):
            raise DataValidationError(None, f"--data.length_batching must be true or false, got {length_batching!r}")
        self.length_batching = length_batching
        self.max_len = max_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pad_to_max_len = pad_to_max_len
        if data_dir is None:
            data_dir = str(prepared_synthetic(synthetic or SyntheticConfig(), synthetic_cache_dir))
            log.info("using the synthetic log prepared in %s", data_dir)
        self.data_dir = Path(data_dir)
        self.dataset: PreparedDataset = load_prepared(self.data_dir)
        self.train_windows = TrainWindows(self.dataset.seq_items, self.dataset.seq_offsets, max_len, pad_to_max_len)
        self._train_loader: ResumableDataLoader | None = None
        self._resume_state: dict | None = None

    @property
    def num_items(self) -> int:
        return self.dataset.num_items

    @property
    def num_users(self) -> int:
        return self.dataset.num_users

    @property
    def item_features(self) -> ItemFeatures:
        return self.dataset.item_features

    @property
    def item_counts(self) -> list[int]:
        """Each item's events in the training parts, index 0 = padding (for popularity sampling)."""
        return self.dataset.train_counts.tolist()

    @property
    def cold_start_items(self) -> list[int]:
        """Items the cold-start protocol keeps out of training (none unless prepared with it)."""
        return self.dataset.cold_start_items.tolist()

    # -- what a checkpoint records of the data ---------------------------------------------------------

    #: the settings that decide the training batches: a resumed run must keep them
    BATCH_SETTINGS = ("batch_size", "seed", "length_batching")

    def fingerprint(self) -> dict:
        """The data a checkpoint is trained on: the prepared directory, the sha256 of each of its
        files, and the settings that decide the training batches (``recsys.train`` compares them
        before it resumes from a checkpoint)."""
        return {"data_dir": str(self.data_dir), "files": self.dataset.file_hashes,
                "settings": {name: getattr(self, name) for name in self.BATCH_SETTINGS}}

    def resume_problems(self, recorded: dict | None) -> list[str]:
        """How this data differs from the ``recorded`` fingerprint of a checkpoint (empty when it is
        the same); a checkpoint written before fingerprints were recorded is not checked."""
        if recorded is None:
            log.warning("the checkpoint records no fingerprint of its data (it predates them): the data is not checked")
            return []
        problems = []
        here, there = self.dataset.file_hashes, recorded.get("files", {})
        changed = sorted((name for name in here.keys() | there.keys() if here.get(name) != there.get(name)),
                         key=lambda name: (name.count("/"), name))  # the top-level files first
        if changed:
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            problems.append(f"it was trained on {recorded.get('data_dir')}, and --data.data_dir {self.data_dir} differs from it in {shown}")
        for name, value in recorded.get("settings", {}).items():
            if getattr(self, name, value) != value:
                problems.append(f"--data.{name} was {value!r}, now {getattr(self, name)!r}")
        return problems

    # -- loaders ------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        world_size, rank = _distributed_world()
        if self.length_batching:
            sampler = LengthGroupedSampler(self.train_windows.lengths, self.batch_size, world_size, rank, self.seed)
        else:
            sampler = DistributedSampler(
                self.train_windows, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed, drop_last=False
            )
        loader = self._loader(self.train_windows, ResumableBatchSampler(sampler, self.batch_size, drop_last=False))
        if self._resume_state is not None:
            loader.load_state_dict(self._resume_state)
            self._resume_state = None
        self._train_loader = loader
        return loader

    # -- checkpoints: a run killed mid-epoch resumes at the next batch (see recsys/data/resumable.py)

    def state_dict(self) -> dict:
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_state = state_dict.get("train_loader")

    def val_dataloader(self) -> DataLoader:
        return self._held_out_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._held_out_loader("test")

    def held_out_users(self, world_size: int = 1, rank: int = 0) -> np.ndarray:
        """This rank's evaluation users: a contiguous block, the blocks of all ranks partition the users."""
        users = np.arange(1, self.num_users + 1)
        return np.array_split(users, world_size)[rank]

    def _held_out_loader(self, holdout: str) -> DataLoader:
        users = self.held_out_users(*_distributed_world())
        if self.length_batching:  # this rank's users by history length (stable: ties in id order)
            offsets = self.dataset.seq_offsets
            users = users[np.argsort(offsets[users + 1] - offsets[users], kind="stable")]
        dataset = HeldOutTargets(self.dataset.seq_items, self.dataset.seq_offsets, users, holdout, self.max_len, self.pad_to_max_len)
        return self._loader(dataset, BatchSampler(SequentialSampler(range(len(dataset))), self.eval_batch_size, drop_last=False))

    def _loader(self, dataset, batch_sampler: BatchSampler) -> DataLoader:
        loader = ResumableDataLoader if isinstance(batch_sampler, ResumableBatchSampler) else DataLoader
        return loader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=pass_through,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


def _distributed_world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised process group, ``(1, 0)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0
