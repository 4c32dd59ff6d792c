"""``--model.monitor_size each``: every size keeps its own best checkpoint, is tested with its
weights and exported from it (the sizes of one run peak at different epochs)."""

import copy
import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import serving
from recsys.model import MatryoshkaRecommender
from recsys.model_options import OptionError
from recsys.nn.nested import cut_to_size
from recsys.train import run
from recsys.export import main as export_main

SIZES = [8, 16, 32]


def _tiny_model(**options) -> MatryoshkaRecommender:
    from recsys.item_features import ItemFeatures

    torch.manual_seed(0)
    text = torch.randn(21, 6)
    text[0] = 0.0
    return MatryoshkaRecommender(item_features=ItemFeatures(num_items=20, dense={"text": text}), sizes=[4, 8],
                                 dropout=0.0, input_dropout=0.0, **options)


def _ranks(model: MatryoshkaRecommender, batch: dict[str, torch.Tensor], stage: str = "test") -> torch.Tensor:
    """``(sizes, users)`` target ranks of one evaluation batch."""
    metrics = model.test_metrics if stage == "test" else model.val_metrics
    metrics.keep_ranks = True
    model.eval()
    model._start_evaluation(metrics)
    with torch.no_grad():
        model._eval_step(batch, metrics)
    _, ranks = metrics.per_user_ranks()
    return torch.as_tensor(ranks)


def _save(model: MatryoshkaRecommender, path) -> str:
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return str(path)


@pytest.mark.parametrize("options", [{}, {"separate_item_vectors": True},
                                     {"nesting": "slices", "separate_item_vectors": "all"}])
def test_each_size_is_tested_with_the_weights_of_its_own_checkpoint(tmp_path, options):
    """Size 4 from one checkpoint, size 8 from another: each size's test ranks are those of its own
    checkpoint's weights (tested alone), and validation always ranks with the model's own."""
    model = _tiny_model(monitor_size="each", **options)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 21, (32, 5), generator=generator)
    batch = {"input_ids": ids, "seen_ids": ids, "target": torch.randint(1, 21, (32,), generator=generator),
             "user": torch.arange(32)}
    own, theirs = _ranks(model, batch), _ranks(other, batch)
    assert not torch.equal(own[0], theirs[0])  # the two checkpoints rank differently

    model.test_checkpoints = {4: _save(other, tmp_path / "other.ckpt"), 8: _save(model, tmp_path / "own.ckpt")}
    mixed = _ranks(model, batch)
    assert torch.equal(mixed[0], theirs[0]) and torch.equal(mixed[1], own[1])
    assert torch.equal(_ranks(model, batch, "val"), own)


def test_each_is_refused_with_a_grid_of_triples():
    with pytest.raises(OptionError, match="monitor_size.*each: with a grid of triples"):
        _tiny_model(monitor_size="each", pairs=[[8, 8]])


