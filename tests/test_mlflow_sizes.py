"""Choosing a size in MLflow: one child run per size under the training run, and
``python -m recsys.register`` to register one size and point an alias at it.

The run is built without training: an untrained model's checkpoint, exported at three sizes and
logged the way ``recsys.train`` logs them (``recsys.logged_models.log_size_models``), with made-up rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import serving
from recsys.item_features import ItemFeatures
from recsys.model import MatryoshkaRecommender
from recsys.register import main as register_main
from recsys.export import export_sizes
from recsys.logged_models import log_size_models
from recsys.register import register_size
from recsys.tracking import (
    PARENT_RUN_TAG,
    SIZE_RUN_TAG,
    log_size_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
SIZES = [8, 16, 32]
N = 30
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _rows(sizes=SIZES) -> list[dict]:
    return [{"size": s, "parameters": 1000 * s + 7, "ndcg_10": 0.1 + 0.01 * i, "recall_10": 0.2 + 0.01 * i,
             "ndcg_20": 0.15 + 0.01 * i, "recall_20": 0.3 + 0.01 * i, "mrr": 0.05 + 0.01 * i, "encode_ms_per_1k": 1.5 + i}
            for i, s in enumerate(sizes)]


def _training_run(client: MlflowClient, experiment_id: str, name: str = "lru d8-32 synthetic") -> str:
    return client.create_run(experiment_id, run_name=name, tags={"mlflow.user": "someone"}).info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with one training run whose sizes are logged with their models, as recsys.train does."""
    tmp = tmp_path_factory.mktemp("sizes")
    torch.manual_seed(0)
    model = MatryoshkaRecommender(item_features=ItemFeatures(num_items=N, dense={}, bags={}), sizes=SIZES, max_len=10,
                                  use_id_embedding=True).eval()
    checkpoint = tmp / "model.ckpt"
    catalogue = {"item_ids": [f"item-{i}" for i in range(1, N + 1)], "popularity": list(range(N, 0, -1)), "stats": {}}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "catalogue": catalogue}, checkpoint)
    exports = dict(zip(SIZES, export_sizes(checkpoint, SIZES, tmp / "exports")))
    uri = f"sqlite:///{tmp}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(uri)
        experiment_id = client.create_experiment("recsys", artifact_location=str(tmp / "artifacts"))
        run_id = _training_run(client, experiment_id)
        uris = log_size_models(run_id, exports, _rows(), register_as=None)
        yield {"tmp": tmp, "uri": uri, "client": client, "experiment_id": experiment_id, "run_id": run_id, "model_uris": uris}
    finally:
        mlflow.set_tracking_uri(previous)


def _children(client: MlflowClient, experiment_id: str, run_id: str) -> dict:
    runs = client.search_runs([experiment_id], f"tags.{PARENT_RUN_TAG} = '{run_id}'")
    return {r.info.run_name: r for r in runs}


def test_each_size_is_a_child_run_with_its_size_costs_test_metrics_and_model(store):
    client, run_id = store["client"], store["run_id"]
    children = _children(client, store["experiment_id"], run_id)
    assert set(children) == {"d8", "d16", "d32"}
    for row in _rows():
        child = children[f"d{row['size']}"]
        assert child.info.status == "FINISHED"
        assert child.data.tags[PARENT_RUN_TAG] == run_id and child.data.tags[SIZE_RUN_TAG] == f"d{row['size']}"
        assert child.data.tags["mlflow.user"] == "someone"  # the training run's user and source columns
        assert child.data.params == {"size": str(row["size"])}
        assert child.data.metrics == pytest.approx({
            "sizes/parameters": row["parameters"], "sizes/encode_ms_per_1k": row["encode_ms_per_1k"],
            **{f"sizes/test_{k}": row[k] for k in ("ndcg_10", "recall_10", "ndcg_20", "recall_20", "mrr")},
        })
        # its model is the size's run's own: the runs table shows it on the size's row
        (model,) = mlflow.search_logged_models(experiment_ids=[store["experiment_id"]], output_format="list",
                                               filter_string=f"source_run_id = '{child.info.run_id}'")
        assert model.name == f"d{row['size']}" and model.model_uri == store["model_uris"][row["size"]]
        assert [o.model_id for o in child.outputs.model_outputs] == [model.model_id]
    assert len({c.data.tags["mlflow.runColor"] for c in children.values()}) == 3  # no two sizes share a colour
    # the runs table lists the newest first: the smallest size on top
    assert sorted(children, key=lambda n: -children[n].info.start_time) == ["d8", "d16", "d32"]


