"""Length-aware batching: every window once per epoch, seeded and reshuffled, mostly real positions,
equal disjoint shards, exact resume, and evaluation metrics unchanged by the users' order."""

from __future__ import annotations

import itertools

import lightning as L
import numpy as np
import pytest
import torch

import recsys.data.datamodule as datamodule_module
from recsys.data import SequenceDataModule
from recsys.data.length_batching import LengthGroupedSampler, real_fraction
from recsys.data.resumable import ResumableBatchSampler
from recsys.model import MatryoshkaRecommender

BATCH = 32


@pytest.fixture(scope="module")
def skewed_lengths() -> np.ndarray:
    """Short histories with a long tail, as on Amazon data: median about 5, capped at 50."""
    rng = np.random.default_rng(7)
    return np.minimum(1 + rng.geometric(0.15, size=5003), 50)


def batches_of(sampler: LengthGroupedSampler, batch_size: int = BATCH) -> list[list[int]]:
    return list(ResumableBatchSampler(sampler, batch_size, drop_last=False))


def test_every_window_exactly_once_per_epoch(skewed_lengths):
    sampler = LengthGroupedSampler(skewed_lengths, BATCH, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = batches_of(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(skewed_lengths)))
        assert all(len(b) == BATCH for b in batches[:-1]) and 0 < len(batches[-1]) <= BATCH
    assert len(sampler) == len(skewed_lengths)


def test_order_is_seeded_and_changes_between_epochs(skewed_lengths):
    def order(seed: int, epoch: int) -> list[int]:
        sampler = LengthGroupedSampler(skewed_lengths, BATCH, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    # not only the batch order: which windows share a batch changes too
    together = [{frozenset(b) for b in batches_of(LengthGroupedSampler(skewed_lengths, BATCH, seed=0))}]
    later = LengthGroupedSampler(skewed_lengths, BATCH, seed=0)
    later.set_epoch(1)
    together.append({frozenset(b) for b in batches_of(later)})
    assert len(together[0] & together[1]) < len(together[0]) // 2


def test_batches_are_mostly_real_positions(skewed_lengths):
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(len(skewed_lengths))
    padded = real_fraction(skewed_lengths, [shuffled[i : i + BATCH] for i in range(0, len(shuffled), BATCH)])
    grouped = real_fraction(skewed_lengths, batches_of(LengthGroupedSampler(skewed_lengths, BATCH)))
    assert padded < 0.4  # random batches are mostly padding on these lengths ...
    assert grouped > 0.85  # ... batches of similar lengths are not


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_disjoint_equal_and_cover_every_window(skewed_lengths, world):
    shards = []
    for rank in range(world):
        sampler = LengthGroupedSampler(skewed_lengths, BATCH, num_replicas=world, rank=rank, seed=5)
        sampler.set_epoch(2)
        shards.append(batches_of(sampler))
    assert len({len(s) for s in shards}) == 1  # every rank the same number of batches
    assert len({sum(map(len, s)) for s in shards}) == 1  # ... and the same number of windows
    indices = [i for s in shards for b in s for i in b]
    assert set(indices) == set(range(len(skewed_lengths)))
    # disjoint, except the few windows repeated to give every rank an equal share (as DistributedSampler)
    assert len(indices) - len(set(indices)) == -len(skewed_lengths) % world


def test_resuming_mid_epoch_gives_the_remaining_batches(skewed_lengths):
    sampler = LengthGroupedSampler(skewed_lengths, BATCH, seed=1)
    sampler.set_epoch(4)
    full = batches_of(sampler)
    fresh = LengthGroupedSampler(skewed_lengths, BATCH, seed=1)
    fresh.set_epoch(4)
    resumed = ResumableBatchSampler(fresh, BATCH, drop_last=False)
    resumed.skip = 17
    assert list(resumed) == full[17:]


def test_sampler_rejects_bad_settings(skewed_lengths):
    with pytest.raises(ValueError, match="batch_size and pool_batches must be positive"):
        LengthGroupedSampler(skewed_lengths, 0)
    with pytest.raises(ValueError, match="rank must be in"):
        LengthGroupedSampler(skewed_lengths, BATCH, num_replicas=2, rank=2)


def test_datamodule_option_and_its_check(synthetic_prepared):
    on = SequenceDataModule(data_dir=str(synthetic_prepared), max_len=8, batch_size=16)
    off = SequenceDataModule(data_dir=str(synthetic_prepared), max_len=8, batch_size=16, length_batching=False)
    assert isinstance(on.train_dataloader().batch_sampler.sampler, LengthGroupedSampler)
    assert not isinstance(off.train_dataloader().batch_sampler.sampler, LengthGroupedSampler)
    assert len(on.train_dataloader()) == len(off.train_dataloader())
    with pytest.raises(ValueError, match="length_batching must be true or false, got 'yes'"):
        SequenceDataModule(data_dir=str(synthetic_prepared), length_batching="yes")


def test_train_loader_batches_fewer_padded_positions(synthetic_prepared, check_train_batches):
    def fraction(module):
        return real_fraction(module.train_windows.lengths, list(module.train_dataloader().batch_sampler))

    on = SequenceDataModule(data_dir=str(synthetic_prepared), max_len=50, batch_size=8)
    off = SequenceDataModule(data_dir=str(synthetic_prepared), max_len=50, batch_size=8, length_batching=False)
    assert fraction(on) > max(0.9, fraction(off))
    check_train_batches(on)  # every training target once, nothing from validation or test


def test_evaluation_users_ordered_by_length_in_each_shard(synthetic_prepared, monkeypatch):
    module = SequenceDataModule(data_dir=str(synthetic_prepared), max_len=8, eval_batch_size=16)
    offsets = module.dataset.seq_offsets
    world, shards = 2, []
    for rank in range(world):
        monkeypatch.setattr(datamodule_module, "_distributed_world", lambda rank=rank: (world, rank))
        users = [u for b in module.val_dataloader() for u in b["user"].tolist()]
        assert sorted(users) == module.held_out_users(world, rank).tolist()  # the same contiguous block
        lengths = [offsets[u + 1] - offsets[u] for u in users]
        assert lengths == sorted(lengths)
        shards.append(users)
    assert sorted(itertools.chain(*shards)) == list(range(1, module.num_users + 1))


@pytest.mark.parametrize("holdout", ["validation", "test"])
def test_evaluation_metrics_do_not_depend_on_the_order(synthetic_prepared, holdout):
    L.seed_everything(0)
    on = SequenceDataModule(data_dir=str(synthetic_prepared), max_len=8, eval_batch_size=16)
    off = SequenceDataModule(data_dir=str(synthetic_prepared), max_len=8, eval_batch_size=16, length_batching=False)
    model = MatryoshkaRecommender(item_features=on.item_features, sizes=[8, 16], max_len=8).eval()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    results = []
    for module in (on, off):
        if holdout == "validation":
            results.append(trainer.validate(model, datamodule=module, verbose=False)[0])
        else:
            trainer.test(model, datamodule=module, verbose=False)
            results.append(model.last_test_metrics)
    assert [b["user"].tolist() for b in on.val_dataloader()] != [b["user"].tolist() for b in off.val_dataloader()]
    assert results[0].keys() == results[1].keys() and len(results[0]) > 10
    for key, value in results[0].items():
        assert value == pytest.approx(results[1][key], rel=1e-9, abs=1e-12), key
