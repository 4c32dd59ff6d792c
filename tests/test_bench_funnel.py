"""bench/funnel.py on a checkpoint whose sizes are networks of their own (``--model.separate_item_vectors
all``, ``--model.nesting slices``): each prefix names a smaller size, whose own user and item
vectors shortlist, and the full size re-ranks with its own (docs/method.md §6, "Own-network funnel")."""

import json

import numpy as np
import pytest
import torch

from recsys.data.prepared import load_prepared
from recsys.model import MatryoshkaRecommender
from recsys.nn.item_tower import ItemTower
from recsys.nn.nested import cut_to_size
from recsys.retrieval import recall_at_k, torch_topk

from tests.bench_scripts import bench_script
SIZES = [8, 16, 32]
ITEMS = 300  # the synthetic log's 112 real items and 188 synthetic ones
QUERIES = 8
K = 10
#: the recommended recipe's two options, together and alone
OWN = {"both": {"nesting": "slices", "separate_item_vectors": "all"},
       "own item vectors": {"nesting": "blocks", "separate_item_vectors": "all"}, "slices": {"nesting": "slices"}}


def _checkpoint(path, data_dir, seed=0, **options):
    """An untrained model over the prepared data's items, saved as recsys.train saves one."""
    torch.manual_seed(seed)
    features = load_prepared(data_dir).item_features
    model = MatryoshkaRecommender(item_features=features, sizes=SIZES, max_len=16, **options).eval()
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 0}, path)
    return path