@pytest.fixture(scope="module")
def trained_each(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("each")
    # seeded: on this small log size 8 peaks at epoch 4 and the larger sizes at 5 (asserted below)
    result = run([
        "--model.sizes", json.dumps(SIZES), "--model.monitor_size", "each", "--model.lr", "0.01",
        "--data.synthetic.num_users", "150", "--data.synthetic.num_items", "120",
        "--data.synthetic_cache_dir", str(tmp / "synthetic"), "--data.max_len", "20",
        "--trainer.max_epochs", "6", "--trainer.enable_progress_bar", "false",
        "--mlflow.tracking_uri", f"sqlite:///{tmp}/mlflow.db", "--mlflow.artifact_location", str(tmp / "artifacts"),
        "--checkpoint.dirpath", str(tmp / "ckpt"),
    ])
    return tmp, result


def test_each_size_keeps_tests_and_logs_its_own_best_checkpoint(trained_each):
    tmp, result = trained_each
    epochs = {s: result["best_val_by_size"][f"d{s}"][1] for s in SIZES}
    assert len(set(epochs.values())) > 1, epochs  # else nothing here could tell the checkpoints apart
    assert result["best_by_size"] == {s: str(tmp / "ckpt" / f"best-d{s}.ckpt") for s in SIZES}
    assert result["best"] == result["best_by_size"][32]
    last = torch.load(tmp / "ckpt" / "last.ckpt", weights_only=True)  # what a resume starts from
    for s in SIZES:
        assert torch.load(result["best_by_size"][s], weights_only=True)["epoch"] == epochs[s] == last["best_val_by_size"][f"d{s}"][1]
    # val/monitor: the mean of the sizes' best scores so far (it rises while any size improves)
    assert result["best_val"] == pytest.approx(np.mean([v for v, _ in result["best_val_by_size"].values()]), abs=1e-6)

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    logged = {a.path for a in client.list_artifacts(result["run_id"], "checkpoints")}
    assert logged == {f"checkpoints/best-d{s}.ckpt" for s in SIZES}
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    for s in SIZES:  # each size's logged model: its own checkpoint cut to the size
        own = cut_to_size(MatryoshkaRecommender.from_checkpoint(result["best_by_size"][s]).net, s)
        exported = mlflow.pyfunc.load_model(result["model_uris"][s]).unwrap_python_model()
        with torch.no_grad():
            torch.testing.assert_close(exported.model.item_matrix, own.item_matrix())


def test_export_by_run_id_takes_each_size_from_its_own_checkpoint(trained_each, tmp_path, monkeypatch):
    tmp, result = trained_each
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    assert export_main(["--run-id", result["run_id"], "--dims", "8,32", "--out", str(tmp_path)]) == 0
    for s in (8, 32):
        own = cut_to_size(MatryoshkaRecommender.from_checkpoint(result["best_by_size"][s]).net, s)
        with torch.no_grad():
            torch.testing.assert_close(serving.load(tmp_path / f"d{s}").item_matrix, own.item_matrix())


def test_an_own_funnel_shortlists_with_the_prefix_sizes_own_checkpoint(tmp_path):
    """With a checkpoint per size, size 8's funnel export holds size 4's export from size 4's own
    checkpoint, exactly as size 4 is exported alone, not size 4 of size 8's checkpoint."""
    from recsys.export import export_each_size, export_sizes

    model = _tiny_model(monitor_size="each", nesting="slices", separate_item_vectors="all")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    catalogue = {"item_ids": [f"i{n}" for n in range(1, 21)], "popularity": list(range(20, 0, -1)), "stats": {}}
    saved = {}
    for name, m in (("d4", other), ("d8", model)):
        saved[name] = tmp_path / f"best-{name}.ckpt"
        torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams), "catalogue": catalogue}, saved[name])

    (funnel,) = export_each_size({4: saved["d4"], 8: saved["d8"]}, tmp_path / "each", dims=[8], funnel_prefix=4,
                                 funnel_shortlist=5)
    (own,) = export_sizes(saved["d4"], [4], tmp_path / "own")
    (of_d8,) = export_sizes(saved["d8"], [4], tmp_path / "of-d8")
    shortlist = serving.load(funnel / "shortlist")
    with torch.no_grad():
        torch.testing.assert_close(shortlist.item_matrix, serving.load(own).item_matrix)
        assert not torch.allclose(shortlist.item_matrix, serving.load(of_d8).item_matrix)
    assert funnel.name == "d8" and serving.load(funnel).manifest["retriever"]["prefix_size"] == 4


def test_with_weight_averaging_each_sizes_checkpoint_holds_the_averaged_weights_it_was_validated_with(tmp_path):
    """Lightning's ``EMAWeightAveraging`` (``--trainer.callbacks+=...``) validates the averaged
    weights: each size's own checkpoint holds those (as ``best.ckpt`` and ``last.ckpt`` do, the
    training weights beside them), not the training weights of that step, so that its test and
    export are of the weights that won its validation. The buffers (item features) are not
    averaged: averaging with them is refused (tests/test_reliability.py)."""
    result = run([
        "--model.sizes", "[8, 16]", "--model.monitor_size", "each", "--model.lr", "0.01",
        "--data.synthetic.num_users", "150", "--data.synthetic.num_items", "120",
        "--data.synthetic_cache_dir", str(tmp_path / "synthetic"), "--data.max_len", "20",
        "--trainer.max_epochs", "5", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay", "0.9",
        "--trainer.callbacks.use_buffers", "false",
        "--tracking", "csv", "--run_dir", str(tmp_path / "run"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
    ])
    # the run's best score is the mean of the sizes' best (ModelCheckpoint kept the latest, not an earlier one)
    assert result["best_val"] == pytest.approx(np.mean([v for v, _ in result["best_val_by_size"].values()]), abs=1e-6)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    final = [s for s in (8, 16) if result["best_val_by_size"][f"d{s}"][1] == last["epoch"]]
    assert final, result["best_val_by_size"]  # a size that peaked at the last validation: saved at last.ckpt's step
    for s in final:
        own = torch.load(result["best_by_size"][s], weights_only=True)
        assert own["global_step"] == last["global_step"]
        for name, value in last["state_dict"].items():
            torch.testing.assert_close(own["state_dict"][name], value, msg=name)
        moved = [n for n, v in own["state_dict"].items() if v.is_floating_point() and not torch.equal(v, own["current_model_state"][n])]
        assert len(moved) > 10  # the averaged weights, not the training weights of that step
        for name, value in own["state_dict"].items():  # the item features (integer indices among them) as they were
            if not value.is_floating_point():
                assert torch.equal(value, own["current_model_state"][name]), name
