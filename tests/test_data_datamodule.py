"""SequenceDataModule: batch shapes, left padding, aligned targets, no split leaks, sharding."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser

import recsys.data.datamodule as datamodule_module
import recsys.data.synthetic as synthetic_module
from recsys.data import SequenceDataModule, SyntheticConfig
from recsys.data.batches import HeldOutTargets, TrainWindows


@pytest.fixture(scope="module")
def dm(synthetic_prepared):
    return SequenceDataModule(data_dir=str(synthetic_prepared), max_len=8, batch_size=16, eval_batch_size=32, seed=1)


def test_properties_are_ready_after_construction(dm):
    assert dm.num_items == dm.dataset.num_items > 0
    assert dm.item_features.num_items == dm.num_items
    assert set(dm.item_features.dense) == {"text"} and set(dm.item_features.bags) == {"tags"}


def test_train_batch_shapes_left_padding_and_alignment(dm):
    batch = next(iter(dm.train_dataloader()))
    inputs, targets = batch["input_ids"], batch["target_ids"]
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.shape == targets.shape and inputs.shape[0] == 16 and inputs.shape[1] <= 8
    real = inputs > 0
    # left padding: once a row has a real item, every later column is real
    assert (real.int().diff(dim=1) >= 0).all()
    assert (targets[~real] == 0).all() and (targets[real] > 0).all()
    # the target at t is the input at t + 1
    both = real[:, :-1]
    assert torch.equal(targets[:, :-1][both], inputs[:, 1:][both])
    assert batch["input_ids"].shape[1] == int(real.sum(1).max())  # as long as the longest row


def test_windows_cover_every_training_target_once_and_never_leak(dm, check_train_batches):
    check_train_batches(dm)


def test_long_training_parts_are_cut_from_the_end():
    items = np.arange(1, 13, dtype=np.int32)  # one user, 12 events: training part 1..10
    windows = TrainWindows(items, np.array([0, 0, 12]), max_len=4)
    batch = windows.__getitems__(range(len(windows)))
    np.testing.assert_array_equal(batch["input_ids"].numpy(), [[6, 7, 8, 9], [2, 3, 4, 5], [0, 0, 0, 1]])
    np.testing.assert_array_equal(batch["target_ids"].numpy(), [[7, 8, 9, 10], [3, 4, 5, 6], [0, 0, 0, 2]])


def test_pad_to_max_len_gives_fixed_width(synthetic_prepared):
    dm = SequenceDataModule(data_dir=str(synthetic_prepared), max_len=64, batch_size=4, pad_to_max_len=True)
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (4, 64)
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[1] == 64


@pytest.mark.parametrize("holdout", ["validation", "test"])
def test_held_out_batches(dm, holdout):
    loader = dm.val_dataloader() if holdout == "validation" else dm.test_dataloader()
    users = []
    for batch in loader:
        assert set(batch) == {"user", "input_ids", "target", "seen_ids"}
        for row, user in enumerate(batch["user"].tolist()):
            history = dm.dataset.history(user)
            before = history[:-2] if holdout == "validation" else history[:-1]
            assert batch["target"][row] == history[len(before)]
            inputs = batch["input_ids"][row].numpy()
            np.testing.assert_array_equal(inputs[inputs > 0], before[-8:])
            assert (inputs[: len(inputs) - min(len(before), 8)] == 0).all()  # left padded
            seen = batch["seen_ids"][row].numpy()
            np.testing.assert_array_equal(seen[: len(before)], before)  # the whole history, not cut at max_len
            assert (seen[len(before):] == 0).all()
        users += batch["user"].tolist()
    assert sorted(users) == list(range(1, dm.num_users + 1))  # every user once (ordered by length)


def test_sharding_over_ranks(dm, monkeypatch):
    world = 3
    val_users, train_indices = [], []
    for rank in range(world):
        monkeypatch.setattr(datamodule_module, "_distributed_world", lambda rank=rank: (world, rank))
        val_users.append([u for b in dm.val_dataloader() for u in b["user"].tolist()])
        loader = dm.train_dataloader()
        loader.batch_sampler.sampler.set_epoch(0)
        train_indices.append([i for b in loader.batch_sampler for i in b])
    # validation: every user exactly once over the ranks, no padding
    assert sorted(u for shard in val_users for u in shard) == list(range(1, dm.num_users + 1))
    assert max(map(len, val_users)) - min(map(len, val_users)) <= 1
    # training: equal-length shards that together cover every window
    assert len({len(s) for s in train_indices}) == 1
    assert set(i for s in train_indices for i in s) == set(range(len(dm.train_windows)))


def test_shuffle_is_seeded_and_changes_with_the_epoch(dm):
    def order(epoch, module=dm):
        loader = module.train_dataloader()
        loader.batch_sampler.sampler.set_epoch(epoch)
        return [i for b in loader.batch_sampler for i in b]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(1)) == list(range(len(dm.train_windows)))
    other_seed = SequenceDataModule(data_dir=str(dm.data_dir), max_len=8, batch_size=16, seed=2)
    assert order(0, other_seed) != order(0)


def test_worker_processes_give_the_same_batches(synthetic_prepared):
    def batches(workers):
        module = SequenceDataModule(data_dir=str(synthetic_prepared), max_len=8, batch_size=64, num_workers=workers)
        return [b["target_ids"] for b in module.train_dataloader()]

    for a, b in zip(batches(0), batches(1), strict=True):
        assert torch.equal(a, b)


def test_synthetic_default_is_prepared_once_and_reused(tmp_path, monkeypatch):
    config = SyntheticConfig(num_users=60, num_items=40, num_clusters=4, mean_history=12, vector_dim=4, seed=5)
    first = SequenceDataModule(synthetic=config, synthetic_cache_dir=str(tmp_path))
    assert first.num_items == 40 and first.data_dir.parent == tmp_path

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached synthetic dataset should have been reused")

    monkeypatch.setattr(synthetic_module, "write_synthetic", must_not_run)
    second = SequenceDataModule(synthetic=config, synthetic_cache_dir=str(tmp_path))
    assert second.data_dir == first.data_dir
    assert [p.name for p in tmp_path.iterdir()] == [first.data_dir.name]  # raw files were cleaned up


def test_typed_signature_builds_from_command_line_arguments(tmp_path):
    parser = ArgumentParser()
    parser.add_class_arguments(SequenceDataModule, "data")
    cfg = parser.parse_args([
        "--data.synthetic_cache_dir", str(tmp_path), "--data.max_len", "12",
        "--data.synthetic.num_users", "50", "--data.synthetic.num_items", "30", "--data.synthetic.num_clusters", "3",
    ])
    module = parser.instantiate_classes(cfg).data
    assert isinstance(module, SequenceDataModule) and module.max_len == 12 and module.num_items == 30


def test_held_out_targets_reject_users_without_three_events():
    with pytest.raises(ValueError, match="at least 3 events"):
        HeldOutTargets(np.array([1, 2], dtype=np.int32), np.array([0, 0, 2]), np.array([1]), "validation", max_len=4)


def _shard_worker(rank: int, world: int, data_dir: str, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        module = SequenceDataModule(data_dir=data_dir, max_len=8, batch_size=16, eval_batch_size=7)
        loader = module.train_dataloader()
        loader.batch_sampler.sampler.set_epoch(3)
        result = {
            "validation": [u for b in module.val_dataloader() for u in b["user"].tolist()],
            "test": [u for b in module.test_dataloader() for u in b["user"].tolist()],
            "train": [i for b in loader.batch_sampler for i in b],
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_shards_itself_under_a_real_process_group(synthetic_prepared, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2
    torch.multiprocessing.spawn(_shard_worker, args=(world, str(synthetic_prepared), port, str(tmp_path)), nprocs=world)
    shards = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    single = SequenceDataModule(data_dir=str(synthetic_prepared), max_len=8)
    for split in ("validation", "test"):  # every user exactly once over the ranks
        assert sorted(u for shard in shards for u in shard[split]) == list(range(1, single.num_users + 1))
    windows = len(single.train_windows)  # equal shares that together cover every window
    assert len(shards[0]["train"]) == len(shards[1]["train"]) == -(-windows // world)
    assert set(shards[0]["train"]) | set(shards[1]["train"]) == set(range(windows))
