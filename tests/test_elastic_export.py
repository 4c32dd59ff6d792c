"""Exporting one elastic sub-model (``recsys.export --depth D --width W --dims S``) and serving it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import serving
from recsys.model import MatryoshkaRecommender
from recsys.nn.grid import Triple, vector_groups
from recsys.nn.nested import nested_parameter_count
from recsys.export import export_sizes, main as export_main
from serving.sized_model import ExportError
from tests.test_export import N, SIZES, _features


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = MatryoshkaRecommender(
        item_features=_features(), sizes=SIZES, max_len=12, n_blocks=2,
        depths=[1, 2], pairs=[[8, 8], [32, 8], [16, 16], [32, 32]], grid="full",
    ).eval()
    with torch.no_grad():  # heads off their nested-cut start, so that they matter
        for p in model.net.heads.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    item_ids = [f"item-{i:03d}" for i in range(1, N + 1)]
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "catalogue": {"item_ids": item_ids, "popularity": list(range(N, 0, -1)), "stats": {}}}, path)
    return path, model, item_ids


def _full_vectors(model, batch) -> dict[Triple, torch.Tensor]:
    with torch.no_grad():
        states = model.net.depth_states(batch, model.net.item_matrix(), [1, 2])
        return {t: model.net.group_vectors(g, states[t.depth][:, -1])[:, : t.size]
                for g in vector_groups(model.trained_triples) for t in g.triples}


@pytest.mark.parametrize("triple", [Triple(1, 32, 8), Triple(2, 32, 8), Triple(1, 16, 16), Triple(2, 32, 32)])
def test_an_exported_triple_serves_the_full_models_vectors_and_scores(checkpoint, tmp_path, triple, capsys):
    path, model, item_ids = checkpoint
    code = export_main(["--checkpoint", str(path), "--depth", str(triple.depth), "--width", str(triple.width),
                        "--dims", str(triple.size), "--out", str(tmp_path)])
    assert code == 0
    directory = tmp_path / triple.label
    manifest = json.loads((directory / "manifest.json").read_text())
    assert (manifest["size"], manifest["width"], manifest["depth"]) == (triple.size, triple.width, triple.depth)
    m = serving.load(directory)
    assert len(m.net.encoder.blocks) == triple.depth and m.item_matrix.shape == (N + 1, triple.size)
    assert m.num_parameters == manifest["num_parameters"]
    head = triple.width * triple.size + triple.size if triple.uses_head else 0
    assert m.num_parameters == nested_parameter_count(model.cut_triple(triple).encoder) + head
    histories = [item_ids[:5], item_ids[10:12], [item_ids[3]]]
    batch = torch.zeros(3, 12, dtype=torch.long)
    for i, h in enumerate(histories):
        batch[i, -len(h):] = torch.tensor([int(x.split("-")[1]) for x in h])
    expected = _full_vectors(model, batch)[triple]
    vectors = m.encode(histories)
    np.testing.assert_allclose(vectors, expected.numpy(), rtol=1e-5, atol=1e-5)
    # the served scores are the full model's at this triple: its vectors against Z[:, :size]
    top, scores = m.recommend_rows([[int(x.split("-")[1]) for x in h] for h in histories], k=5, exclude_seen=False)
    with torch.no_grad():
        full_scores = expected @ model.net.item_matrix()[1:, : triple.size].t()
    np.testing.assert_allclose(scores, np.take_along_axis(full_scores.numpy(), top - 1, axis=1), rtol=1e-5, atol=1e-5)
    assert np.array_equal(top[:, 0] - 1, full_scores.argmax(dim=1).numpy())


def test_an_untrained_head_or_a_bad_triple_is_one_export_error(checkpoint, tmp_path):
    path, _, _ = checkpoint
    with pytest.raises(ExportError, match="no vector head was trained"):
        export_sizes(path, [8], tmp_path, width=16, depth=2)
    with pytest.raises(ExportError, match="at least the size"):
        export_sizes(path, [32], tmp_path, width=16)
    with pytest.raises(ExportError, match=r"depth 3 must lie in 1\.\.2"):
        export_sizes(path, [32], tmp_path, depth=3)
    with pytest.raises(ExportError, match="one size"):
        export_sizes(path, [8, 16], tmp_path, depth=1)


def test_without_width_and_depth_an_export_is_as_before(checkpoint, tmp_path):
    path, model, _ = checkpoint
    [directory] = export_sizes(path, [16], tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert "width" not in manifest and "depth" not in manifest and directory.name == "d16"
    assert serving.load(directory).net.vector_size == 16
