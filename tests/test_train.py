"""`python -m recsys.train` end to end: into a temporary MLflow store, and with --tracking csv."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from recsys.metrics import ndcg_of_ranks
from recsys.model import MatryoshkaRecommender
from recsys.nn.encoders import MambaOptions, OptionError
from recsys.nn.nested import cut_to_size
from recsys.reporting import results_table
from recsys.tracking import MLflowSettings, default_run_name, make_logger, run_url
from recsys.train import main, run

ROOT = Path(__file__).resolve().parents[1]

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
    # train/loss is logged once, at step 1 (a step-0 metric would be linked to every logged model)
    result = run(_args(tmp, "--model.monitor_size", "mean", "--trainer.log_every_n_steps", "2"))
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
    # each size's best validation NDCG@10 and its epoch (the sizes of one run peak at different epochs)
    assert {label: value for label, (value, _) in result["best_val_by_size"].items()} == pytest.approx(
        {f"d{s}": r.data.metrics[f"val/ndcg_10/d{s}"] for s in SIZES})
    assert {epoch for _, epoch in result["best_val_by_size"].values()} == {0}
    assert r.data.params["model.sizes"] == json.dumps(SIZES)
    assert r.data.params["model.encoder"] == "lru"
    (stats_file,) = (tmp / "synthetic").rglob("stats.json")
    assert int(r.data.tags["data.users"]) == json.loads(stats_file.read_text())["users"]
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"accuracy_vs_size.png", "results.md", "results.json", "test_ranks.parquet", "config.yaml", "checkpoints"} <= artifacts
    models = mlflow.search_logged_models(experiment_ids=[r.info.experiment_id], output_format="list")
    by_name = {m.name: m for m in models}
    assert set(by_name) == {f"d{s}" for s in SIZES}
    rows = {row["size"]: row for row in result["rows"]}
    for s in SIZES:
        # the experiment's model list compares the sizes: the same columns for every model
        model = by_name[f"d{s}"]
        assert model.params == {"size": str(s), "parameters": str(rows[s]["parameters"]), "encoder": "lru"}
        linked = {m.key: m for m in model.metrics}
        assert {"test/ndcg_10", "test/recall_10", "test/mrr", "test/encode_ms_per_1k"} <= set(linked)
        assert linked["test/ndcg_10"].value == pytest.approx(r.data.metrics[f"test/ndcg_10/d{s}"])
        assert all(m.step == s for m in model.metrics)


def test_run_is_named_after_what_it_trained_and_its_page_compares_the_sizes(trained):
    """Its name says encoder, sizes, data and start time (MLflow's own random names repeat: the
    training seeds Python's random first); its description is the per-size table and the plot;
    its size-free metrics at step = size are the charts of each result against size."""
    tmp, result = trained
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    r = client.get_run(result["run_id"])
    assert re.fullmatch(r"lru d8-32 synthetic \d\d-\d\d \d\d:\d\d:\d\d", r.info.run_name), r.info.run_name
    description = r.data.tags["mlflow.note.content"]
    assert results_table(result["rows"]) in description
    assert f"get-artifact?path=accuracy_vs_size.png&run_uuid={result['run_id']}" in description
    ndcg = client.get_metric_history(result["run_id"], "test/ndcg_10")
    assert sorted((m.step, m.value) for m in ndcg) == [(s, pytest.approx(r.data.metrics[f"test/ndcg_10/d{s}"])) for s in SIZES]
    parameters = client.get_metric_history(result["run_id"], "parameters")
    assert sorted((m.step, int(m.value)) for m in parameters) == [(row["size"], row["parameters"]) for row in result["rows"]]


def test_default_run_names_and_run_addresses():
    started = time.mktime((2026, 12, 2, 7, 6, 38, 0, 0, -1))
    assert default_run_name("mamba", [16, 32, 64], "ml-1m", started) == "mamba d16-64 ml-1m 12-02 07:06:38"
    assert default_run_name("sasrec", [64], "synthetic", started) == "sasrec d64 synthetic 12-02 07:06:38"
    # a local store is shown by `make ui`; a tracking server shows its own runs; both on the training pages
    assert run_url("sqlite:///mlflow.db", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert run_url("http://tracking:8080/", "3", "abc") == "http://tracking:8080/#/experiments/3/runs/abc?workflowType=machine_learning"


def test_a_given_run_name_wins_over_the_default(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    given = make_logger(MLflowSettings(tracking_uri=uri, run_name="mine"), run_name="lru d8-32 synthetic")
    default = make_logger(MLflowSettings(tracking_uri=uri), run_name="lru d8-32 synthetic")
    client = MlflowClient(uri)
    assert client.get_run(given.run_id).info.run_name == "mine"
    assert client.get_run(default.run_id).info.run_name == "lru d8-32 synthetic"


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
    second = run(_args(tmp, "--model.monitor_size", "mean", "--trainer.max_epochs", "2", "--ckpt_path", str(last),
                       "--mlflow.log_models", "false"))
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
        (["--model.r_min", "0.5", "--model.r_max", "0.2"], "--model.lru.r_min 0.5, --model.lru.r_max 0.2: need 0 <= r_min"),
        (["--model.encoder", "sasrec", "--model.sasrec.n_heads", "3"], "--model.sasrec.n_heads 3 must divide the width 32"),
        (["--run_dir", "runs/x"], "--run_dir runs/x: only used with --tracking csv"),
    ],
)
def test_invalid_settings_fail_before_training(tmp_path, capsys, extra, message):
    args = _args(tmp_path, *extra)
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_passes_the_option_checks(config, tmp_path, capsys):
    """The options of every config a user is pointed to pass the model's checks: the data directory,
    given as one that does not exist, is the first thing refused (it is checked after them)."""
    missing = tmp_path / "no-data"
    assert main(["--config", str(config), "--data.data_dir", str(missing)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"--data.data_dir {missing}: no such directory; prepare one with "
        "`python -m recsys.data prepare --interactions FILE --items FILE --out DIR`")


# Runs recsys.train with MLflow made unimportable: any `import mlflow` fails the run.
WITHOUT_MLFLOW = "import sys; sys.modules['mlflow'] = None; from recsys.train import main; sys.exit(main(sys.argv[1:]))"


def test_csv_tracking_records_the_same_metrics_as_mlflow_without_importing_it(trained, tmp_path):
    """--tracking csv (for machines without MLflow): the same settings (--mlflow.* accepted and
    ignored), the same metric names in metrics.csv, and for the same seed the same numbers as the
    MLflow run of the same settings; results, config and checkpoints go to the run directory."""
    mlflow_tmp, mlflow_result = trained
    run_dir = tmp_path / "run"
    args = _args(tmp_path, "--model.monitor_size", "mean", "--trainer.log_every_n_steps", "2",
                 "--tracking", "csv", "--run_dir", str(run_dir))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", WITHOUT_MLFLOW, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert {"metrics.csv", "config.yaml", "run.json", "results.md", "results.json", "accuracy_vs_size.png",
            "test_ranks.parquet"} <= {p.name for p in run_dir.iterdir()}
    assert (tmp_path / "ckpt" / "best.ckpt").is_file()  # --checkpoint.dirpath still decides

    curves = pd.read_csv(run_dir / "metrics.csv")
    val = curves.dropna(subset=["val/monitor"]).iloc[-1]
    assert val["val/monitor"] == pytest.approx(np.mean([val[f"val/ndcg_10/d{s}"] for s in SIZES]), abs=1e-6)
    client = MlflowClient(f"sqlite:///{mlflow_tmp}/mlflow.db")
    logged = client.get_run(mlflow_result["run_id"]).data.metrics
    # the size-free metrics at step = size are the MLflow run page's charts against size (and its
    # models' columns); everything else is the training's own
    lightning_names = {k for k in logged if k != "parameters" and not re.fullmatch(r"test/[a-z_0-9]+", k)}
    assert set(curves.columns) - {"step"} == lightning_names
    assert {"train/loss", "val/ndcg_10/d32", "test/ndcg_10/d32", "test/mrr/d8"} <= lightning_names
    test = curves.dropna(subset=["test/ndcg_10/d8"]).iloc[-1]
    for key, value in mlflow_result["test_metrics"].items():  # what the MLflow run tested (before any resume)
        if key != "count":
            assert test[f"test/{key}"] == pytest.approx(value, abs=1e-6), key
    for key in (k for k in lightning_names if k.startswith("val/")):  # its first epoch
        first = min(client.get_metric_history(mlflow_result["run_id"], key), key=lambda m: m.step)
        assert val[key] == pytest.approx(first.value, abs=1e-6), key
    # every test user once, and the per-user ranks give back the test metrics
    ranks = pd.read_parquet(run_dir / "test_ranks.parquet")
    assert list(ranks.columns) == ["user", *[f"rank_d{s}" for s in SIZES]]
    assert ranks["user"].is_unique and len(ranks) == int(mlflow_result["test_metrics"]["count"])
    for s in SIZES:
        assert ndcg_of_ranks(ranks[f"rank_d{s}"].to_numpy()).mean() == pytest.approx(test[f"test/ndcg_10/d{s}"], abs=1e-6)
    rows = json.loads((run_dir / "results.json").read_text())
    assert [r["size"] for r in rows] == SIZES
    for mine, theirs in zip(rows, mlflow_result["rows"]):
        assert mine["ndcg_10"] == pytest.approx(theirs["ndcg_10"], abs=1e-6)
        assert mine["parameters"] == theirs["parameters"]


def test_csv_run_directory_defaults_to_the_next_version_and_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a for a in _args(tmp_path) if a not in ("--checkpoint.dirpath", str(tmp_path / "ckpt"))]
    first = run([*args, "--tracking", "csv", "--mlflow.log_models", "true"])
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert Path(first["run_dir"]).resolve() == run_dir.resolve() and first["run_id"] is None
    assert Path(first["best"]).resolve() == (run_dir / "checkpoints" / f"best-d{SIZES[-1]}.ckpt").resolve()  # each size its own
    assert "model_uris" not in first  # no logged models without MLflow
    last, curves_before = run_dir / "checkpoints" / "last.ckpt", (run_dir / "metrics.csv").read_bytes()
    checkpoint_before = last.read_bytes()
    # a refused resume (other settings) leaves the run directory as it was
    assert main([*args, "--tracking", "csv", "--trainer.max_epochs", "2", "--ckpt_path", str(last), "--model.lr", "0.5"]) == 2
    assert (run_dir / "metrics.csv").read_bytes() == curves_before and last.read_bytes() == checkpoint_before
    second = run([*args, "--tracking", "csv", "--trainer.max_epochs", "2", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    assert Path(second["run_dir"]).resolve() == run_dir.resolve()  # the same directory, not version_1
    curves = pd.read_csv(run_dir / "metrics.csv")
    assert curves["val/monitor"].notna().sum() == 2 and not (tmp_path / "lightning_logs" / "version_1").exists()


def test_flat_encoder_options_still_accepted_on_the_command_line_and_in_config_files(tmp_path, capsys):
    """--model.r_min (and r_min: under model: in a config file) mean --model.lru.r_min."""
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  encoder: lru\n  r_min: 0.7\n  r_max: 0.9\n  n_heads: 4\n")
    with pytest.raises(SystemExit) as exit_:
        run(["--config", str(old), "--model.r_max=0.95", "--model.d_state", "8", "--print_config"])
    assert exit_.value.code == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["lru"] == {"r_min": 0.7, "r_max": 0.95, "post_norm": False, "ffn": "gated", "ffn_mult": 2}
    assert model["mamba"]["d_state"] == 8 and model["sasrec"] == {"n_heads": 4}
    assert not set(model) & {"r_min", "r_max", "d_state", "n_heads"}


def test_checkpoint_with_flat_encoder_options_loads(trained, tmp_path):
    """Checkpoints written before the options were grouped (flat r_min, d_state, n_heads, ... in
    hyper_parameters) load through from_checkpoint, to the same network and export options."""
    _, result = trained
    ckpt = torch.load(result["best"], weights_only=True)
    hparams = dict(ckpt["hyper_parameters"])
    assert hparams["lru"] == {"r_min": 0.0, "r_max": 0.1, "post_norm": False, "ffn": "gated", "ffn_mult": 2}  # plain dicts
    for group in ("lru", "mamba", "sasrec"):
        hparams.update(hparams.pop(group))
    ckpt["hyper_parameters"] = hparams
    assert {"r_min", "r_max", "d_state", "expand", "n_heads", "max_len"} <= set(hparams)
    torch.save(ckpt, tmp_path / "old.ckpt")
    new, old = MatryoshkaRecommender.from_checkpoint(result["best"]), MatryoshkaRecommender.from_checkpoint(tmp_path / "old.ckpt")
    assert old.encoder_options() == new.encoder_options() == {"n_blocks": 2, "dropout": 0.1, "r_min": 0.0, "r_max": 0.1,
                                                              "nesting": "slices"}
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


@pytest.mark.parametrize(
    "encoder,options,expected",
    [
        ("lru", {"lru": {"r_min": 0.5, "r_max": 0.9}}, {"r_min": 0.5, "r_max": 0.9, "nesting": "slices"}),
        ("mamba", {"mamba": MambaOptions(d_state=4)}, {"d_state": 4, "expand": 2}),
        ("sasrec", {"sasrec": {"n_heads": 4}}, {"n_heads": 4, "max_len": 12}),
    ],
)
def test_encoder_options_are_typed_and_exported_flat(encoder, options, expected):
    from tests.test_item_tower import _features

    model = MatryoshkaRecommender(item_features=_features(), sizes=[8, 16], encoder=encoder, max_len=12, **options)
    assert model.encoder_options() == {"n_blocks": 2, "dropout": 0.1, **expected}  # the manifest's format
    assert all(isinstance(model.hparams[g], dict) for g in ("lru", "mamba", "sasrec"))  # weights_only-loadable


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sizes": [32, 16]}, "sizes: sizes must be strictly increasing, got [32, 16]"),
        ({"lru": {"r_min": 0.5, "r_max": 0.2}}, "lru.r_min 0.5, lru.r_max 0.2: need 0 <= r_min < r_max <= 1"),
        ({"mamba": {"d_state": 0}}, "mamba.d_state must be a positive integer, got 0"),
        ({"encoder": "sasrec", "sasrec": {"n_heads": 3}}, "sasrec.n_heads 3 must divide the width 16"),
        ({"lru": {"radius": 1}}, "lru.radius: unknown option of the lru encoder"),
        ({"lr": -0.001}, "lr must be a finite positive number, got -0.001"),
        ({"lr": float("inf")}, "lr must be a finite positive number, got inf"),
        ({"dropout": 1.5}, "dropout must be a probability in [0, 1), got 1.5"),
        ({"input_dropout": -0.1}, "input_dropout must be a probability in [0, 1), got -0.1"),
        ({"n_blocks": 0}, "n_blocks must be a positive integer, got 0"),
        ({"warmup_steps": 2.5}, "warmup_steps must be a non-negative integer, got 2.5"),
        ({"weight_decay": -1}, "weight_decay must be a finite non-negative number, got -1"),
        ({"loss_block_rows": 0}, "loss_block_rows must be a positive integer, got 0"),
        ({"loss_weights": [0, 0]}, "loss_weights must be finite non-negative numbers, not all 0, got [0, 0]"),
        ({"loss_weights": [1, -1]}, "loss_weights must be finite non-negative numbers, not all 0, got [1, -1]"),
    ],
)
def test_invalid_model_options_are_checked_once_in_the_model(kwargs, message):
    with pytest.raises(OptionError) as error:
        MatryoshkaRecommender(item_features=None, **{"sizes": [8, 16], **kwargs})
    assert str(error.value).startswith(message)


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


def test_a_non_finite_loss_stops_training_with_one_clear_error():
    """NaN in the item features (e.g. a tampered prepared file) must not train on as if nothing happened."""
    from recsys.item_features import ItemFeatures
    from recsys.model import DivergedError

    text = torch.randn(9, 6)
    text[0] = 0.0
    text[3, 2] = float("nan")
    model = MatryoshkaRecommender(item_features=ItemFeatures(num_items=8, dense={"text": text}), sizes=[4, 8])
    batch = {"input_ids": torch.tensor([[0, 1, 3, 5]]), "target_ids": torch.tensor([[0, 3, 5, 2]])}
    with pytest.raises(DivergedError, match=r"the training loss is nan at epoch 0, step 0 .*training stopped"):
        model.training_step(batch, 0)


def test_non_finite_gradients_stop_training_before_the_step(synthetic_prepared, tmp_path):
    """A finite loss with NaN gradients (a backward poisoned further up, here by a hook on the text
    projection) stops training before that step, so no checkpoint of NaN weights is ever written.
    And a NaN item row that the sampled loss never uses (a cold item: its step computes only the rows
    it uses) leaves training finite, but the first validation finds the item vector and stops,
    before any checkpoint too."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from recsys.data import SequenceDataModule
    from recsys.model import DivergedError

    def fit(model, directory):
        checkpoints = ModelCheckpoint(dirpath=directory, monitor="val/monitor", mode="max", save_last=True)
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[checkpoints],
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=dm)

    dm = SequenceDataModule(data_dir=str(synthetic_prepared), max_len=10, batch_size=32)
    model = MatryoshkaRecommender(item_features=dm.item_features, item_counts=dm.item_counts, sizes=[8, 16], max_len=10,
                                  loss="sampled", negatives=16)
    model.net.items.projections["text"].weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(DivergedError, match=r"^the gradients are not finite at epoch 0, step 0 \(in net\.items\..*training stopped$"):
        fit(model, tmp_path / "hook")
    assert not (tmp_path / "hook").exists() or list((tmp_path / "hook").iterdir()) == []

    features = dm.item_features
    cold = int(torch.nonzero(~features.in_training)[1])  # [0] is the padding row
    features.dense["text"][cold, 0] = float("nan")  # after the checks of load_prepared, as a diverged tower would
    model = MatryoshkaRecommender(item_features=features, item_counts=dm.item_counts, sizes=[8, 16], max_len=10,
                                  loss="sampled", negatives=16)
    with pytest.raises(DivergedError, match=r"^1 of \d+ item vectors are not finite in validation at epoch 0"):
        fit(model, tmp_path / "cold")
    assert not (tmp_path / "cold").exists() or list((tmp_path / "cold").iterdir()) == []