def test_the_training_run_keeps_its_metrics_and_lists_every_sizes_model(store):
    client, run_id = store["client"], store["run_id"]
    run = client.get_run(run_id)
    assert PARENT_RUN_TAG not in run.data.tags and not run.data.params
    ndcg = client.get_metric_history(run_id, "test/ndcg_10")
    assert sorted((m.step, m.value) for m in ndcg) == [(r["size"], pytest.approx(r["ndcg_10"])) for r in _rows()]
    assert not any(k.startswith("sizes/") for k in run.data.metrics)  # the sizes' names are the children's only
    models = {client.get_logged_model(o.model_id).name for o in run.outputs.model_outputs}
    assert models == {"d8", "d16", "d32"}
    for s in SIZES:  # the model list's columns, as before: size, parameters, encoder; linked test metrics
        model = client.get_logged_model(store["model_uris"][s].removeprefix("models:/"))
        assert model.params == {"size": str(s), "parameters": str(1000 * s + 7), "encoder": "lru"}
        assert {m.key for m in model.metrics} >= {"test/ndcg_10", "test/recall_10"} and all(m.step == s for m in model.metrics)


def test_sizes_without_models_and_a_resumed_run_keep_one_child_per_size(store):
    """--mlflow.log_models false logs the children too; a resumed run logging its results again
    reuses them (their metrics' latest values are the new ones)."""
    client = store["client"]
    run_id = _training_run(client, store["experiment_id"], "no models")
    log_size_metrics(client, run_id, _rows([16, 64]), {})
    again = [{**row, "ndcg_10": 0.9} for row in _rows([16, 64])]
    log_size_metrics(client, run_id, again, {})
    children = _children(client, store["experiment_id"], run_id)
    assert set(children) == {"d16", "d64"}
    assert children["d64"].data.metrics["sizes/test_ndcg_10"] == pytest.approx(0.9)
    assert not children["d64"].outputs.model_outputs


def test_a_grid_run_has_one_child_per_trained_triple(store, capsys):
    client = store["client"]
    run_id = _training_run(client, store["experiment_id"], "grid")
    rows = [{"triple": f"L{d}_w{w}_d{s}", "depth": d, "width": w, "size": s, "parameters": 100 * d * w, "ndcg_10": 0.1 * d,
             "recall_10": 0.2, "ndcg_20": 0.1, "recall_20": 0.3, "mrr": 0.05, "encode_ms_per_1k": 1.0,
             "retrieval_flops_per_user": 2 * N * s} for d in (1, 2) for w, s in ((16, 8), (16, 16))]
    log_size_metrics(client, run_id, rows, {})
    children = _children(client, store["experiment_id"], run_id)
    assert set(children) == {r["triple"] for r in rows}
    for row in rows:
        child = children[row["triple"]]
        assert child.data.params == {"depth": str(row["depth"]), "width": str(row["width"]), "size": str(row["size"])}
        assert child.data.metrics["sizes/retrieval_flops_per_user"] == row["retrieval_flops_per_user"]
        assert child.data.metrics["sizes/test_ndcg_10"] == pytest.approx(row["ndcg_10"])
    assert f"test/ndcg_10/{rows[0]['triple']}" in client.get_run(run_id).data.metrics  # the training run's, as before
    # a grid's sizes are its triples; this one logged no models
    args = ["--run-id", run_id, "--name", "shop", "--tracking-uri", store["uri"]]
    assert register_main([*args, "--size", "8"]) == 2
    assert "has no size d8; its sizes: L1_w16_d8, L1_w16_d16, L2_w16_d8, L2_w16_d16\n" in capsys.readouterr().err
    assert register_main([*args, "--size", "L2_w16_d8"]) == 2
    assert f"--run-id {run_id} --depth 2 --width 16 --dims 8 --out exports/\n" in capsys.readouterr().err


def _export_size(model_uri: str, work: Path) -> int:
    from serving.rest import resolve_model  # what `make serve MODEL=models:/...` does

    return serving.load(resolve_model(model_uri, work)).size


