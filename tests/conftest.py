"""Shared fixtures: the real datasets (skipped when absent) and a small synthetic dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.data import SyntheticConfig, prepare, write_synthetic

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

#: a synthetic log small enough to prepare in well under a second
SMALL_SYNTHETIC = SyntheticConfig(num_users=200, num_items=120, num_clusters=6, mean_history=20, vector_dim=8, seed=3)


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
