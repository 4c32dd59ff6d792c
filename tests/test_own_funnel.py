"""The own-network funnel: a size trained as a network of its own (``--model.separate_item_vectors
all``, ``--model.nesting slices``) exported with ``--funnel-prefix p`` shortlists with size ``p``'s
own export (its encoder, item vectors and retriever, as it serves alone, in ``shortlist/``) and
re-ranks the shortlist with its own user vectors and item vectors (docs/method.md §6)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import polars as pl
import pytest
import torch

import serving
from recsys.item_features import ItemFeatures
from recsys.model import MatryoshkaRecommender
from serving.candidates import generate_candidates
from recsys.export import export_sizes
from recsys.export import main as export_main
from recsys.export_dir import ExportError, fetch_export, sha256_of
from serving.online import answer, parse_request

SIZES = [8, 16, 32]
N = 40
K = 10
ITEM_IDS = [f"item-{i:03d}" for i in range(1, N + 1)]
HISTORIES = [ITEM_IDS[:5], ITEM_IDS[20:23], [ITEM_IDS[3]], ITEM_IDS[5:30], []]
#: the recommended recipe's two options, alone and together
OWN = {"own item vectors": {"separate_item_vectors": "all"}, "slices": {"nesting": "slices"},
       "both": {"nesting": "slices", "separate_item_vectors": "all"}}


def _checkpoint(path, **options):
    """An untrained model over N items with a text vector, saved as recsys.train saves one."""
    torch.manual_seed(0)
    features = ItemFeatures(num_items=N, dense={"text": torch.randn(N + 1, 10, generator=torch.Generator().manual_seed(0))})
    model = MatryoshkaRecommender(item_features=features, sizes=SIZES, max_len=12, **options).eval()
    catalogue = {"item_ids": ITEM_IDS, "popularity": list(range(N, 0, -1)), "stats": {}}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "catalogue": catalogue}, path)
    return path


@pytest.fixture(scope="module", params=list(OWN))
def checkpoint(request, tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt", **OWN[request.param])


@pytest.fixture(scope="module")
def plain(checkpoint, tmp_path_factory):
    """Sizes 8 and 32 exported plainly (exact search), each as it serves alone."""
    small, large = export_sizes(checkpoint, [8, 32], tmp_path_factory.mktemp("plain"))
    return serving.load(small), serving.load(large)


def _ids(recs):
    return [[item for item, _ in r] for r in recs]


def _scores(recs):
    return [[score for _, score in r] for r in recs]


def _pair(recs):
    """One history's recommendations as (ids, scores)."""
    return [item for item, _ in recs], [score for _, score in recs]


def test_a_shortlist_of_every_item_recommends_as_the_size_alone(checkpoint, plain, tmp_path):
    _, large = plain
    (d,) = export_sizes(checkpoint, [32], tmp_path, funnel_prefix=8, funnel_shortlist=10 * N)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["retriever"] == {"kind": "own_funnel", "shortlist_export": "shortlist", "shortlist": N, "prefix_size": 8}
    assert manifest["nested_exports"] == {"shortlist": sha256_of(d / "shortlist" / "manifest.json")}
    m = serving.load(d)
    assert m.size == 32 and m.shortlister.size == 8 and m.retriever is None
    np.testing.assert_allclose(m.encode(HISTORIES), large.encode(HISTORIES), rtol=1e-5, atol=1e-6)  # encode: size 32
    got, want = m.recommend(HISTORIES, k=K), large.recommend(HISTORIES, k=K)
    assert _ids(got) == _ids(want)
    np.testing.assert_allclose(_scores(got), _scores(want), rtol=1e-5, atol=1e-6)
    assert _ids(serving.SizedRecommender(d, use_index=False).recommend(HISTORIES, k=K)) == _ids(want)  # exact at 32


@pytest.mark.parametrize("index", ["exact", "flat"])
def test_a_short_shortlist_is_the_small_size_top_re_scored_by_the_large_one(checkpoint, plain, tmp_path, index):
    small, large = plain
    shortlist = 12
    (d,) = export_sizes(checkpoint, [32], tmp_path, funnel_prefix=8, funnel_shortlist=shortlist, index=index)
    inner = serving.load(d / "shortlist")  # loadable alone: the size-8 model exactly as it serves alone
    assert inner.manifest["retriever"]["kind"] == ("exact" if index == "exact" else "faiss")
    assert _ids(inner.recommend(HISTORIES, k=shortlist)) == _ids(small.recommend(HISTORIES, k=shortlist))
    got = serving.load(d).recommend(HISTORIES, k=K)
    tops = small.recommend(HISTORIES, k=shortlist)
    users = torch.from_numpy(large.encode(HISTORIES))
    for history, (ids, scores), top, user in zip(HISTORIES[:-1], map(_pair, got), _ids(tops), users):  # last: empty
        assert not set(history) & set(ids + top)
        # the size-32 scores of size 8's own top 12, and the best K of them
        best = (large.item_matrix[[ITEM_IDS.index(item) + 1 for item in top]] @ user).topk(K)
        assert ids == [top[i] for i in best.indices]
        np.testing.assert_allclose(scores, best.values.numpy(), rtol=1e-5, atol=1e-6)
    assert _ids([got[-1]])[0] == ITEM_IDS[:K]  # no known item: the most popular ones