def test_register_points_the_alias_at_the_chosen_sizes_model(store, tmp_path):
    client, run_id, uri = store["client"], store["run_id"], store["uri"]
    assert register_size(run_id, "16", "shop", "champion", uri) == "models:/shop@champion"
    version = client.get_model_version_by_alias("shop", "champion")
    assert version.source == store["model_uris"][16]
    assert version.run_id == _children(client, store["experiment_id"], run_id)["d16"].info.run_id
    assert _export_size("models:/shop@champion", tmp_path / "a") == 16
    # again: the same version; another size (through its own run's id, as d32): the alias moves
    assert register_size(run_id, "d16", "shop", "champion", uri) == "models:/shop@champion"
    assert len(client.search_model_versions("name = 'shop'")) == 1
    d32 = _children(client, store["experiment_id"], run_id)["d32"].info.run_id
    assert register_size(d32, "32", "shop", "champion", uri) == "models:/shop@champion"
    assert str(client.get_model_version_by_alias("shop", "champion").version) == "2"
    assert _export_size("models:/shop@champion", tmp_path / "b") == 32


def test_the_register_command_prints_the_uri_alone(store):
    done = subprocess.run(
        [sys.executable, "-m", "recsys.register", "--run-id", store["run_id"], "--size", "8", "--name", "shop.small",
         "--alias", "candidate", "--tracking-uri", store["uri"]],
        capture_output=True, text=True, env=ENV, cwd=store["tmp"], timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "models:/shop.small@candidate\n"
    assert "d8 of run 'lru d8-32 synthetic' is version 1 of shop.small, and @candidate points at it" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--run-id", "0123456789abcdef0123456789abcdef"], "--run-id 0123456789abcdef0123456789abcdef: no such run in sqlite:///"),
        (["--run-id", "../etc"], "--run-id ../etc: no such run in sqlite:///"),
        (["--size", "64"], "--size 64: run 'lru d8-32 synthetic' (RUN) has no size d64; its sizes: d8, d16, d32"),
        (["--size", "big"], "--size 'big': give a size such as 64 or d64 (or a grid's triple such as L2_w128_d64)"),
        (["--name", "my recs"], "--name 'my recs': a model name here holds letters, digits, '.', '_' and '-' only"),
        (["--name", "shop/d64"], "--name 'shop/d64': a model name here holds"),
        (["--alias", "latest"], "--alias 'latest': an alias holds letters, digits, '_' and '-' only"),
        (["--alias", "v2"], "--alias 'v2': an alias holds"),
        (["--tracking-uri", "sqlite:///elsewhere/mlflow.db"], "the MLflow store sqlite:///elsewhere/mlflow.db: elsewhere/mlflow.db: no such file"),
    ],
)
def test_a_bad_input_is_one_line_and_status_2(store, capsys, args, message):
    given = {"--run-id": store["run_id"], "--size": "16", "--name": "shop", "--tracking-uri": store["uri"]}
    given.update(dict(zip(args[::2], args[1::2])))
    code = register_main([x for kv in given.items() for x in kv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert message.replace("RUN", store["run_id"]) in err, err
    assert not Path("elsewhere").exists()  # no empty store was made


def test_a_store_that_is_not_a_database_is_one_line(store, tmp_path, capsys):
    (tmp_path / "notes.db").write_text("not a database")
    uri = f"sqlite:///{tmp_path}/notes.db"
    code = register_main(["--run-id", store["run_id"], "--size", "16", "--name", "shop", "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: the MLflow store {uri} cannot be used (file is not a database); give the store " \
        "the training recorded to with --tracking-uri or MLFLOW_TRACKING_URI\n"


def test_a_size_without_a_logged_model_says_how_to_export_it(store, capsys):
    client = store["client"]
    run_id = _training_run(client, store["experiment_id"], "no models")
    log_size_metrics(client, run_id, _rows([16]), {})
    code = register_main(["--run-id", run_id, "--size", "16", "--name", "shop", "--tracking-uri", store["uri"]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert (f"size d16 of run 'no models' has no logged model (it was trained with --mlflow.log_models false); export it "
            f"instead: python -m recsys.export --run-id {run_id} --dims 16 --out exports/") in err


def test_register_help_answers_without_mlflow_and_is_a_console_command():
    probe = textwrap.dedent("""
        import json, runpy, sys
        sys.argv = ["recsys.register", "--help"]
        try:
            runpy.run_module("recsys.register", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
        print(json.dumps({"code": code, "heavy": sorted(h for h in ("mlflow", "torch") if h in sys.modules)}))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    *shown, last = done.stdout.splitlines()
    assert json.loads(last) == {"code": 0, "heavy": []}
    assert "python -m recsys.register" in "\n".join(shown) and "--alias" in "\n".join(shown)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["recsys-register"] == "recsys.register:main"