def test_a_diverging_run_stops_with_one_line_no_checkpoint_and_a_failed_mlflow_run(tmp_path, capsys):
    """--model.lr 1e30, one step an epoch: the step's loss and gradients are finite, the weights it
    writes are not. Validation refuses to rank with them, so no checkpoint is taken (before: the
    NaN weights became best.ckpt with val/monitor 0.0, and the run failed one step later)."""
    args = _args(tmp_path, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "1", "--model.lr", "1e30", "--model.warmup_steps", "0",
                 "--trainer.gradient_clip_val", "0", "--mlflow.log_models", "false")
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.match(r"error: \d+ of \d+ item vectors are not finite in validation at epoch 0, step 1: "
                                         r".*--model\.lr\); stopped$", errors[0]), errors
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (only,) = client.search_runs([client.get_experiment_by_name("recsys").experiment_id])
    assert only.info.status == "FAILED" and "val/monitor" not in only.data.metrics


def _other_data_of_the_same_shapes(prepared: Path, out: Path) -> Path:
    """``prepared`` with its item indices permuted in the interactions (training counts following):
    the same catalogue, features and shapes, other histories; a valid prepared directory."""
    import shutil

    import polars as pl

    shutil.copytree(prepared, out)
    items = pl.read_parquet(out / "items.parquet")
    n = items.height
    perm = np.concatenate([[0], np.random.default_rng(0).permutation(n) + 1])  # item i becomes perm[i]
    events = pl.read_parquet(out / "interactions.parquet")
    events.with_columns(pl.Series("item", perm[events["item"].to_numpy()].astype(np.int32))).write_parquet(out / "interactions.parquet")
    inverse = np.argsort(perm)  # the old item that is now item j
    for column in ("train_count", "cold_start"):
        items = items.with_columns(pl.Series(column, items[column].to_numpy()[inverse[1:] - 1]))
    items.write_parquet(out / "items.parquet")
    in_training = np.load(out / "features" / "in_training.npy")
    np.save(out / "features" / "in_training.npy", in_training[inverse])
    return out