def test_a_tampered_shortlist_export_is_one_line(checkpoint, tmp_path):
    (d,) = export_sizes(checkpoint, [32], tmp_path / "exports", funnel_prefix=16, funnel_shortlist=15)
    serving.load(d)
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    data = bytearray((copy / "shortlist" / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "shortlist" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"shortlist/model\.safetensors: checksum mismatch") as caught:
        serving.load(copy)
    assert len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize("prefix", ["12", "32", "64"])  # not a size; the size itself; larger
def test_a_prefix_that_is_not_a_smaller_size_is_one_line(checkpoint, tmp_path, capsys, prefix):
    out = tmp_path / "out"
    assert export_main(["--checkpoint", str(checkpoint), "--dims", "32", "--funnel-prefix", prefix, "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert re.fullmatch(
        rf"error: the funnel prefix {prefix} must be one of the model's sizes below 32 \(\[8, 16\]\): size 32 .*, "
        r"so the funnel shortlists with a smaller size's own network", errors[0]), errors[0]
    assert not out.exists() or list(out.iterdir()) == []


def test_the_smallest_size_has_no_smaller_one_to_shortlist_with(checkpoint, tmp_path, capsys):
    assert export_main(["--checkpoint", str(checkpoint), "--dims", "8", "--funnel-prefix", "4", "--out", str(tmp_path)]) == 2
    assert "the funnel prefix 4 must be one of the model's sizes below 8 (none)" in capsys.readouterr().err


def test_the_online_and_batch_paths_answer_through_the_funnel(checkpoint, plain, tmp_path):
    """serving.online (REST, pyfunc) and the candidate job go through ``recommend_rows``."""
    _, large = plain
    (d,) = export_sizes(checkpoint, [32], tmp_path / "exports", funnel_prefix=8, funnel_shortlist=N)
    m = serving.load(d)
    request = parse_request({"histories": HISTORIES, "k": K}, N)
    for got, want in zip(answer(m, request)["results"], answer(large, request)["results"]):
        assert got["item_ids"] == want["item_ids"]
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-6)
    log = pl.DataFrame({"user_id": [u for u, h in enumerate(HISTORIES) for _ in h],
                        "item_id": [i for h in HISTORIES for i in h],
                        "timestamp": [t for h in HISTORIES for t in range(len(h))]})
    log.write_parquet(tmp_path / "log.parquet")
    frames = []
    for name, model in (("funnel", d), ("plain", large.directory)):
        generate_candidates(model, tmp_path / "log.parquet", tmp_path / name, K, progress=False)
        frames.append(pl.read_parquet(sorted((tmp_path / name).glob("part-*.parquet"))).sort("user_id", "rank"))
    assert frames[0]["item_id"].to_list() == frames[1]["item_id"].to_list()
    np.testing.assert_allclose(frames[0]["score"].to_numpy(), frames[1]["score"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_a_logged_model_is_the_outer_export_not_its_shortlist(checkpoint, tmp_path):
    """``--model-uri`` (and ``make serve MODEL=models:/...``) take the export whose manifest is
    shallowest in the downloaded model, never the shortlist export inside it."""
    (d,) = export_sizes(checkpoint, [32], tmp_path / "logged" / "export", funnel_prefix=8, funnel_shortlist=15)
    (copied,) = fetch_export(str(tmp_path / "logged"), None, tmp_path / "out")
    assert serving.load(copied).size == 32 and serving.load(copied).shortlister.size == 8


def test_a_tied_model_still_shortlists_with_the_prefix(tmp_path):
    """Blocks and tied item vectors: the size's prefix was trained to rank, so ``--funnel-prefix``
    builds the prefix funnel, at any prefix, as before."""
    path = _checkpoint(tmp_path / "tied.ckpt", nesting="blocks")
    for prefix in (8, 12):
        (d,) = export_sizes(path, [32], tmp_path / f"p{prefix}", funnel_prefix=prefix, funnel_shortlist=15)
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["retriever"]["kind"] == "funnel" and manifest["retriever"]["prefix"] == prefix
        assert "nested_exports" not in manifest and not (d / "shortlist").exists()
        assert type(serving.load(d).retriever).__name__ == "FunnelRetriever"
