"""bench/accuracy.py's work directory: a run that a killed job left half-way goes on from its last
checkpoint when the job is started again, and its wall time counts what the killed job trained; a
run kept with ``--keep-runs`` is reused by a job on a fresh machine (another work directory)."""

import json
import time
from pathlib import Path

import numpy as np
import yaml

from tests.bench_scripts import BENCH, bench_script


def _config(tmp_path: Path) -> Path:
    config = {
        "model": {"sizes": [8, 16]},
        "data": {"synthetic": {"num_users": 60, "num_items": 50}, "synthetic_cache_dir": str(tmp_path / "cache"),
                 "max_len": 16, "eval_batch_size": 16},
        "trainer": {"accelerator": "cpu"},
        "early_stopping": {"patience": 100},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_run_left_half_way_goes_on_from_its_last_checkpoint(tmp_path):
    accuracy = bench_script("accuracy")
    workdir = tmp_path / "work"
    workdir.mkdir()
    runs = accuracy.Runs(_config(tmp_path), workdir, "csv", parallel=1)

    # The first job trains one epoch, then is "killed": its result line and ranks are gone, its
    # last.ckpt stays, as after a kill between two epochs.
    runs.add("m", ["--trainer.max_epochs", "1"])
    first = runs.finish()["m"]
    assert first["epochs"] == 1 and "resumed" not in first
    last = runs.checkpoint_dir("m") / "last.ckpt"
    assert last.exists()
    log = workdir / "m.log"
    log.write_text("".join(x for x in log.read_text().splitlines(keepends=True) if not x.startswith("BENCH-RESULT ")))
    runs.ranks_file("m").unlink()
    kept = last.stat().st_mtime - json.loads(runs.segments_file("m").read_text())[0]["start"]
    time.sleep(0.01)

    runs = accuracy.Runs(_config(tmp_path), workdir, "csv", parallel=1)
    assert runs.finished_before("m") is None
    runs.add("m", ["--trainer.max_epochs", "2"])
    second = runs.finish()["m"]
    assert second["epochs"] == 2  # one more epoch, not two from the start
    assert second["resumed"] == 1
    output = log.read_text()
    assert "Restored all states from the checkpoint" in output and output.count("BENCH-RESULT ") == 1
    segments = json.loads(runs.segments_file("m").read_text())
    assert len(segments) == 2 and abs(segments[0]["kept_s"] - kept) < 1e-6
    this_job = json.loads(next(x for x in output.splitlines() if x.startswith("BENCH-RESULT "))[len("BENCH-RESULT "):])
    assert abs(second["wall_s"] - (this_job["wall_s"] + kept)) < 1e-6

    # A finished run is reused as it is, the earlier job's training still counted.
    runs = accuracy.Runs(_config(tmp_path), workdir, "csv", parallel=1)
    assert runs.finished_before("m") == second

    # Kept: a job with a keep directory copies the finished run there (result and ranks, compressed),
    # and a job on a fresh machine, with an empty work directory, reuses it without training.
    keep = tmp_path / "keep"
    runs = accuracy.Runs(_config(tmp_path), workdir, "csv", parallel=1, keep=keep)
    runs.add("m", ["--trainer.max_epochs", "2"])
    assert runs.finish()["m"] == second
    assert json.loads((keep / "m.json").read_text())["best"] == "checkpoints/m/best-d16.ckpt"  # no machine path
    users, ranks = runs.ranks("m")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    runs = accuracy.Runs(_config(tmp_path), fresh, "csv", parallel=1, keep=keep)
    runs.add("m", ["--trainer.max_epochs", "2"])
    assert runs.finish()["m"] == {**second, "best": "checkpoints/m/best-d16.ckpt"}
    assert not (fresh / "m.log").exists()  # nothing trained
    kept_users, kept_ranks = runs.ranks("m")
    assert np.array_equal(kept_users, users) and np.array_equal(kept_ranks, ranks)
    assert kept_ranks.dtype.itemsize < ranks.dtype.itemsize  # stored small


def test_the_report_names_the_commit_of_the_checkout_that_wrote_it(tmp_path):
    """A report records the commit whose configs its command read; outside a git checkout, none."""
    from recsys.reporting import git_commit

    commit = git_commit(BENCH.parent)
    assert commit is not None and len(commit) == 40 and int(commit, 16) >= 0
    assert git_commit(tmp_path) is None
