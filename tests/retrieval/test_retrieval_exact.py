"""Tests of serving.retrieval.exact: blocked torch top-k, its exclusion and padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval_data import brute_force
from serving.retrieval.exact import ExactRetriever, torch_topk


def test_torch_topk_blocked_equals_unblocked(data):
    items, queries = data
    one_block = torch_topk(queries, items, 30)
    blocked = torch_topk(torch.from_numpy(queries), torch.from_numpy(items), 30, block_rows=128)
    np.testing.assert_array_equal(blocked[1], one_block[1])
    np.testing.assert_allclose(blocked[0], one_block[0], rtol=1e-6)


@pytest.mark.parametrize("block_rows", [128, 100_000])
def test_exclusion_is_masked_in_every_block(data, block_rows):
    items, queries = data
    _, top = torch_topk(queries, items, 30)
    rng = np.random.default_rng(1)
    # each query's own top rows (spread over several blocks of 128) plus random ones and a duplicate
    exclude = [np.concatenate([top[b, : b % 9], rng.integers(0, 2000, 4), top[b, :1]]) for b in range(len(queries))]
    scores, rows = torch_topk(queries, items, 20, block_rows=block_rows, exclude=exclude)
    np.testing.assert_array_equal(rows, brute_force(queries, items, 20, exclude))
    assert np.isfinite(scores).all()
    assert not any(set(rows[b].tolist()) & set(exclude[b].tolist()) for b in range(len(queries)))


def test_exclusion_of_almost_everything_pads(data):
    items, queries = data
    scores, rows = torch_topk(queries[:2], items[:12], 5, exclude=[np.arange(10)] * 2)
    assert set(rows[0, :2].tolist()) == {10, 11} and (rows[:, 2:] == -1).all()
    assert np.isneginf(scores[:, 2:]).all() and np.isfinite(scores[:, :2]).all()


def test_retriever_on_a_tensor_equals_numpy(data):
    items, queries = data
    retriever = ExactRetriever(torch.from_numpy(items))
    assert (retriever.num_rows, retriever.dim) == (2000, 48)
    a = retriever.search(torch.from_numpy(queries), 10, exclude=[np.array([1, 2])] * len(queries))
    b = ExactRetriever(items).search(queries, 10, exclude=[np.array([1, 2])] * len(queries))
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    with pytest.raises(ValueError, match="must be 2-D with equal widths"):
        retriever.search(queries[:, :32], 10)
    with pytest.raises(ValueError, match="unknown exact retriever settings \\['block_rows'\\]"):
        ExactRetriever.build(items, {"kind": "exact", "block_rows": 5})