@pytest.fixture(scope="module", params=list(OWN))
def checkpoint(request, synthetic_prepared, tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt", synthetic_prepared, **OWN[request.param])


def _run(checkpoint, data_dir, out, *extra):
    bench_script("funnel").main([
        "--checkpoint", str(checkpoint), "--data-dir", str(data_dir), "--items", str(ITEMS), "--queries", str(QUERIES),
        "--k", str(K), "--threads", "1", "--nlist", "4", "--nprobes", "4", "--out", str(out), *extra])
    return json.loads(out.read_text())


def test_own_funnel_shortlists_with_each_size_own_vectors(checkpoint, synthetic_prepared, tmp_path):
    report = _run(checkpoint, synthetic_prepared, tmp_path / "funnel.json", "--prefixes", "8,16",
                  "--shortlists", f"{K},{ITEMS + 100}", "--prefix-kinds", "exact,flat,ivf_flat")
    assert report["funnel_mode"] == "own_network"
    assert report["own_network"]["size"] == 32 and report["own_network"]["shortlist_sizes"] == [8, 16]
    (res,) = report["results"]
    assert sorted(res["encode_ms"]) == ["16", "32", "8"]
    rows = res["funnel"]
    assert len(rows) == 2 * 3 * 2
    for row in rows:
        assert row["settings"]["kind"] == "own_funnel" and row["settings"]["prefix_size"] == row["prefix"]
        assert row["shortlist_encode_ms"] == res["encode_ms"][str(row["prefix"])]
        if row["shortlist"] >= ITEMS:  # every item shortlisted (IVF: nprobe = nlist): exact at the full size
            assert row["recall"] == 1.0 and row["shortlist_recall"] == 1.0
        else:  # a shortlist of k: the re-ranking keeps size p's own exact top k (the IVF scans every list)
            assert row["recall"] == row["shortlist_recall"] == report["recall_of_exact_prefix_search"][str(row["prefix"])]

    # that recall is of size p's own vectors, computed here from the model: real items' own vectors,
    # the synthetic items' through the same towers, the queries through each size's own network
    funnel, catalogue = bench_script("funnel"), bench_script("trained_catalogue")
    model = catalogue.load_model(checkpoint)
    z, queries, _, _, own = funnel.own_networks(model, [8, 16], ITEMS, QUERIES, synthetic_prepared, 0, "test")
    ids, _ = catalogue.query_histories(model, synthetic_prepared, QUERIES)
    real = model.net.items.num_items
    heads = model.item_heads
    with torch.no_grad():
        for m, size in enumerate(SIZES):
            net = model.net if size == SIZES[-1] else cut_to_size(model.net, size)
            items = (heads[m]() if heads is not None else net.item_matrix())[1:].numpy()
            vectors, users = (z, queries) if size == SIZES[-1] else (own.items[size], own.queries[size])
            assert vectors.shape == (ITEMS, size) and users.shape == (QUERIES, size)
            np.testing.assert_allclose(vectors[:real], items, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(users, net.user_vectors(ids, net.item_matrix()).numpy(), rtol=1e-5, atol=1e-6)
            if size < SIZES[-1]:
                assert not np.allclose(vectors, z[:, :size], atol=1e-3)  # not the full size's prefix
            # a synthetic item goes through the size's own tower as a real one does (no ID vectors here)
            tower = catalogue.output_tower(model, size)
            features = ItemTower.features_from_state_dict(tower.state_dict())
            np.testing.assert_allclose(catalogue._tower_over(tower, features)().numpy(), tower().numpy(), rtol=1e-5, atol=1e-6)
    _, truth = torch_topk(queries, z, K)
    for p in (8, 16):
        expected = recall_at_k(torch_topk(own.queries[p], own.items[p], K)[1], truth)
        assert report["recall_of_exact_prefix_search"][str(p)] == pytest.approx(expected)


def test_a_prefix_that_is_no_smaller_size_is_refused_in_one_line(checkpoint, synthetic_prepared, tmp_path, capsys):
    out = tmp_path / "funnel.json"
    with pytest.raises(SystemExit) as exc:
        _run(checkpoint, synthetic_prepared, out, "--prefixes", "8,12")
    assert exc.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "--prefixes 12 not among the model's sizes below 32 (8,16)" in line
    assert "usage:" not in err


def test_tied_blocks_keep_the_prefix_funnel(synthetic_prepared, tmp_path):
    checkpoint = _checkpoint(tmp_path / "model.ckpt", synthetic_prepared, nesting="blocks")
    report = _run(checkpoint, synthetic_prepared, tmp_path / "funnel.json", "--prefixes", "12",
                  "--shortlists", str(ITEMS), "--prefix-kinds", "flat")
    assert report["funnel_mode"] == "prefix" and "own_network" not in report
    (row,) = report["results"][0]["funnel"]
    assert row["settings"]["kind"] == "funnel" and row["recall"] == 1.0 and "shortlist_encode_ms" not in row
    assert "encode_ms" not in report["results"][0]


def test_a_checkpoint_per_size_gives_each_size_its_own_weights(synthetic_prepared, tmp_path, capsys):
    """``--checkpoint DIR`` of a run with ``best-d<size>.ckpt`` files: each size's own vectors (items and
    queries) come from its own checkpoint, as an export of that run serves them."""
    run = tmp_path / "checkpoints"
    run.mkdir()
    paths = {size: _checkpoint(run / f"best-d{size}.ckpt", synthetic_prepared, seed=seed, **OWN["both"])
             for seed, size in enumerate(SIZES)}  # three different sets of weights
    (run / "last.ckpt").write_bytes(paths[SIZES[0]].read_bytes())  # not a size's: ignored
    report = _run(run, synthetic_prepared, tmp_path / "funnel.json", "--prefixes", "8,16",
                  "--shortlists", str(K), "--prefix-kinds", "exact")
    assert sorted(report["model"]["size_checkpoints"]) == ["16", "32", "8"]
    assert report["model"]["checkpoint"].endswith("best-d32.ckpt")
    assert report["settings"]["checkpoint"].endswith("checkpoints")  # what the command was given

    funnel, catalogue = bench_script("funnel"), bench_script("trained_catalogue")
    models = {size: catalogue.load_model(path) for size, path in paths.items()}
    z, queries, _, _, own = funnel.own_networks(models[32], [8, 16], ITEMS, QUERIES, synthetic_prepared, 0, "test", models)
    _, truth = torch_topk(queries, z, K)
    ids, _ = catalogue.query_histories(models[32], synthetic_prepared, QUERIES)
    with torch.no_grad():
        for p in (8, 16):
            net = cut_to_size(models[p].net, p)  # size p of its own checkpoint
            np.testing.assert_allclose(own.items[p][: models[p].net.items.num_items], models[p].item_heads[SIZES.index(p)]()[1:].numpy(),
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(own.queries[p], net.user_vectors(ids, net.item_matrix()).numpy(), rtol=1e-5, atol=1e-6)
            expected = recall_at_k(torch_topk(own.queries[p], own.items[p], K)[1], truth)
            assert report["recall_of_exact_prefix_search"][str(p)] == pytest.approx(expected)
        # the same directory's size-32 checkpoint alone gives size 8 other vectors (the weights differ)
        _, _, _, _, alone = funnel.own_networks(models[32], [8], ITEMS, QUERIES, synthetic_prepared, 0, "test")
        assert not np.allclose(alone.items[8], own.items[8], atol=1e-3)

    (run / "best-d16.ckpt").unlink()
    out = tmp_path / "missing.json"
    with pytest.raises(SystemExit) as exc:
        _run(run, synthetic_prepared, out, "--prefixes", "8,16")
    assert exc.value.code == 2 and not out.exists()
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "no checkpoint of size 16 (best-d<size>.ckpt)" in line
