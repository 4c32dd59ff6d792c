"""Tests of recsys.retrieval.exact: blocked torch top-k, its exclusion and padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval_data import brute_force
from recsys.retrieval.exact import ExactRetriever, torch_topk


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


def _full_topk(queries, items, k, exclude=None):
    """The plain reference: the whole score matrix, excluded rows -inf, a stable descending sort
    (equal scores by row), -1 where the score is -inf, padded to k."""
    scores = torch.from_numpy(queries) @ torch.from_numpy(items).T
    for b, rows in enumerate(exclude or []):
        scores[b, torch.as_tensor(np.asarray(rows, dtype=np.int64))] = -torch.inf
    values, rows = torch.sort(scores, dim=1, descending=True, stable=True)
    values, rows = values[:, :k].numpy(), rows[:, :k].numpy()
    rows = np.where(np.isneginf(values), -1, rows)
    missing = k - values.shape[1]
    return (np.pad(values, ((0, 0), (0, missing)), constant_values=-np.inf),
            np.pad(rows, ((0, 0), (0, missing)), constant_values=-1))


@pytest.mark.parametrize(
    "n, k, block_rows",
    [(3000, 10, 256), (3000, 100, 100), (50, 60, 32), (1000, 999, 64), (70, 7, 1), (300, 5, None), (64, 64, 7)],
)
def test_streaming_topk_equals_the_full_topk_with_ties_and_exclusion(n, k, block_rows):
    """Half-integer vectors: sums are exact in float32 whatever the blocking, and scores tie often
    (also across blocks and at the k-th place): the rows must be exactly the reference's."""
    rng = np.random.default_rng(n + k)
    items = (np.round(rng.standard_normal((n, 4)) * 2) / 2).astype(np.float32)
    queries = (np.round(rng.standard_normal((23, 4)) * 2) / 2).astype(np.float32)
    exclude = [rng.integers(0, n, int(rng.integers(0, n // 2 + 1))) for _ in range(len(queries))]
    exclude[0] = np.arange(n)  # nothing left
    exclude[1] = np.arange(1, n)  # one row left
    for ex in (None, exclude):
        scores, rows = torch_topk(queries, items, k, block_rows, exclude=ex)
        want_scores, want_rows = _full_topk(queries, items, k, ex)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_array_equal(scores, want_scores)
    assert (rows[0] == -1).all() and (rows[1, 1:] == -1).all() and rows[1, 0] == 0


def test_equal_scores_at_the_cut_keep_the_lower_rows():
    # 40 identical items: whatever block they fall in, the k kept are the lowest rows, in order
    items = np.ones((40, 3), dtype=np.float32)
    items[25] = 2.0  # one better item, in a later block
    scores, rows = torch_topk(np.ones((2, 3), dtype=np.float32), items, 6, block_rows=8)
    np.testing.assert_array_equal(rows, [[25, 0, 1, 2, 3, 4]] * 2)
    np.testing.assert_array_equal(scores, [[6, 3, 3, 3, 3, 3]] * 2)


@pytest.mark.parametrize("group", [1, 2, 4, 7])
def test_group_shortlist_is_exact_with_ties_exclusion_and_a_ragged_tail(monkeypatch, group):
    """The top-k shortlist (groups of columns by their maxima) used in every block, small groups so
    that ties, excluded rows and a last partial group meet it: rows exactly the reference's."""
    import recsys.retrieval.exact as exact

    monkeypatch.setattr(exact, "GROUP", group)
    monkeypatch.setattr(exact, "SHORTLIST_FROM", 1)
    rng = np.random.default_rng(group)
    n = 1003
    items = (np.round(rng.standard_normal((n, 4)) * 2) / 2).astype(np.float32)
    queries = (np.round(rng.standard_normal((17, 4)) * 2) / 2).astype(np.float32)
    exclude = [rng.integers(0, n, int(rng.integers(0, n // 2 + 1))) for _ in range(len(queries))]
    exclude[0] = np.arange(n - 3)  # three rows left, fewer than k
    for k, block_rows in ((5, None), (20, 301), (50, 1003)):
        for ex in (None, exclude):
            scores, rows = torch_topk(queries, items, k, block_rows, exclude=ex)
            want_scores, want_rows = _full_topk(queries, items, k, ex)
            np.testing.assert_array_equal(rows, want_rows)
            np.testing.assert_array_equal(scores, want_scores)


def test_queries_searched_a_few_at_a_time_give_the_same_rows(monkeypatch):
    """More queries than one block holds at its widest are searched in chunks: same result, exclusions
    kept with their own queries."""
    import recsys.retrieval.exact as exact

    rng = np.random.default_rng(3)
    items = (np.round(rng.standard_normal((500, 4)) * 2) / 2).astype(np.float32)
    queries = (np.round(rng.standard_normal((37, 4)) * 2) / 2).astype(np.float32)
    exclude = [rng.integers(0, 500, int(rng.integers(0, 200))) for _ in range(len(queries))]
    whole = torch_topk(queries, items, 9, exclude=exclude)
    monkeypatch.setattr(exact, "BLOCK_ELEMENTS", 500 * 5)  # 5 queries at a time
    monkeypatch.setattr(exact, "WIDE_BLOCK", 500)
    chunked = torch_topk(queries, items, 9, exclude=exclude)
    np.testing.assert_array_equal(chunked[1], whole[1])
    np.testing.assert_array_equal(chunked[0], whole[0])
    want = _full_topk(queries, items, 9, exclude)
    np.testing.assert_array_equal(chunked[1], want[1])
