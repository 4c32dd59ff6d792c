"""Tests of recsys.retrieval.funnel: the funnel equals exact search when nothing is cut, re-ranks
at prefixes, composes with any prefix retriever, and its settings round-trip and are checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval_data import brute_force, gaussian, min_gap
from recsys.retrieval import build_retriever
from recsys.retrieval.exact import ExactRetriever, torch_topk
from recsys.retrieval.faiss_index import FaissRetriever, IndexSpec
from recsys.retrieval.funnel import FunnelRetriever, FunnelSpec
from recsys.retrieval.recall import recall_at_k


def test_funnel_with_full_shortlist_equals_exact_search(data):
    items, queries = data
    ref_scores, ref_rows = torch_topk(queries, items, 25)
    assert min_gap(ref_scores) > 1e-4
    funnel = FunnelRetriever(items, FunnelSpec(prefix=8, shortlist=len(items), rerank_dims=48))
    scores, rows = funnel.search(queries, 25)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    # two re-rank stages, keeping everything after the first, are exact too
    two_stage = FunnelRetriever(items, FunnelSpec(prefix=8, shortlist=len(items), rerank_dims=[16, 48], keep=[len(items)]))
    np.testing.assert_array_equal(two_stage.search(queries, 25)[1], ref_rows)


def test_funnel_reranks_at_a_prefix_of_wider_vectors(data):
    items, queries = data
    ref_scores, ref_rows = torch_topk(queries[:, :32], items[:, :32], 10)
    funnel = FunnelRetriever(items, FunnelSpec(prefix=8, shortlist=len(items), rerank_dims=32))
    scores, rows = funnel.search(queries, 10)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_funnel_generous_shortlist_on_matryoshka_like_data(clustered_data):
    items, queries = clustered_data
    _, truth = torch_topk(queries, items, 10)
    funnel = FunnelRetriever(items, FunnelSpec(prefix=8, shortlist=1500, rerank_dims=[16, 32], keep=[400]))
    _, rows = funnel.search(queries, 10)
    assert recall_at_k(rows, truth) == 1.0
    # an approximate prefix index still gives high recall (an exact one gets 0.94 here)
    funnel_hnsw = FunnelRetriever(items, FunnelSpec(prefix=8, shortlist=300, rerank_dims=32, index=IndexSpec("hnsw")))
    assert recall_at_k(funnel_hnsw.search(queries, 10)[1], truth) >= 0.8


def test_funnel_with_exclusion_equals_exact_filtered(data):
    items, queries = data
    _, top = torch_topk(queries, items, 5)
    exclude = [top[b, : b % 5] for b in range(len(queries))]
    funnel = FunnelRetriever(items, FunnelSpec(prefix=8, shortlist=len(items), rerank_dims=48))
    _, rows = funnel.search(queries, 10, exclude=exclude)
    np.testing.assert_array_equal(rows, brute_force(queries, items, 10, exclude))


def test_funnel_settings_round_trip_through_json(data):
    items, queries = data
    funnel = FunnelRetriever(items, FunnelSpec(8, 200, [16, 48], keep=[100], index=IndexSpec("hnsw", ef_search=64)))
    text = json.dumps(funnel.to_dict())
    entry = json.loads(text)
    assert entry["kind"] == "funnel" and entry["index"]["ef_search"] == 64 and entry["index"]["hnsw_m"] == 32
    settings = {key: value for key, value in entry.items() if key != "kind"}
    again = FunnelRetriever(items, FunnelSpec.from_dict(settings), prefix_retriever=funnel.prefix_retriever)
    assert again.spec == funnel.spec
    assert build_retriever(items, entry).to_dict() == entry  # the entry rebuilds the same funnel
    np.testing.assert_array_equal(again.search(queries, 10)[1], funnel.search(queries, 10)[1])
    assert FunnelSpec.from_dict(json.loads(FunnelSpec(16, 100, 32).to_json())).keep == ()


def test_funnel_bad_settings():
    with pytest.raises(ValueError, match="rerank_dims must increase and exceed prefix=32"):
        FunnelSpec(32, 100, [32])
    with pytest.raises(ValueError, match="rerank_dims must increase"):
        FunnelSpec(16, 100, [64, 32])
    with pytest.raises(ValueError, match="keep must not grow"):
        FunnelSpec(16, 100, [32, 64], keep=[200])
    with pytest.raises(ValueError, match="keep needs 1 entries"):
        FunnelSpec(16, 100, [32, 64], keep=[50, 20])
    with pytest.raises(ValueError, match="shortlist must be an integer >= 1"):
        FunnelSpec(16, 0, 32)
    with pytest.raises(ValueError, match="unknown funnel spec keys \\['depth'\\]"):
        FunnelSpec.from_dict({"prefix": 16, "shortlist": 10, "rerank_dims": [32], "depth": 2})
    with pytest.raises(ValueError, match="exceed the vectors' width 48"):
        FunnelRetriever(gaussian(50, 48, 0), FunnelSpec(16, 10, 64))


def test_funnel_over_an_exact_prefix_retriever(data):
    """Any retriever can shortlist: an exact torch one gives exact results with a full shortlist,
    and its manifest entry names it."""
    items, queries = data
    ref_scores, ref_rows = torch_topk(queries, items, 25)
    spec = FunnelSpec(prefix=8, shortlist=len(items), rerank_dims=[16, 48], keep=[len(items)])
    funnel = FunnelRetriever(items, spec, prefix_retriever=ExactRetriever(items[:, :8]))
    scores, rows = funnel.search(queries, 25)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    entry = funnel.to_dict()
    assert entry["prefix_retriever"] == {"kind": "exact"} and "index" not in entry
    np.testing.assert_array_equal(build_retriever(items, entry).search(queries, 25)[1], ref_rows)


def test_funnel_pruning_stage_scores_are_the_prefix_recurrence(data):
    """After an intermediate stage keeps a few rows, the last stage's scores are still the exact
    inner products at its width (the earlier chunk's scores plus the new chunk's)."""
    items, queries = data
    funnel = FunnelRetriever(items, FunnelSpec(prefix=8, shortlist=300, rerank_dims=[16, 40], keep=[50]))
    scores, rows = funnel.search(queries, 20)
    true = np.einsum("bd,bkd->bk", queries[:, :40], items[rows][:, :, :40])
    np.testing.assert_allclose(scores, true, rtol=1e-4, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_funnel_refuses_a_prefix_retriever_of_another_shape(data):
    items, _ = data
    with pytest.raises(ValueError, match="covers 2000 rows of 16 dims, expected 2000 rows of 8 dims"):
        FunnelRetriever(items, FunnelSpec(8, 100, 48), prefix_retriever=FaissRetriever.build(items[:, :16]))
    with pytest.raises(ValueError, match="the funnel re-ranks at 48"):
        FunnelRetriever(items, FunnelSpec(8, 100, 48)).search(items[:2, :32], 5)