def test_a_resume_on_other_data_or_settings_is_refused_and_leaves_the_run_as_it_was(tmp_path, capsys):
    """The checkpoint records a fingerprint of its data and its settings; --ckpt_path checks them
    before the run is opened. Before: other data of the same shapes resumed (exit 0) and overwrote
    the run's last.ckpt; other sizes failed with a traceback and turned its FINISHED run FAILED."""
    from recsys.data import load_prepared

    first = run(_args(tmp_path, "--mlflow.log_models", "false"))
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = last.read_bytes()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    before = client.get_run(first["run_id"])
    (data_dir,) = (tmp_path / "synthetic").glob("synthetic-*")
    other = _other_data_of_the_same_shapes(data_dir, tmp_path / "other")
    assert load_prepared(other).item_features.dense["text"].shape == load_prepared(data_dir).item_features.dense["text"].shape
    cases = [
        (["--data.data_dir", str(other)],
         rf"it was trained on {re.escape(str(data_dir))}, and --data\.data_dir {re.escape(str(other))} differs from it in "
         r"interactions\.parquet, items\.parquet, features/in_training\.npy\. Resume with the data and settings"),
        (["--data.synthetic.num_items", "100"], r"it was trained on .*synthetic-\w+, and --data\.data_dir .*synthetic-\w+ differs from it in "),
        (["--model.lr", "0.01", "--model.lru.r_max", "0.2"], r"cannot resume from it: --model\.lr was 0\.001, now 0\.01; --model\.lru\.r_max was 0\.1, now 0\.2\."),
        (["--data.batch_size", "64"], r"cannot resume from it: --data\.batch_size was 128, now 64\."),
    ]
    for extra, message in cases:
        assert main(_args(tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", str(last), *extra)) == 2, extra
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: --ckpt_path {last}: cannot resume from it: "), errors
        assert re.search(message, errors[0]), errors[0]
        assert last.read_bytes() == saved
        after = client.get_run(first["run_id"])
        assert after.info.status == "FINISHED" and after.data.metrics == before.data.metrics
        assert len(client.get_metric_history(first["run_id"], "val/monitor")) == 1


def _tiny_model(sizes=(4, 8), **options):
    """A two-size model on 8 items, the plain nested one (``blocks``) unless ``options`` name the nesting."""
    from recsys.item_features import ItemFeatures

    options.setdefault("nesting", "blocks")
    torch.manual_seed(0)
    text = torch.randn(9, 6)
    text[0] = 0.0
    return MatryoshkaRecommender(item_features=ItemFeatures(num_items=8, dense={"text": text}), sizes=list(sizes),
                                dropout=0.0, input_dropout=0.0, **options)


TINY_BATCH = {"input_ids": torch.tensor([[0, 1, 3, 5], [2, 4, 6, 7]]), "target_ids": torch.tensor([[0, 3, 5, 2], [4, 6, 7, 1]])}


def test_learned_temperature_scales_each_size_and_learns_outside_the_exported_network():
    """Each size's training logits are multiplied by its own learned factor (the memory-flat loss
    with ``logit_scales``); the factor lives outside ``net``, so exports and rankings never see it."""
    from recsys.nn.loss import naive_matryoshka_cross_entropy

    model = _tiny_model(learned_temperature=True)
    assert not any("log_logit_scale" in name for name, _ in model.net.named_parameters())
    with torch.no_grad():
        model.log_logit_scale.copy_(torch.tensor([0.7, -0.3]))
    total, *_ = model.training_loss(TINY_BATCH)
    step = model.step_inputs(TINY_BATCH)
    states = model.net.sequence_states(step.input_ids, step.items)
    valid = step.targets > 0
    expected = naive_matryoshka_cross_entropy(states[valid], step.candidates, step.targets[valid], [4, 8],
                                              logit_scales=model.log_logit_scale.exp())
    torch.testing.assert_close(total, expected.total)
    total.backward()
    assert model.log_logit_scale.grad is not None and bool((model.log_logit_scale.grad != 0).all())


def test_separate_item_vectors_score_each_smaller_size_with_its_own_tower():
    """With ``separate_item_vectors`` size 4 is trained and ranked against its own item tower's
    vectors, the largest against the shared tower; such a checkpoint is refused by export."""
    from recsys.metrics import RankingMetrics, target_ranks

    model = _tiny_model(separate_item_vectors=True)
    loss = model.training_loss(TINY_BATCH)
    step = model.step_inputs(TINY_BATCH)
    valid = step.targets > 0
    user = model.net.sequence_states(step.input_ids, step.items)[valid]
    targets = step.targets[valid] - 1
    own = model.item_heads[0]()
    expected = [torch.nn.functional.cross_entropy(user[:, :4] @ own[1:].t(), targets),
                torch.nn.functional.cross_entropy(user @ step.items[1:].t(), targets)]
    torch.testing.assert_close(torch.stack(list(loss[2])), torch.stack(expected).detach())
    loss[0].backward()
    assert model.item_heads[0].projections["text"].weight.grad.abs().sum() > 0

    model.eval()
    metrics = RankingMetrics([4, 8], keep_ranks=True)
    batch = {"input_ids": TINY_BATCH["input_ids"], "target": torch.tensor([2, 1]), "user": torch.tensor([1, 2]),
             "seen_ids": TINY_BATCH["input_ids"]}
    with torch.no_grad():
        model._start_evaluation(metrics)
        model._rank_batch(batch, metrics)
        users = model.net.user_vectors(batch["input_ids"])
        expected_ranks = [target_ranks(users[:, :4], own.detach(), batch["target"], (4,), seen_ids=batch["seen_ids"]),
                          target_ranks(users, model.net.item_matrix(), batch["target"], (8,), seen_ids=batch["seen_ids"])]
    assert torch.equal(torch.as_tensor(metrics.per_user_ranks()[1]), torch.cat(expected_ranks))


def test_separate_item_vectors_all_unties_even_one_size():
    """``"all"``: the largest size scores with its own tower too; with one size that is a model whose
    output item vectors are untied from the input ones (the twin such an arm is measured against),
    while ``true`` leaves a one-size model as it is."""
    assert len(_tiny_model(separate_item_vectors="all").item_heads) == 2
    assert len(_tiny_model(sizes=[8], separate_item_vectors="all").item_heads) == 1
    assert _tiny_model(sizes=[8], separate_item_vectors=True).item_heads is None
    with pytest.raises(OptionError, match="true, false or 'all'"):
        _tiny_model(separate_item_vectors="some")


def test_output_item_norm_false_leaves_the_own_item_vectors_norms_free():
    """``output_item_norm=False``: the sizes' own output vectors skip the tower's LayerNorm (their
    norms differ from item to item, as raw embeddings do); the input matrix stays normalised. It
    needs own item vectors, and is refused without them."""
    torch.manual_seed(0)
    model = _tiny_model(separate_item_vectors="all", output_item_norm=False)
    with torch.no_grad():
        for head in model.item_heads:
            norms = head()[1:].norm(dim=1)
            assert isinstance(head.norm, torch.nn.Identity) and norms.std() > 0.05 * norms.mean()
        shared = model.net.item_matrix()[1:, :4]  # the first chunk, normalised on its own
    torch.testing.assert_close(shared.norm(dim=1), torch.full((len(shared),), 2.0), atol=0.05, rtol=0.05)
    with pytest.raises(OptionError, match="^output_item_norm false needs separate_item_vectors true or .all.: tied"):
        _tiny_model(output_item_norm=False)


@pytest.mark.parametrize("nesting", ["blocks", "slices"])
@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_output_bias_adds_each_sizes_own_bias_per_item_to_its_scores(nesting, loss):
    """``output_bias``: every size scores ``u . e_i + b_i`` with biases of its own, in the training
    loss (full and sampled, with blocks and slices) and in the ranks of evaluation; the loss's
    gradient reaches the biases. It needs every size's own item vectors, and is refused without."""
    from recsys.nn.item_bias import with_bias_column, with_ones_column
    from recsys.nn.loss import sampled_matryoshka_cross_entropy
    from recsys.nn.nested import cut_to_size

    options = {"loss": loss, "negatives": 50, "negative_sampling": "uniform"} if loss == "sampled" else {}
    model = _tiny_model(separate_item_vectors="all", output_bias=True, nesting=nesting, **options)
    with torch.no_grad():
        for bias in model.output_bias:
            bias.copy_(torch.randn_like(bias))
    torch.manual_seed(1)
    total, _, per_size, _, _ = model.training_loss(TINY_BATCH)
    torch.manual_seed(1)
    step = model.step_inputs(TINY_BATCH)
    valid = step.targets > 0
    for m, size in enumerate(model.sizes):
        net = cut_to_size(model.net, size) if nesting == "slices" else model.net
        items = net.item_matrix() if step.rows is None else net.items(step.rows)
        user = net.sequence_states(step.input_ids, items)[valid][:, :size]
        head, bias = model.item_heads[m], model.output_bias[m]
        if loss == "full":
            logits = user @ head()[1:].t() + bias[1:]
            expected = torch.nn.functional.cross_entropy(logits, step.targets[valid] - 1)
        else:
            expected = sampled_matryoshka_cross_entropy(with_ones_column(user), with_bias_column(head(step.rows), bias[step.rows]),
                                                        step.targets[valid], (size + 1,), step.negatives).total
        torch.testing.assert_close(per_size[m], expected.detach(), rtol=1e-5, atol=1e-6)
    total.backward()
    assert all(bool(bias.grad.abs().sum() > 0) for bias in model.output_bias)

    model.eval()
    model._start_evaluation(model.test_metrics)
    batch = {"input_ids": TINY_BATCH["input_ids"], "target": torch.tensor([2, 1]), "user": torch.tensor([0, 1])}
    with torch.no_grad():
        if nesting == "slices":
            ranks = model._per_size_ranks(batch, None, "test")
        else:
            model._eval_items = model.net.item_matrix()
            ranks = model._group_ranks(batch, None)
        for m, size in enumerate(model.sizes):
            net = cut_to_size(model.net, size) if nesting == "slices" else model.net
            users = net.user_vectors(batch["input_ids"], net.item_matrix())[:, :size]
            scores = users @ model.item_heads[m]()[1:].t() + model.output_bias[m][1:]
            expected = (scores > scores.gather(1, batch["target"][:, None] - 1)).sum(1) + 1
            assert ranks[m].tolist() == expected.tolist()
    with pytest.raises(OptionError, match="^output_bias true needs separate_item_vectors 'all': each size's bias"):
        _tiny_model(separate_item_vectors=True, output_bias=True)


def test_separate_item_vectors_with_the_sampled_loss_use_each_towers_rows_of_the_step():
    """The sampled softmax with separate item vectors: each size against its own tower's rows of
    the step; with every item drawn as a negative and no log-Q it is the full loss of each size."""
    from recsys.nn.loss import sampled_matryoshka_cross_entropy

    model = _tiny_model(separate_item_vectors=True, loss="sampled", negatives=50, negative_sampling="uniform")
    model.train()
    torch.manual_seed(1)
    loss = model.training_loss(TINY_BATCH)
    torch.manual_seed(1)
    step = model.step_inputs(TINY_BATCH)
    valid = step.targets > 0
    user = model.net.sequence_states(step.input_ids, step.items)[valid]
    own = model.item_heads[0](step.rows)
    expected = sampled_matryoshka_cross_entropy(user[:, :4], own, step.targets[valid], (4,), step.negatives)
    torch.testing.assert_close(loss[2][0], expected.total.detach())
    loss[0].backward()
    assert model.item_heads[0].projections["text"].weight.grad.abs().sum() > 0


def test_learned_temperature_with_separate_item_vectors_scales_each_sizes_own_loss():
    model = _tiny_model(separate_item_vectors="all", learned_temperature=True)
    with torch.no_grad():
        model.log_logit_scale.copy_(torch.tensor([0.5, -0.2]))
    loss = model.training_loss(TINY_BATCH)
    step = model.step_inputs(TINY_BATCH)
    valid = step.targets > 0
    user = model.net.sequence_states(step.input_ids, step.items)[valid]
    targets = step.targets[valid] - 1
    expected = [torch.nn.functional.cross_entropy(user[:, :s] @ head()[1:].t() * t, targets)
                for s, head, t in zip([4, 8], model.item_heads, model.log_logit_scale.exp())]
    torch.testing.assert_close(torch.stack(list(loss[2])), torch.stack(expected).detach())
    loss[0].backward()
    assert bool((model.log_logit_scale.grad != 0).all())


@pytest.mark.parametrize("options", [
    {"encoder": "lru", "separate_item_vectors": True}, {"encoder": "lru", "separate_item_vectors": "all"},
    {"encoder": "mamba", "separate_item_vectors": True}, {"encoder": "mamba", "separate_item_vectors": "all"},
    {"nesting": "slices"}, {"nesting": "slices", "separate_item_vectors": "all"},
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_prefix_gradient_zero_trains_the_smallest_size_by_its_own_loss_alone(options):
    """``prefix_gradient 0``: every weight the size-4 model keeps gets exactly the gradient of the
    size-4 loss alone, the larger sizes' losses sending it nothing (so the smallest size learns as
    its twin would); at 1 (plain training) they do send it some. With blocks it acts on what the
    chunks send back, with slices on the size-4 slice of every weight; forward values never change."""
    from recsys.nn.nested import cut_to_size

    def trained_on(weights, factor):
        model = _tiny_model(prefix_gradient=factor, loss_weights=weights, **options)
        model.training_loss(TINY_BATCH)[0].backward()
        return {name: p.grad for name, p in model.named_parameters()}, model

    every, model = trained_on([1.0, 1.0], 0.0)
    alone, _ = trained_on([1.0, 0.0], 0.0)
    plain, _ = trained_on([1.0, 1.0], 1.0)
    kept = {f"net.{name}": p.shape for name, p in cut_to_size(model.net, 4).named_parameters()}
    if model.item_heads is not None:
        kept |= {f"item_heads.0.{name}": p.shape for name, p in model.item_heads[0].named_parameters()}
    assert len(kept) > 10
    differs = []
    for name, shape in kept.items():
        prefix = tuple(slice(0, n) for n in shape)
        torch.testing.assert_close(every[name][prefix], alone[name][prefix], rtol=1e-5, atol=1e-7, msg=name)
        differs.append(not torch.allclose(plain[name][prefix], alone[name][prefix], rtol=1e-5, atol=1e-7))
    assert sum(differs) > len(kept) // 2
    # forward values are those of plain training
    torch.testing.assert_close(model.training_loss(TINY_BATCH)[0], trained_on([1.0, 1.0], 1.0)[1].training_loss(TINY_BATCH)[0])


@pytest.mark.parametrize("options,expected", [
    ({}, ("slices", 0.0, 0.5, "each")),
    ({"encoder": "mamba"}, ("blocks", 1.0, 0.0, "each")),
    ({"encoder": "sasrec", "max_len": 4}, ("blocks", 1.0, 0.0, "each")),
    ({"nesting": "blocks"}, ("blocks", 1.0, 0.0, "each")),
    ({"loss": "sampled"}, ("slices", 0.0, 0.0, "each")),
    ({"learned_temperature": True}, ("slices", 0.0, 0.0, "each")),
    ({"sizes": [8]}, ("slices", 0.0, 0.0, "each")),
    ({"depths": [1, 2]}, ("blocks", 1.0, 0.0, "mean")),
    ({"prefix_gradient": 0.5, "distill": 1.0, "monitor_size": 8}, ("slices", 0.5, 1.0, 8)),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) if isinstance(o, dict) else None)
def test_options_left_unset_take_the_recipe_and_the_model_records_what_it_took(options, expected):
    """``nesting``, ``prefix_gradient``, ``distill`` and ``monitor_size`` left unset: the sliced
    recipe with the LRU encoder and no grid (no distillation where nothing distils), the plain
    nested model elsewhere; values given are kept. ``hparams`` (logged, checkpointed) hold the
    values taken, so a checkpoint rebuilds the same model."""
    model = _tiny_model(**{"nesting": None, **options})
    h = model.hparams
    assert (h.nesting, h.prefix_gradient, h.distill, h.monitor_size) == expected
    assert model.monitor_size == expected[3]
    assert (model._slices is not None) == (expected[0] == "slices")
    again = _tiny_model(**{k: v for k, v in h.items() if k not in ("dropout", "input_dropout")})
    assert (again.hparams.nesting, again.hparams.prefix_gradient, again.hparams.distill) == expected[:3]


def test_prefix_gradient_below_one_is_refused_where_it_has_no_meaning():
    with pytest.raises(OptionError, match="needs separate_item_vectors true"):
        _tiny_model(prefix_gradient=0.5)
    with pytest.raises(OptionError, match=r"must be a number in \[0, 1\]"):
        _tiny_model(separate_item_vectors="all", prefix_gradient=-0.1)


@pytest.mark.parametrize("separate", [False, "all"])
def test_sliced_training_runs_every_size_as_its_own_network(separate):
    """``nesting slices``: each size's loss is that of the network cut to the size (its own item
    matrix, its own states), computed on views of the model's weights so that every size's loss
    reaches them; evaluation ranks with those same cut networks."""
    from recsys.nn.nested import cut_to_size

    model = _tiny_model(nesting="slices", separate_item_vectors=separate)
    total, names, per_size, _, _ = model.training_loss(TINY_BATCH)
    step = model.step_inputs(TINY_BATCH)
    valid = step.targets > 0
    targets = step.targets[valid] - 1
    for m, (size, got) in enumerate(zip(model.sizes, per_size)):
        small = cut_to_size(model.net, size)
        items = small.item_matrix()
        user = small.sequence_states(step.input_ids, items)[valid]
        candidates = model.item_heads[m]() if separate else items
        expected = torch.nn.functional.cross_entropy(user @ candidates[1:].t(), targets)
        torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    total.backward()
    assert all(p.grad is not None and bool(p.grad.any()) for p in model.parameters())

    model.eval()
    model._start_evaluation(model.test_metrics)
    batch = {"input_ids": TINY_BATCH["input_ids"], "target": torch.tensor([2, 1]), "user": torch.tensor([0, 1])}
    with torch.no_grad():
        ranks = model._per_size_ranks(batch, None, "test")
        for m, size in enumerate(model.sizes):
            small = cut_to_size(model.net, size)
            items = small.item_matrix()
            scores = small.user_vectors(batch["input_ids"], items) @ (model.item_heads[m]() if separate else items)[1:].t()
            expected = (scores > scores.gather(1, batch["target"][:, None] - 1)).sum(1) + 1
            assert ranks[m].tolist() == expected.tolist()


@pytest.mark.parametrize("teacher", ["largest", "next"])
@pytest.mark.parametrize("options", [
    {"nesting": "slices", "separate_item_vectors": "all"}, {"nesting": "slices"}, {"separate_item_vectors": "all"},
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_per_size_losses_distil_from_their_teachers_scores(options, teacher):
    """With a loss per size (slices, or item vectors of its own) and ``distill``, every size but the
    largest also learns ``KL(p_teacher || p_size)``, each softmax the one its own network scores with
    (its states against its own item vectors); the teacher is detached: the largest size's own item
    vectors get the gradient they get without distillation."""
    from recsys.nn.nested import cut_to_size

    sizes = (4, 8, 12)
    model = _tiny_model(sizes=sizes, distill=0.7, distill_teacher=teacher, **options)
    plain = _tiny_model(sizes=sizes, **options)
    total, _, per_size, kl, _ = model.training_loss(TINY_BATCH)
    step = model.step_inputs(TINY_BATCH)
    valid = step.targets > 0
    logits = []
    for m, size in enumerate(sizes):
        net = cut_to_size(model.net, size) if options.get("nesting") == "slices" else model.net
        items = net.item_matrix()
        user = net.sequence_states(step.input_ids, items)[valid][:, :size]
        candidates = model.item_heads[m]() if model.item_heads is not None else items
        logits.append(user @ candidates[1:].t())
    targets = step.targets[valid] - 1
    expected = 0.0
    for m, z in enumerate(logits):
        ce = torch.nn.functional.cross_entropy(z, targets)
        torch.testing.assert_close(per_size[m], ce.detach(), rtol=1e-5, atol=1e-6)
        expected = expected + ce
        if m < len(sizes) - 1:
            p_t = torch.softmax(logits[-1 if teacher == "largest" else m + 1], dim=1).detach()
            divergence = torch.nn.functional.kl_div(torch.log_softmax(z, dim=1), p_t, reduction="batchmean")
            torch.testing.assert_close(kl[m], divergence.detach(), rtol=1e-5, atol=1e-6)
            expected = expected + 0.7 * divergence
        else:
            assert kl[m] is None
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    if model.item_heads is not None:
        total.backward()
        plain.training_loss(TINY_BATCH)[0].backward()
        head, plain_head = model.item_heads[-1], plain.item_heads[-1]
        for got, want in zip(head.parameters(), plain_head.parameters()):
            if want.grad is not None:
                torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7)
        assert not all(torch.allclose(a.grad, b.grad) for a, b in zip(model.item_heads[0].parameters(),
                                                                     plain.item_heads[0].parameters()) if b.grad is not None)


@pytest.mark.parametrize("options", [
    {"nesting": "slices", "separate_item_vectors": "all"}, {"nesting": "slices"}, {"separate_item_vectors": "all"}, {},
], ids=lambda o: "-".join(str(v) for v in o.values()) or "tied-blocks")
def test_the_averaged_teacher_scores_with_the_average_of_the_weights(options):
    """``distill_teacher="average"``: every size but the largest learns ``KL(p_T || p_size)`` where
    ``p_T`` is the largest size's softmax under the moving average of the weights (its own item
    vectors where it has them); the model's own weights are back in place after the teacher's pass,
    and only they get gradients."""
    import copy

    from recsys.nn.nested import cut_to_size

    sizes = (4, 8, 12)
    model = _tiny_model(sizes=sizes, distill=0.7, distill_teacher="average", **options)
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # an average that differs from the weights
        for name, p in teacher.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
            if name in model.teacher_average.names:
                getattr(model.teacher_average, name.replace(".", "__")).copy_(p)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    total, _, per_size, kl, _ = model.training_loss(TINY_BATCH)
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name

    def logits(owner, m, size):
        step = owner.step_inputs(TINY_BATCH)
        valid = step.targets > 0
        net = cut_to_size(owner.net, size) if options.get("nesting") == "slices" else owner.net
        items = net.item_matrix()
        user = net.sequence_states(step.input_ids, items)[valid][:, :size]
        candidates = owner.item_heads[m]() if owner.item_heads is not None else items[:, :size]
        return user @ candidates[1:].t(), step.targets[valid] - 1

    with torch.no_grad():
        p_teacher = torch.softmax(logits(teacher, len(sizes) - 1, sizes[-1])[0], dim=1)
    expected = 0.0
    for m, size in enumerate(sizes):
        z, targets = logits(model, m, size)
        ce = torch.nn.functional.cross_entropy(z, targets)
        divergence = torch.nn.functional.kl_div(torch.log_softmax(z, dim=1), p_teacher, reduction="batchmean")
        torch.testing.assert_close(per_size[m], ce.detach(), rtol=1e-5, atol=1e-6)
        if m < len(sizes) - 1:
            torch.testing.assert_close(kl[m], divergence.detach(), rtol=1e-5, atol=1e-6)
            expected = expected + 0.7 * divergence
        else:
            assert kl[m] is None
        expected = expected + ce
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    total.backward()
    assert all(p.grad is not None for p in model.net.parameters() if p.requires_grad)
    assert not any(b.requires_grad for b in model.teacher_average.buffers())


def test_the_averaged_teacher_follows_the_weights_and_stays_out_of_exports():
    """After each training batch the average moves ``1 - teacher_decay`` of the way to the weights;
    it is saved with the model's state (a resumed run goes on with it), outside the network that
    exports cut."""
    model = _tiny_model(distill=0.5, distill_teacher="average", teacher_decay=0.9)
    average = model.teacher_average
    name = average.names[0]
    before = getattr(average, name.replace(".", "__")).clone()
    param = dict(model.named_parameters())[name]
    with torch.no_grad():
        param.add_(1.0)
    model.on_train_batch_end(None, TINY_BATCH, 0)
    torch.testing.assert_close(getattr(average, name.replace(".", "__")), 0.9 * before + 0.1 * param.detach())
    state = model.state_dict()
    assert {f"teacher_average.{n.replace('.', '__')}" for n in average.names} <= state.keys()
    assert not any(key.startswith("teacher_average") for key in model.net.state_dict())
    assert _tiny_model(distill=0.5).teacher_average is None
    assert _tiny_model(distill_teacher="average").teacher_average is None  # no distillation, no teacher
    assert _tiny_model(sizes=(8,), distill=0.5, distill_teacher="average").teacher_average is None  # no student


@pytest.mark.parametrize("options, message", [
    ({"distill": 0.5, "distill_teacher": "average", "teacher_decay": 1.0}, r"teacher_decay must be a number in \(0, 1\)"),
    ({"distill": 0.5, "distill_teacher": "mean"}, "unknown teacher 'mean'; choose one of largest, next, average"),
    ({"distill": 0.5, "distill_teacher": "average", "depths": [1, 2]}, "'average' scores the largest size alone"),
])
def test_the_averaged_teacher_refuses_what_it_cannot_do(options, message):
    with pytest.raises(OptionError, match=message):
        _tiny_model(**options)


def test_sliced_nesting_is_refused_where_it_is_not_built():
    with pytest.raises(OptionError, match="'slices' is built for the lru encoder"):
        _tiny_model(nesting="slices", encoder="mamba")
    with pytest.raises(OptionError, match="unknown nesting 'rings'"):
        _tiny_model(nesting="rings")
    with pytest.raises(OptionError, match="nesting is per size"):
        _tiny_model(nesting="slices", depths=[1, 2])


@pytest.mark.parametrize("options", [
    {"encoder": "sasrec"}, {"encoder": "sasrec", "separate_item_vectors": "all"},
    {"encoder": "lru", "separate_item_vectors": True}, {"encoder": "lru", "separate_item_vectors": "all", "output_bias": True},
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_each_sizes_own_network_ranks_as_the_one_pass_does(options):
    """The ranks of every size by its own network (what a checkpoint per size is tested with,
    ``_per_size_ranks``) equal those of the one pass over all sizes (``_group_ranks``), also for
    SASRec, whose network is not cut (a size scores with the prefixes of its vectors)."""
    model = _tiny_model(**options).eval()
    if model.output_bias is not None:
        with torch.no_grad():
            for bias in model.output_bias:
                bias.copy_(torch.randn_like(bias))
    batch = {"input_ids": TINY_BATCH["input_ids"], "target": torch.tensor([2, 1]), "user": torch.tensor([0, 1])}
    with torch.no_grad():
        model._start_evaluation(model.test_metrics)
        own = model._per_size_ranks(batch, None, "test")
        model._eval_items = model.net.item_matrix()
        assert torch.equal(own, model._group_ranks(batch, None))
