"""The retriever interface: every implementation (exact torch, faiss flat, funnel) honours the same
result contract, exclusion and padding semantics, manifest entry and save/load round trip; and
manifests from before the "retriever" entry still name the right retriever."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval_data import brute_force, min_gap
from recsys.retrieval import (
    RETRIEVERS,
    ExactRetriever,
    FaissRetriever,
    FunnelRetriever,
    FunnelSpec,
    IndexSpec,
    Retriever,
    build_retriever,
    load_retriever,
    recall_at_k,
    retriever_entry,
    torch_topk,
)

# Exact configurations of every kind: they must all return the brute-force rows.
ENTRIES = {
    "exact": {"kind": "exact"},
    "faiss_flat": {"kind": "faiss", "index": {"kind": "flat"}},
    "funnel": {"kind": "funnel", "prefix": 8, "shortlist": 2000, "rerank_dims": [16, 48], "keep": [2000]},
    "funnel_over_exact": {"kind": "funnel", "prefix": 8, "shortlist": 2000, "rerank_dims": [48],
                          "prefix_retriever": {"kind": "exact"}},
}


@pytest.fixture(scope="module", params=list(ENTRIES))
def retriever(request, data) -> Retriever:
    return build_retriever(data[0], ENTRIES[request.param])


def test_results_follow_the_contract(retriever, data):
    items, queries = data
    ref_scores, ref_rows = torch_topk(queries, items, 25)
    assert min_gap(ref_scores) > 1e-4
    assert isinstance(retriever, Retriever) and (retriever.num_rows, retriever.dim) == (2000, 48)
    scores, rows = retriever.search(queries, 25)
    assert scores.shape == rows.shape == (40, 25)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    assert (np.diff(scores, axis=1) <= 0).all()
    np.testing.assert_array_equal(rows, brute_force(queries, items, 25))
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_exclusion_and_padding_are_the_same_everywhere(retriever, data):
    items, queries = data
    _, top = torch_topk(queries, items, 10)
    exclude = [top[b, : b % 6] for b in range(len(queries))]
    exclude[0] = np.array([], dtype=np.int64)
    _, rows = retriever.search(queries, 12, exclude=exclude)
    np.testing.assert_array_equal(rows, brute_force(queries, items, 12, exclude))
    # all but two rows excluded, k=5: two results, then -1 / -inf
    small = build_retriever(items[:12], retriever.to_dict())  # a funnel's shortlist may exceed the rows
    scores, rows = small.search(queries[:2], 5, exclude=[np.arange(10)] * 2)
    assert set(rows[0, :2].tolist()) == {10, 11} and (rows[:, 2:] == -1).all()
    assert np.isneginf(scores[:, 2:]).all() and np.isfinite(scores[:, :2]).all()
    # k beyond the catalogue pads too
    scores, rows = small.search(queries[:3], 15)
    assert rows.shape == (3, 15) and (rows[:, 12:] == -1).all() and np.isneginf(scores[:, 12:]).all()
    np.testing.assert_array_equal(rows[:, :12], brute_force(queries[:3], items[:12], 12))


def test_bad_inputs_give_the_same_errors_everywhere(retriever, data):
    _, queries = data
    with pytest.raises(ValueError, match="exclude has 1 entries for 2 queries"):
        retriever.search(queries[:2], 5, exclude=[np.array([1])])
    with pytest.raises(ValueError, match="exclude\\[1\\] holds row 2000"):
        retriever.search(queries[:2], 5, exclude=[np.array([1]), np.array([3, 2000])])
    with pytest.raises(ValueError, match="exclude\\[0\\] holds row -1"):
        retriever.search(queries[:2], 5, exclude=[[-1], []])
    with pytest.raises(ValueError, match="integer rows"):
        retriever.search(queries[:2], 5, exclude=[np.array([1.5]), []])
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        retriever.search(queries, 0)


def test_entry_round_trips_through_json_and_an_export_directory(retriever, data, tmp_path):
    items, queries = data
    entry = json.loads(json.dumps(retriever.to_dict()))
    assert entry["kind"] == type(retriever).kind and RETRIEVERS[entry["kind"]] is type(retriever)
    assert build_retriever(items, entry).to_dict() == entry
    files = retriever.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no temporary file left behind
    loaded = load_retriever(tmp_path, entry, items, device="cpu")
    assert type(loaded) is type(retriever) and loaded.to_dict() == entry
    exclude = [np.array([b]) for b in range(len(queries))]
    np.testing.assert_array_equal(loaded.search(queries, 10, exclude)[1], retriever.search(queries, 10, exclude)[1])


def test_what_each_kind_writes(data, tmp_path):
    items, _ = data
    assert build_retriever(items, ENTRIES["exact"]).save(tmp_path / "none") == []
    for name in ("faiss_flat", "funnel"):
        (tmp_path / name).mkdir()
        assert build_retriever(items, ENTRIES[name]).save(tmp_path / name) == ["index.faiss"]
    funnel = build_retriever(items, ENTRIES["funnel"])
    assert isinstance(funnel, FunnelRetriever) and isinstance(funnel.prefix_retriever, FaissRetriever)
    assert funnel.to_dict()["index"] == {"kind": "flat", "seed": 0}


def test_unknown_kinds_and_settings_are_refused(data):
    items, _ = data
    with pytest.raises(ValueError, match="retriever kind must be one of \\['exact', 'faiss', 'funnel'\\], got 'annoy'"):
        build_retriever(items, {"kind": "annoy"})
    with pytest.raises(ValueError, match="index kind must be one of \\['flat', 'ivf_flat', 'hnsw', 'ivf_pq'\\], got 'annoy'"):
        build_retriever(items, {"kind": "faiss", "index": {"kind": "annoy"}})
    with pytest.raises(ValueError, match="unknown funnel spec keys \\['depth'\\]"):
        build_retriever(items, {**ENTRIES["funnel"], "depth": 2})
    with pytest.raises(ValueError, match="a faiss retriever entry has the keys 'kind' and 'index'"):
        build_retriever(items, {"kind": "faiss", "nlist": 3})
    with pytest.raises(ValueError, match="not both"):
        build_retriever(items, {**ENTRIES["funnel_over_exact"], "index": {"kind": "flat"}})


def test_manifest_entries_old_and_new():
    new = {"kind": "faiss", "index": {"kind": "hnsw", "seed": 0}}
    assert retriever_entry({"retriever": new, "index": {"kind": "flat"}}) == new
    index = {"kind": "ivf_flat", "nlist": 8, "nprobe": 1, "train_size": 512, "seed": 0}
    checksums = {"index.faiss": "0" * 64, "model.safetensors": "1" * 64}
    # format 1 before "retriever": "index" (+ "funnel"), index.faiss present
    assert retriever_entry({"index": index, "funnel": None, "checksums": checksums}) == {"kind": "faiss", "index": index}
    funnel = FunnelSpec(8, 100, 32, index=IndexSpec("flat")).to_dict()
    assert retriever_entry({"index": funnel["index"], "funnel": funnel, "checksums": checksums}) == {"kind": "funnel", **funnel}
    # no index.faiss: the old loader searched exactly
    assert retriever_entry({"index": index, "checksums": {"model.safetensors": "1" * 64}}) == {"kind": "exact"}


def test_recall_at_k():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, -1]])
    found = np.array([[4, 9, 1, 8], [7, -1, -1, 0]])
    assert recall_at_k(found, truth) == pytest.approx((2 / 4 + 1 / 3) / 2)


def test_exact_retriever_is_the_reference(data):
    items, queries = data
    scores, rows = ExactRetriever(items).search(queries, 7)
    ref = torch_topk(queries, items, 7)
    np.testing.assert_array_equal(rows, ref[1])
    np.testing.assert_array_equal(scores, ref[0])
