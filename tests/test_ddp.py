"""Two CPU processes (DDP over gloo): test metrics cover every user exactly once."""

import os
import subprocess

import lightning as L
import pytest
from mlflow.tracking import MlflowClient

from recsys.data import SequenceDataModule
from recsys.model import MatryoshkaRecommender

from synthetic_runs import SIZES, small_run_args  # tests/ is on the path


def test_two_process_metrics_equal_single_process_evaluation(tmp_path):
    cache = tmp_path / "synthetic"
    args = small_run_args(
        cache,
        "--trainer.devices", "2",
        "--trainer.strategy", "ddp",
        "--mlflow.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
        "--mlflow.artifact_location", str(tmp_path / "artifacts"),
        "--mlflow.log_models", "false",
        "--checkpoint.dirpath", str(tmp_path / "ckpt"),
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    # the training run (its sizes are child runs of it)
    (run,) = client.search_runs([client.get_experiment_by_name("recsys").experiment_id], "tags.mlflow.parentRunId IS NULL")
    logged = run.data.metrics

    # the same best checkpoint evaluated in one process
    model = MatryoshkaRecommender.from_checkpoint(tmp_path / "ckpt" / "best.ckpt")
    (prepared,) = [p.parent for p in cache.rglob("stats.json")]
    data = SequenceDataModule(data_dir=str(prepared), max_len=16, eval_batch_size=16)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.test(model, datamodule=data, verbose=False)
    single = model.last_test_metrics
    assert single["count"] == data.num_users
    for s in SIZES:
        for key in (f"ndcg_10/d{s}", f"recall_10/d{s}", f"mrr/d{s}"):
            assert logged[f"test/{key}"] == pytest.approx(single[key], abs=1e-6), key
