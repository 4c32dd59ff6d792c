"""Full-ranking metrics against brute-force references: ranks, ties, history masking, averaging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.metrics import RankingMetrics, ndcg_of_ranks, popularity_scores_ranks, target_ranks


def exact_scores(user, items, size):
    """Correctly rounded dot products (``math.fsum``): identical rows score identically."""
    u, z = user[:, :size].double().tolist(), items[:, :size].double().tolist()
    return [[math.fsum(a * b for a, b in zip(ub, zj)) for zj in z] for ub in u]


def brute_ranks(user, items, targets, sizes, seen=None, strict=True):
    """Python loops over every item: 1 + the number of unmasked items scoring strictly higher
    (``strict=False``: higher or equal, the target itself excluded)."""
    out = []
    num_items = items.shape[0] - 1
    for s in sizes:
        scores = exact_scores(user, items, s)
        row = []
        for b, t in enumerate(targets.tolist()):
            masked = set() if seen is None else set(seen[b].tolist()) - {0, t}
            higher = sum(
                1
                for j in range(1, num_items + 1)
                if j not in masked and j != t
                and (scores[b][j] > scores[b][t] if strict else scores[b][j] >= scores[b][t])
            )
            row.append(1 + higher)
        out.append(row)
    return torch.tensor(out)


def _integer_case(users=23, items=61, width=8, history=9, seed=0):
    """Small integer entries: every score is exact, so ties are frequent and exact."""
    gen = torch.Generator().manual_seed(seed)
    user = torch.randint(-2, 3, (users, width), generator=gen).float()
    item_matrix = torch.randint(-2, 3, (items + 1, width), generator=gen).float()
    targets = torch.randint(1, items + 1, (users,), generator=gen)
    seen = torch.randint(0, items + 1, (users, history), generator=gen)
    seen[:, -2:] = 0  # padding
    seen[::3, 0] = targets[::3]  # the target in the history: must not be masked
    seen[::4, 1] = seen[::4, 2]  # repeated items in the history
    return user, item_matrix, targets, seen


@pytest.mark.parametrize("item_block", [65536, 7, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_ranks_equal_brute_force_with_ties(item_block, masked):
    sizes = (2, 4, 8)
    user, items, targets, seen = _integer_case()
    seen_ids = seen if masked else None
    ranks = target_ranks(user, items, targets, sizes, seen_ids=seen_ids, item_block=item_block)
    expected = brute_ranks(user, items, targets, sizes, seen_ids)
    assert ranks.dtype == torch.int64 and ranks.shape == (3, 23)
    assert torch.equal(ranks, expected)
    # the case really has ties with the target: counting them would change many ranks
    assert (brute_ranks(user, items, targets, sizes, seen_ids, strict=False) != expected).sum() > 10


def test_masking_changes_ranks_and_only_lowers_them():
    sizes = (2, 4, 8)
    user, items, targets, seen = _integer_case()
    plain = target_ranks(user, items, targets, sizes)
    masked = target_ranks(user, items, targets, sizes, seen_ids=seen)
    assert (masked <= plain).all()
    assert (masked < plain).any()


def test_ranks_equal_brute_force_float64():
    gen = torch.Generator().manual_seed(1)
    sizes = (3, 5, 12, 16)
    user = torch.randn(17, 16, generator=gen, dtype=torch.float64)
    items = torch.randn(90, 16, generator=gen, dtype=torch.float64)
    targets = torch.randint(1, 90, (17,), generator=gen)
    seen = torch.randint(0, 90, (17, 20), generator=gen)
    for item_block in (65536, 13):
        ranks = target_ranks(user, items, targets, sizes, seen_ids=seen, item_block=item_block)
        assert torch.equal(ranks, brute_ranks(user, items, targets, sizes, seen))


def test_duplicated_item_rows_tie_with_the_target():
    """Items identical to the target (random float32 values) tie with it: never counted higher.

    Holds within one item block (the catalogue here); across blocks exact ties are guaranteed only
    for exactly computed scores (the integer cases above)."""
    gen = torch.Generator().manual_seed(2)
    sizes = (4, 8, 16)
    user = torch.randn(12, 16, generator=gen)
    items = torch.randn(41, 16, generator=gen)
    targets = torch.randint(1, 41, (12,), generator=gen)
    # every user's target gets two copies elsewhere in the catalogue (spread over blocks)
    items = torch.cat([items, items[targets], items[targets]])
    ranks = target_ranks(user, items, targets, sizes)
    expected = brute_ranks(user, items, targets, sizes)
    assert torch.equal(ranks, expected)


def test_padding_row_never_counts():
    sizes = (2, 4, 8)
    user, items, targets, seen = _integer_case()
    loud = items.clone()
    loud[0] = 1000.0 * torch.sign(user.sum(0))  # would outscore everything for most users
    for seen_ids in (None, seen):
        assert torch.equal(target_ranks(user, loud, targets, sizes, seen_ids=seen_ids),
                           target_ranks(user, items, targets, sizes, seen_ids=seen_ids))
    # the best possible rank is 1, reached by a user whose target outscores every real item
    user1 = torch.ones(1, 8)
    items1 = torch.zeros(4, 8)
    items1[0] = 50.0  # padding
    items1[2] = 1.0
    assert target_ranks(user1, items1, torch.tensor([2]), (8,)).tolist() == [[1]]


def test_masking_everything_gives_rank_one():
    user, items, targets, _ = _integer_case(users=4, items=10)
    seen = torch.arange(1, 11).repeat(4, 1)  # the whole catalogue, target included
    ranks = target_ranks(user, items, targets, (2, 4, 8), seen_ids=seen)
    assert torch.equal(ranks, torch.ones(3, 4, dtype=torch.long))


def test_low_precision_inputs_are_compared_in_float32():
    sizes = (2, 4, 8)
    user, items, targets, seen = _integer_case()
    ranks = target_ranks(user.bfloat16(), items.bfloat16(), targets, sizes, seen_ids=seen)
    assert torch.equal(ranks, brute_ranks(user, items, targets, sizes, seen))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=torch.tensor([0, 1, 2])), r"targets must lie in \[1, 10\]"),
        (dict(targets=torch.tensor([1, 11, 2])), r"targets must lie in \[1, 10\]"),
        (dict(targets=torch.tensor([1, 2])), r"targets must have shape \(3,\)"),
        (dict(targets=torch.tensor([1.0, 2.0, 3.0])), "integer"),
        (dict(seen_ids=torch.tensor([[1], [2], [11]])), r"seen_ids must lie in \[0, 10\]"),
        (dict(seen_ids=torch.tensor([1, 2, 3])), "seen_ids must have shape"),
        (dict(sizes=(2, 4)), "largest size must equal"),
        (dict(item_block=0), "item_block"),
        (dict(items=torch.zeros(11, 6)), "width"),
    ],
)
def test_clear_errors(kwargs, message):
    args = dict(user=torch.zeros(3, 8), items=torch.zeros(11, 8), targets=torch.tensor([1, 2, 3]), sizes=(4, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        target_ranks(**args)


def brute_popularity_ranks(popularity, targets, seen):
    out = []
    pop = popularity.tolist()
    for b, t in enumerate(targets.tolist()):
        masked = set() if seen is None else set(seen[b].tolist()) - {0, t}
        out.append(1 + sum(1 for j in range(1, len(pop)) if j not in masked and pop[j] > pop[t]))
    return torch.tensor(out)


@pytest.mark.parametrize("masked", [False, True])
def test_popularity_ranks_equal_brute_force(masked):
    _, _, targets, seen = _integer_case()
    gen = torch.Generator().manual_seed(3)
    popularity = torch.randint(0, 6, (62,), generator=gen).float()  # many ties
    popularity[0] = 1e9  # padding never counts
    seen_ids = seen if masked else None
    ranks = popularity_scores_ranks(popularity, targets, seen_ids, num_sizes=3)
    expected = brute_popularity_ranks(popularity, targets, seen_ids)
    assert ranks.shape == (3, 23)
    for row in ranks:
        assert torch.equal(row, expected)


def test_popularity_ranks_equal_target_ranks_with_one_dimension():
    """Popularity is the score of a one-dimensional model whose user vector is 1."""
    _, _, targets, seen = _integer_case()
    popularity = torch.randint(0, 6, (62,), generator=torch.Generator().manual_seed(4)).float()
    ranks = target_ranks(torch.ones(23, 1), popularity.unsqueeze(1), targets, (1,), seen_ids=seen)
    assert torch.equal(popularity_scores_ranks(popularity, targets, seen, num_sizes=1), ranks)


def test_popularity_errors():
    with pytest.raises(ValueError, match="popularity must have shape"):
        popularity_scores_ranks(torch.zeros(1), torch.tensor([1]), None, 1)
    with pytest.raises(ValueError, match="targets must lie"):
        popularity_scores_ranks(torch.zeros(5), torch.tensor([5]), None, 1)
    with pytest.raises(ValueError, match="num_sizes"):
        popularity_scores_ranks(torch.zeros(5), torch.tensor([1]), None, 0)


# -- the accumulator -------------------------------------------------------------------------------

RANKS = torch.tensor([[1, 2, 5], [3, 1, 10]])  # sizes 4 and 8, three users


def _hand_computed():
    third = 1.0 / 3.0
    return {
        "ndcg_1/d4": third,
        "ndcg_3/d4": (1.0 + 1.0 / math.log2(3)) / 3,
        "recall_1/d4": third,
        "recall_3/d4": 2 * third,
        "mrr/d4": (1.0 + 0.5 + 0.2) / 3,
        "ndcg_1/d8": third,
        "ndcg_3/d8": (0.5 + 1.0) / 3,
        "recall_1/d8": third,
        "recall_3/d8": 2 * third,
        "mrr/d8": (1.0 / 3 + 1.0 + 0.1) / 3,
        "count": 3.0,
    }


def test_ranking_metrics_hand_computed():
    metrics = RankingMetrics((4, 8), ks=(1, 3))
    metrics.update(RANKS)
    values = metrics.compute()
    expected = _hand_computed()
    assert set(values) == set(expected)
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, abs=1e-12), key


def test_ranking_metrics_accumulate_and_reset():
    metrics = RankingMetrics((4, 8), ks=(1, 3))
    metrics.update(RANKS[:, :1])
    metrics.update(RANKS[:, 1:])
    assert metrics.compute() == pytest.approx(_hand_computed(), abs=1e-12)
    assert metrics.compute() == pytest.approx(_hand_computed(), abs=1e-12)  # compute does not consume
    metrics.reset()
    with pytest.raises(RuntimeError, match="before any user"):
        metrics.compute()
    metrics.update(torch.tensor([[1], [1]]))
    assert metrics.compute()["ndcg_3/d8"] == 1.0 and metrics.compute()["count"] == 1.0


def test_ranking_metrics_default_keys():
    metrics = RankingMetrics((16, 32, 64))
    metrics.update(torch.tensor([[1, 30], [7, 12], [25, 2]]))
    values = metrics.compute()
    assert len(values) == 3 * 7 + 1
    assert values["recall_10/d32"] == 0.5 and values["recall_20/d32"] == 1.0
    assert values["ndcg_5/d16"] == pytest.approx(0.5)


def test_ranking_metrics_errors():
    with pytest.raises(ValueError, match="ks"):
        RankingMetrics((4, 8), ks=(0, 5))
    metrics = RankingMetrics((4, 8))
    with pytest.raises(ValueError, match=r"shape \(2, B\)"):
        metrics.update(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="start at 1"):
        metrics.update(torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="integer"):
        metrics.update(torch.tensor([[1.0], [1.0]]))


def test_ranking_metrics_reduce_across_processes(monkeypatch):
    """With a (simulated) second process holding the same sums, counts double and means stay."""
    dist = torch.distributed
    reduced = []

    def all_reduce(tensor, op=None):
        reduced.append(tensor.clone())
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    metrics = RankingMetrics((4, 8), ks=(1, 3))
    metrics.update(RANKS)
    values = metrics.compute()
    assert len(reduced) == 1 and reduced[0].dtype == torch.float64
    expected = _hand_computed()
    expected["count"] = 6.0
    assert values == pytest.approx(expected, abs=1e-12)


def test_ranking_metrics_keep_every_users_ranks_sorted_by_user():
    metrics = RankingMetrics((4, 8), ks=(1, 3), keep_ranks=True)
    metrics.update(RANKS[:, 1:], users=torch.tensor([9, 2]))
    metrics.update(RANKS[:, :1], users=torch.tensor([5]))
    users, ranks = metrics.per_user_ranks()
    assert users.tolist() == [2, 5, 9]
    np.testing.assert_array_equal(ranks, RANKS[:, [2, 0, 1]].numpy())
    # the per-user ranks give back the averaged metrics
    assert ndcg_of_ranks(ranks[1], k=3).mean() == pytest.approx(metrics.compute()["ndcg_3/d8"], abs=1e-12)
    with pytest.raises(ValueError, match="users' ids"):
        metrics.update(RANKS)
    metrics.reset()
    assert metrics.per_user_ranks()[0].size == 0
    with pytest.raises(RuntimeError, match="keep_ranks=True"):
        RankingMetrics((4, 8)).per_user_ranks()


def _distributed_worker(rank, world_size, init_file, out_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metrics = RankingMetrics((4, 8), ks=(1, 3), keep_ranks=True)
        # disjoint users
        metrics.update(RANKS[:, :1], torch.tensor([3])) if rank == 0 else metrics.update(RANKS[:, 1:], torch.tensor([1, 2]))
        values = metrics.compute()
        users, ranks = metrics.per_user_ranks()
        assert users.tolist() == [1, 2, 3]  # every process gets every user's ranks
        np.testing.assert_array_equal(ranks, RANKS[:, [1, 2, 0]].numpy())
        if rank == 0:
            torch.save(values, out_file)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranking_metrics_two_gloo_processes(tmp_path):
    out_file = tmp_path / "values.pt"
    torch.multiprocessing.spawn(
        _distributed_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True
    )
    assert torch.load(out_file, weights_only=True) == pytest.approx(_hand_computed(), abs=1e-12)


@pytest.mark.parametrize("item_block", [7, 65536])
def test_a_nan_score_never_wins(item_block):
    """A diverged model (NaN vectors) ranks its targets last, never first; a NaN item beats the target."""
    user, items, targets, _ = _integer_case()
    sizes, n = (4, 8), items.shape[0] - 1
    nan_user = user.clone()
    nan_user[0] = math.nan
    ranks = target_ranks(nan_user, items, targets, sizes, item_block=item_block)
    assert (ranks[:, 0] == n).all()
    torch.testing.assert_close(ranks[:, 1:], target_ranks(user, items, targets, sizes, item_block=item_block)[:, 1:])
    # one item other than user 1's target turns NaN: it counts as higher for everybody else
    other = next(j for j in range(1, n + 1) if j != int(targets[1]) and (targets != j).all())
    nan_items = items.clone()
    nan_items[other, 5] = math.nan
    before = target_ranks(user, items, targets, sizes, item_block=item_block)
    after = target_ranks(user, nan_items, targets, sizes, item_block=item_block)
    assert torch.equal(after[0], before[0])  # size 4 does not read dimension 5
    assert (after[1] >= before[1]).all() and (after[1] == before[1] + 1).any()


@pytest.mark.parametrize("item_block", [7, 65536])
@pytest.mark.parametrize("value", [math.inf, -math.inf], ids=["+inf", "-inf"])
def test_an_infinite_target_score_ranks_last(item_block, value):
    """A target scoring +inf (an overflowed vector) is not a win either: it ranks last, as NaN does,
    with and without history masking (masked items score -inf inside the count)."""
    user, items, targets, _ = _integer_case()
    sizes, n = (4, 8), items.shape[0] - 1
    big = items.clone()
    big[int(targets[0]), 0] = value  # user 0's target scores +-inf (every user entry is positive)
    seen = torch.zeros(len(targets), 2, dtype=torch.long)
    seen[0] = torch.tensor([j for j in range(1, n + 1) if j != int(targets[0])][:2])
    for mask in (None, seen):
        ranks = target_ranks(user.abs() + 1, big, targets, sizes, seen_ids=mask, item_block=item_block)
        assert (ranks[:, 0] == n).all(), ranks[:, 0]
