"""Shared fixtures: the real datasets (skipped when absent) and a small synthetic dataset."""

from __future__ import annotations

from pathlib import Path

from collections import Counter

import numpy as np
import pytest

from recsys.data import SyntheticConfig, prepare, write_synthetic

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

#: a synthetic log small enough to prepare in well under a second
SMALL_SYNTHETIC = SyntheticConfig(num_users=200, num_items=120, num_clusters=6, mean_history=20, vector_dim=8, seed=3)


@pytest.fixture(autouse=True)
def _root_logger_as_it_was():
    """Every test leaves the root logger as it found it: the commands set it up themselves
    (``logging.basicConfig(force=True)`` on the test's captured stderr, closed once the test ends),
    and a handler left behind would fail the log lines of a later test."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _dataset(name: str) -> Path:
    path = DATASETS / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name!r} not found under {DATASETS} (see the project README)")
    return path


@pytest.fixture(scope="session")
def ml1m_dir() -> Path:
    return _dataset("ml-1m")


@pytest.fixture(scope="session")
def lastfm_dir() -> Path:
    return _dataset("lastfm")


@pytest.fixture(scope="session")
def synthetic_files(tmp_path_factory):
    return write_synthetic(SMALL_SYNTHETIC, tmp_path_factory.mktemp("synthetic_raw"))


@pytest.fixture(scope="session")
def synthetic_prepared(synthetic_files, tmp_path_factory) -> Path:
    """The small synthetic log prepared with the default options (read-only for tests)."""
    return prepare(out=tmp_path_factory.mktemp("synthetic") / "prepared", **synthetic_files.prepare_kwargs(), cache_dir=None)


def _train_part(data, user: int) -> np.ndarray:
    return data.history(user)[:-2]


def _is_contiguous_slice(needle: np.ndarray, haystack: np.ndarray) -> bool:
    if len(needle) > len(haystack):
        return False
    windows = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
    return bool((windows == needle).all(axis=1).any())


def assert_train_batches_in_training_parts(dm) -> None:
    """Every batch the DataModule's train loader yields is a contiguous piece of one user's training
    part, and one epoch's targets are every training target exactly once: no validation or test
    item leaks into training."""
    data, windows = dm.dataset, dm.train_windows
    loader = dm.train_dataloader()
    seen_targets: dict[int, Counter] = {}
    for indices in loader.batch_sampler:
        batch = loader.collate_fn(windows.__getitems__(indices))
        inputs, targets = batch["input_ids"].numpy(), batch["target_ids"].numpy()
        for row, user in enumerate(windows.user[indices]):
            real = inputs[row] > 0
            assert (targets[row][~real] == 0).all()
            sequence = np.append(inputs[row][real], targets[row][-1])
            assert _is_contiguous_slice(sequence, _train_part(data, user)), f"user {user}: window leaves the training part"
            seen_targets.setdefault(int(user), Counter()).update(targets[row][real].tolist())
    for user in range(1, data.num_users + 1):
        expected = Counter(_train_part(data, user)[1:].tolist())
        assert seen_targets.get(user, Counter()) == expected, f"user {user}"


@pytest.fixture()
def check_train_batches():
    return assert_train_batches_in_training_parts
