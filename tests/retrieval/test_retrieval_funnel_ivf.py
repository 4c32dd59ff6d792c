"""The IVF funnel (AdANNS-IVF, docs/method.md §6): an IVF-flat index clustered, probed and scanned on
a prefix shortlists, exact re-ranking at the full size finishes. Probing every list is exact; the
settings travel through the manifest and the export directory; bad ones stop with one message."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval_data import brute_force, min_gap
from recsys.retrieval import build_retriever, load_retriever
from recsys.retrieval.exact import torch_topk
from recsys.retrieval.faiss_index import FaissRetriever, IndexSpec
from recsys.retrieval.funnel import FunnelRetriever, FunnelSpec
from recsys.retrieval.recall import recall_at_k

NLIST = 16


def ivf_funnel(items, shortlist, nprobe=NLIST, prefix=8):
    spec = FunnelSpec(prefix, shortlist, items.shape[1], index=IndexSpec("ivf_flat", nlist=NLIST, nprobe=nprobe))
    return FunnelRetriever(items, spec)


def test_probing_every_list_with_a_full_shortlist_is_exact_search(data):
    items, queries = data
    ref_scores, ref_rows = torch_topk(queries, items, 25)
    assert min_gap(ref_scores) > 1e-4
    scores, rows = ivf_funnel(items, len(items)).search(queries, 25)
    assert rows.shape == scores.shape == (len(queries), 25)
    assert rows.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_probing_every_list_shortlists_like_the_flat_prefix(clustered_data):
    """With nprobe = nlist the IVF index scans every row at the prefix: the same shortlist as a
    flat prefix index, so the same re-ranked result."""
    items, queries = clustered_data
    flat = FunnelRetriever(items, FunnelSpec(8, 300, 32))
    np.testing.assert_array_equal(ivf_funnel(items, 300).search(queries, 10)[1], flat.search(queries, 10)[1])


def test_fewer_probes_lose_recall_monotonically_here(clustered_data):
    items, queries = clustered_data
    _, truth = torch_topk(queries, items, 10)
    funnel = ivf_funnel(items, 500)
    recalls = []
    for nprobe in (1, 4, NLIST):
        stage0 = funnel.prefix_retriever.with_search_settings(nprobe=nprobe)
        sweep = FunnelRetriever(items, FunnelSpec(8, 500, 32, index=stage0.spec), stage0)
        assert sweep.to_dict()["index"]["nprobe"] == nprobe
        recalls.append(recall_at_k(sweep.search(queries, 10)[1], truth))
    assert recalls[0] < recalls[-1] and recalls == sorted(recalls)
    # the shared index keeps answering with each retriever's own nprobe
    assert recall_at_k(funnel.search(queries, 10)[1], truth) == recalls[-1]


def test_ivf_funnel_excludes_rows(data):
    items, queries = data
    _, top = torch_topk(queries, items, 5)
    exclude = [top[b, : b % 5] for b in range(len(queries))]
    _, rows = ivf_funnel(items, len(items)).search(queries, 10, exclude=exclude)
    np.testing.assert_array_equal(rows, brute_force(queries, items, 10, exclude))


def test_ivf_funnel_save_load_round_trip(clustered_data, tmp_path):
    items, queries = clustered_data
    funnel = ivf_funnel(items, 300, nprobe=4)
    entry = json.loads(json.dumps(funnel.to_dict()))
    assert entry["index"] == {"kind": "ivf_flat", "nlist": NLIST, "nprobe": 4, "train_size": 64 * NLIST, "seed": 0}
    assert funnel.save(tmp_path) == ["index.faiss"]
    loaded = load_retriever(tmp_path, entry, items, device="cpu")
    assert isinstance(loaded, FunnelRetriever) and loaded.to_dict() == entry
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], funnel.search(queries, 10)[1])
    # nprobe is a search-time setting: a manifest may change it without rebuilding the index
    wider = {**entry, "index": {**entry["index"], "nprobe": NLIST}}
    again = load_retriever(tmp_path, wider, items, device="cpu")
    np.testing.assert_array_equal(again.search(queries, 10)[1], ivf_funnel(items, 300).search(queries, 10)[1])
    assert build_retriever(items, entry).to_dict() == entry


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda items: ivf_funnel(items, 100, nprobe=NLIST + 1), f"nprobe={NLIST + 1} exceeds nlist={NLIST}"),
        (lambda items: FunnelRetriever(items[:10], FunnelSpec(8, 5, 48, index=IndexSpec("ivf_flat", nlist=16))),
         "nlist=16 exceeds the number of items 10"),
        (lambda items: ivf_funnel(items, 100).prefix_retriever.with_search_settings(ef_search=64),
         "parameter ef_search=64 does not apply to index kind 'ivf_flat'"),
        (lambda items: ivf_funnel(items, 100).prefix_retriever.with_search_settings(nprobe=0),
         "nprobe must be an integer >= 1, got 0"),
    ],
)
def test_bad_ivf_funnel_settings(data, make, message):
    items, _ = data
    with pytest.raises(ValueError, match=message):
        make(items)


def test_with_search_settings_on_hnsw_and_flat(data):
    items, queries = data
    hnsw = FaissRetriever.build(items[:, :8], IndexSpec("hnsw", ef_search=16))
    wide = hnsw.with_search_settings(ef_search=128)
    assert wide.spec.ef_search == 128 and wide.index is hnsw.index and hnsw.spec.ef_search == 16
    flat = FaissRetriever.build(items[:, :8], IndexSpec("flat"))
    with pytest.raises(ValueError, match="parameter nprobe=4 does not apply to index kind 'flat'"):
        flat.with_search_settings(nprobe=4)
