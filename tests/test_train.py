"""`python -m recsys.train` end to end into a temporary MLflow store."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from recsys.model import MatryoshkaRecommender
from recsys.nn.nested import cut_to_size
from recsys.train import main, run

SIZES = [8, 16, 32]


def _args(tmp_path, *extra):
    return [
        "--model.sizes", json.dumps(SIZES),
        "--data.synthetic.num_users", "150",
        "--data.synthetic.num_items", "120",
        "--data.synthetic_cache_dir", str(tmp_path / "synthetic"),
        "--data.max_len", "20",
        "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--mlflow.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
        "--mlflow.artifact_location", str(tmp_path / "artifacts"),
        "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    result = run(_args(tmp, "--model.monitor_size", "mean"))
    return tmp, result


def test_run_records_every_size_and_one_model_per_size(trained):
    tmp, result = trained
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    r = client.get_run(result["run_id"])
    for s in SIZES:
        for name in ("ndcg_10", "recall_10", "ndcg_20", "mrr"):
            assert f"test/{name}/d{s}" in r.data.metrics
            assert f"val/{name}/d{s}" in r.data.metrics
    assert result["epochs"] == 1 and result["best_val"] == pytest.approx(r.data.metrics["val/monitor"])
    # --model.monitor_size mean: early stopping and the best checkpoint follow the mean over sizes
    mean = np.mean([r.data.metrics[f"val/ndcg_10/d{s}"] for s in SIZES])
    assert r.data.metrics["val/monitor"] == pytest.approx(mean, abs=1e-6)
    assert r.data.params["model.sizes"] == json.dumps(SIZES)
    assert r.data.params["model.encoder"] == "lru"
    (stats_file,) = (tmp / "synthetic").rglob("stats.json")
    assert int(r.data.tags["data.users"]) == json.loads(stats_file.read_text())["users"]
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"accuracy_vs_size.png", "results.md", "results.json", "config.yaml", "checkpoints"} <= artifacts
    models = mlflow.search_logged_models(experiment_ids=[r.info.experiment_id], output_format="list")
    by_name = {m.name: m for m in models}
    assert set(by_name) == {f"d{s}" for s in SIZES}
    for s in SIZES:
        assert by_name[f"d{s}"].params["size"] == str(s)
        linked = {m.key for m in by_name[f"d{s}"].metrics}
        assert f"test/ndcg_10/d{s}" in linked and f"test/recall_10/d{s}" in linked
        assert not any(k.endswith(f"/d{t}") for k in linked for t in SIZES if t != s)


def test_logged_model_scores_exactly_like_the_checkpoint_cut_to_its_size(trained):
    tmp, result = trained
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    full = MatryoshkaRecommender.from_checkpoint(result["best"]).eval()
    ids = full.catalogue["item_ids"]
    histories = [ids[:4], ids[10:13]]
    for s in (8, 32):
        pyfunc = mlflow.pyfunc.load_model(result["model_uris"][s])
        out = pyfunc.predict(pd.DataFrame({"history": histories}), params={"k": 5})
        small = cut_to_size(full.net, s)
        with torch.no_grad():
            z = small.item_matrix()
            batch = torch.zeros(2, 20, dtype=torch.long)
            for i, h in enumerate(histories):
                batch[i, -len(h):] = torch.tensor([ids.index(x) + 1 for x in h])
            scores = small.user_vectors(batch, z) @ z[1:].T
        for i, h in enumerate(histories):
            scores[i, [ids.index(x) for x in h]] = -torch.inf
            top = scores[i].topk(5)
            assert list(out["item_ids"][i]) == [ids[j] for j in top.indices.tolist()]
            np.testing.assert_allclose(out["scores"][i], top.values.numpy(), rtol=1e-4, atol=1e-5)


def test_resume_continues_the_same_run_and_step_count(trained, tmp_path):
    tmp, first = trained
    last = tmp / "ckpt" / "last.ckpt"
    step_before = torch.load(last, weights_only=True)["global_step"]
    second = run(_args(tmp, "--trainer.max_epochs", "2", "--ckpt_path", str(last), "--mlflow.log_models", "false"))
    assert second["run_id"] == first["run_id"]
    step_after = torch.load(tmp / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert step_after == 2 * step_before
    history = MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_metric_history(first["run_id"], "val/monitor")
    assert len(history) == 2 and history[1].step > history[0].step


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model.sizes", "[32, 16]"], "--model.sizes: sizes must be strictly increasing"),
        (["--model.sizes", "[8, 8, 16]"], "strictly increasing"),
        (["--model.encoder", "gru"], "unknown encoder 'gru'; choose one of lru, mamba, sasrec"),
        (["--data.data_dir", "no/such/dir"], "--data.data_dir no/such/dir: no such directory"),
        (["--model.monitor_size", "12"], "--model.monitor_size 12 is neither one of --model.sizes"),
        (["--model.loss_weights", "[1.0]"], "--model.loss_weights has 1 entries for 3 sizes"),
        (["--mlflow.tracking_uri", "http://127.0.0.1:9"], "does not answer"),
    ],
)
def test_invalid_settings_fail_before_training(tmp_path, capsys, extra, message):
    args = _args(tmp_path, *extra)
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_plain_runner_trains_without_mlflow_like_the_cli(tmp_path):
    """bench/plain_train.py (for machines without MLflow) reads the same settings and reports every size."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from plain_train import run as plain_run

    result = plain_run(_args(tmp_path, "--model.monitor_size", "mean"))
    assert [r["size"] for r in result["rows"]] == SIZES
    assert result["epochs"] == 1 and 0 < result["best_val"] < 1
    curves = pd.read_csv(tmp_path / "ckpt" / "metrics.csv")
    val = curves.dropna(subset=["val/monitor"]).iloc[-1]
    assert val["val/monitor"] == pytest.approx(np.mean([val[f"val/ndcg_10/d{s}"] for s in SIZES]), abs=1e-6)
    assert not (tmp_path / "mlflow.db").exists()


def _start_run_at_the_barrier(uri, barrier, skip_prepare):
    import recsys.tracking as tracking

    if skip_prepare:  # to show that the race is real
        tracking.prepare_store = lambda settings: None
    barrier.wait()
    logger = tracking.make_logger(tracking.MLflowSettings(tracking_uri=uri, experiment="together"))
    assert logger.run_id


def _start_together(uri, n, skip_prepare=False):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_start_run_at_the_barrier, args=(uri, barrier, skip_prepare)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [p.exitcode for p in procs]


def test_runs_started_together_on_a_new_store_all_start(tmp_path):
    """Several trainings started at once on a new sqlite store: one migrates it and creates the
    experiment, the others wait, and every run starts."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert _start_together(uri, 4) == [0, 0, 0, 0]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("together")
    assert len(client.search_runs([experiment.experiment_id])) == 4
