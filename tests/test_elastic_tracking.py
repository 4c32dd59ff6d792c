"""An elastic training run end to end: metrics, costs, heat map and one logged model per triple."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import serving
from recsys.model import MatryoshkaRecommender
from recsys.nn.grid import Triple
from recsys.train import run
from tests.test_train import SIZES, _args

PAIRS = [[8, 8], [32, 8], [16, 16], [32, 32]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import recsys.export

    tmp = tmp_path_factory.mktemp("elastic")
    reads = []
    load_trained = recsys.export.load_trained
    with pytest.MonkeyPatch.context() as patch:  # count the checkpoint reads of the models' export
        patch.setattr(recsys.export, "load_trained", lambda path: reads.append(path) or load_trained(path))
        result = run(_args(tmp, "--model.depths", "[1, 2]", "--model.pairs", json.dumps(PAIRS), "--model.grid", "full",
                           "--trainer.log_every_n_steps", "2"))
    return tmp, {**result, "checkpoint_reads": reads}


def test_an_elastic_run_records_every_triple(trained):
    tmp, result = trained
    labels = [Triple(d, w, s).label for d in (1, 2) for w, s in PAIRS]
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    r = client.get_run(result["run_id"])
    for label in labels:
        for name in ("ndcg_10", "recall_10", "mrr"):
            assert f"test/{name}/{label}" in r.data.metrics and f"val/{name}/{label}" in r.data.metrics
        for cost in ("parameters", "encode_ms_per_1k", "retrieval_flops_per_user"):
            assert f"{cost}/{label}" in r.data.metrics
    mean = np.mean([r.data.metrics[f"val/ndcg_10/{label}"] for label in labels])
    assert r.data.metrics["val/monitor"] == pytest.approx(mean, abs=1e-6)
    rows = {row["triple"]: row for row in result["rows"]}
    assert sorted(rows) == sorted(labels)
    assert rows["L1_w32_d32"]["retrieval_flops_per_user"] == 4 * rows["L1_w32_d8"]["retrieval_flops_per_user"]
    assert rows["L1_w8_d8"]["parameters"] < rows["L1_w32_d8"]["parameters"] < rows["L2_w32_d8"]["parameters"]
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"ndcg_grid.png", "results.md", "results.json", "test_ranks.parquet"} <= artifacts
    assert "ndcg_grid.png" in r.data.tags["mlflow.note.content"]
    models = {m.name: m for m in mlflow.search_logged_models(experiment_ids=[r.info.experiment_id], output_format="list")}
    assert set(models) == set(labels)
    assert result["checkpoint_reads"] == [result["best"]]  # every triple exported from one reading of it
    for label in labels:
        row = rows[label]
        assert models[label].params == {"depth": str(row["depth"]), "width": str(row["width"]), "size": str(row["size"]),
                                        "parameters": str(row["parameters"]), "encoder": "lru"}
        linked = {m.key: m.value for m in models[label].metrics}
        assert linked[f"test/ndcg_10/{label}"] == pytest.approx(r.data.metrics[f"test/ndcg_10/{label}"])


def test_a_logged_triple_scores_like_the_checkpoint_cut_to_it(trained, tmp_path):
    tmp, result = trained
    model = MatryoshkaRecommender.from_checkpoint(result["best"]).eval()
    triple = Triple(1, 32, 8)
    local = mlflow.artifacts.download_artifacts(artifact_uri=result["model_uris"][triple.label], dst_path=str(tmp_path))
    [manifest] = list(Path(local).rglob("manifest.json"))
    served = serving.load(manifest.parent)
    batch = torch.tensor([[0, 0, 3, 5, 7], [0, 0, 0, 0, 2]])
    with torch.no_grad():
        expected = model.cut_triple(triple).user_vectors(batch)
    got = served.encode_rows([[3, 5, 7], [2]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    row = next(r for r in result["rows"] if r["triple"] == triple.label)
    assert row["retrieval_flops_per_user"] == 2 * len(served.item_ids) * triple.size
