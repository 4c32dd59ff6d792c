"""bench/heldout.py: the checkpoints an accuracy work directory's runs tested, evaluated again on each
user's validation and test item, give the ranks the runs reported."""

import json

import numpy as np
import pytest

from recsys.metrics import ndcg_of_ranks

from tests.bench_scripts import bench_script
from tests.test_bench_accuracy import _config


def test_heldout_ranks_are_those_the_runs_tested_and_validated(tmp_path, monkeypatch):
    accuracy, heldout = bench_script("accuracy"), bench_script("heldout")
    config, workdir = _config(tmp_path), tmp_path / "work"
    workdir.mkdir()
    runs = accuracy.Runs(config, workdir, "csv", parallel=1)
    runs.add("matryoshka-seed0", ["--trainer.max_epochs", "2"])
    runs.add("separate-d16-seed0", ["--trainer.max_epochs", "2", "--model.sizes", "[16]"])
    results = runs.finish()
    monkeypatch.setattr(heldout, "RESULTS", tmp_path / "results")

    # size 8 has no twin in the work directory: the command names the missing run
    with pytest.raises(SystemExit, match="separate-d8-seed0"):
        heldout.main(["--config", str(config), "--workdir", str(workdir), "--name", "u", "--sizes", "8"])

    heldout.main(["--config", str(config), "--workdir", str(workdir), "--name", "t", "--sizes", "16", "--resamples", "50"])
    report = json.loads((tmp_path / "results" / "heldout_t.json").read_text())
    (row,) = report["sizes"]
    cache = {}
    for name, column in (("matryoshka-seed0", 1), ("separate-d16-seed0", 0)):
        users, ranks = runs.ranks(name)  # what the run itself tested
        checkpoint = heldout.checkpoint_of(workdir, name)
        again = heldout.heldout_ranks(checkpoint, 16, heldout.data_module(config, None), workdir / "heldout")
        assert np.array_equal(again["test"][0], users) and np.array_equal(again["test"][1], ranks[column])
        cache[name] = again
    # the twin's validation score is the one its best checkpoint was picked by
    assert ndcg_of_ranks(cache["separate-d16-seed0"]["val"][1]).mean() == pytest.approx(results["separate-d16-seed0"]["best_val"], abs=1e-6)
    assert row["test_one"] == pytest.approx(ndcg_of_ranks(cache["matryoshka-seed0"]["test"][1]).mean())
    assert row["both"]["mean"] == pytest.approx((row["val"]["mean"] + row["test"]["mean"]) / 2)
    assert row["drift"]["mean"] == pytest.approx(row["test"]["mean"] - row["val"]["mean"])
