"""Elastic sub-models (recsys/nn/grid.py): the trained (depth, width, size) triples, the cut model
of each triple, and the loss and ranking over a grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys.metrics import target_ranks
from recsys.model import MatryoshkaRecommender
from recsys.model_options import OptionError
from recsys.nn.encoders import build_encoder
from recsys.nn.grid import Triple, build_grid, vector_groups
from recsys.nn.item_tower import FixedItemMatrix
from recsys.nn.nested import cut_to_size, nested_parameter_count
from recsys.nn.recommender import SequentialRecommender
from tests.test_export import _features

SIZES = (8, 16, 32)
N = 40


def test_no_options_no_grid_and_the_diagonal_pairs_small_with_shallow():
    assert build_grid(SIZES, 3) is None
    diagonal = build_grid((16, 32, 64, 128), 4, depths=[1, 2, 4])
    assert [t.label for t in diagonal] == ["L1_w16_d16", "L2_w32_d32", "L2_w64_d64", "L4_w128_d128"]
    full = build_grid(SIZES, 2, depths=[1, 2], pairs=[[8, 8], [32, 8], [32, 32]], grid="full")
    assert len(full) == 6 and Triple(1, 32, 8) in full and Triple(2, 32, 32) in full
    # the widths and sizes alone: one depth, the w = s end and the MRL-only end in one grid
    assert build_grid(SIZES, 2, pairs=[[8, 8], [32, 8]]) == (Triple(2, 8, 8), Triple(2, 32, 8))
    assert build_grid(SIZES, 2, triples=[[1, 16, 8]]) == (Triple(1, 16, 8),)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pairs": [[8, 16]]}, "may not exceed the width"),
        ({"pairs": [[12, 8]]}, "must be among sizes"),
        ({"depths": [1, 3]}, "must equal n_blocks"),
        ({"depths": [2, 1]}, "strictly increasing"),
        ({"triples": [[3, 8, 8]]}, "not among depths"),
        ({"pairs": [[8]]}, "[width, size]"),
        ({"depths": [1, 2], "grid": "square"}, "unknown grid"),
    ],
)
def test_bad_grid_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_grid(SIZES, 2, **options)


def _net(encoder: str, grid, n_blocks: int = 3, seed: int = 0) -> SequentialRecommender:
    torch.manual_seed(seed)
    options = {"n_blocks": n_blocks, "dropout": 0.0}
    if encoder == "mamba":
        options["use_kernels"] = False
    net = SequentialRecommender(
        FixedItemMatrix(torch.randn(N + 1, SIZES[-1]) * (torch.arange(N + 1) > 0).unsqueeze(1), SIZES),
        build_encoder(encoder, SIZES, **options),
        grid=grid,
    ).eval()
    with torch.no_grad():  # heads start as the nested cut; move them off it, so that they matter
        for p in getattr(net, "heads", torch.nn.Module()).parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net


def _histories() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, N + 1, (4, 7), generator=g)
    ids[0, :3] = 0  # left padding
    ids[1, :6] = 0
    return ids


@pytest.mark.parametrize("encoder", ["lru", "mamba", "sasrec"])
def test_every_cut_triple_is_a_smaller_network_with_the_full_models_outputs(encoder):
    pairs = [[32, 8], [32, 16], [32, 32]] if encoder == "sasrec" else [[8, 8], [16, 8], [32, 8], [16, 16], [32, 16], [32, 32]]
    grid = build_grid(SIZES, 3, depths=[1, 2, 3], pairs=pairs, grid="full")
    net = _net(encoder, grid)
    ids = _histories()
    with torch.no_grad():
        states = net.depth_states(ids, net.item_matrix(), [1, 2, 3])
        full = {t: net.group_vectors(g, states[t.depth][:, -1])[:, : t.size] for g in vector_groups(grid) for t in g.triples}
        assert torch.allclose(states[3], net.sequence_states(ids, net.item_matrix()), atol=1e-5)
        counts = {}
        for t in grid:
            small = cut_to_size(net, t.size, width=t.width, depth=t.depth)
            assert len(small.encoder.blocks) == t.depth and small.vector_size == t.size
            assert small.item_matrix().shape == (N + 1, t.width)
            heads = list(getattr(small, "heads", torch.nn.Module()).parameters())
            assert (len(heads) == 2) == t.uses_head
            if t.uses_head:
                assert tuple(small.heads.heads[f"L{t.depth}_w{t.width}"].weight.shape) == (t.size, t.width)
            got = small.user_vectors(ids)
            assert got.shape == (4, t.size)
            torch.testing.assert_close(got, full[t], atol=1e-5, rtol=1e-4)
            counts[t] = nested_parameter_count(small)
    # shallower, narrower: fewer parameters
    assert counts[Triple(1, 32, 32)] < counts[Triple(2, 32, 32)] < counts[Triple(3, 32, 32)]
    if encoder != "sasrec":
        assert counts[Triple(3, 8, 8)] < counts[Triple(3, 16, 8)] < counts[Triple(3, 32, 8)]
        # the MRL-only end differs from the fully nested cut at the same size: the head is used
        assert not torch.allclose(full[Triple(3, 32, 8)], full[Triple(3, 8, 8)], atol=1e-3)


def test_without_a_grid_cuts_are_todays_and_a_size_below_the_width_needs_a_head():
    net = _net("lru", None)
    assert not hasattr(net, "heads")
    ids = _histories()
    with torch.no_grad():
        full = net.user_vectors(ids)
        torch.testing.assert_close(cut_to_size(net, 16).user_vectors(ids), full[:, :16])
        torch.testing.assert_close(cut_to_size(net, 16, width=16).user_vectors(ids), full[:, :16])
    with pytest.raises(ValueError, match="no vector head was trained"):
        cut_to_size(net, 8, width=32)
    with pytest.raises(ValueError, match="may not exceed the width"):
        cut_to_size(net, 32, width=16)
    with pytest.raises(ValueError, match=r"depth 4 must lie in 1\.\.3"):
        cut_to_size(net, 32, depth=4)


def _model(**options) -> MatryoshkaRecommender:
    torch.manual_seed(0)
    return MatryoshkaRecommender(
        item_features=_features(), sizes=list(SIZES), max_len=7, n_blocks=2, dropout=0.0, input_dropout=0.0, **options
    ).eval()


def _batch() -> dict[str, torch.Tensor]:
    ids = _histories()
    targets = torch.randint(1, N + 1, ids.shape, generator=torch.Generator().manual_seed(2)) * (ids > 0)
    return {"input_ids": ids, "target_ids": targets, "target": targets[:, -1], "seen_ids": ids, "user": torch.arange(4)}


def test_the_grid_loss_is_every_triples_cross_entropy_of_its_cut_model():
    model = _model(depths=[1, 2], pairs=[[8, 8], [32, 8], [16, 16], [32, 32]], grid="full")
    batch = _batch()
    total, names, per_size, _, n = model.training_loss(batch)
    assert names == [t.label for g in vector_groups(model.trained_triples) for t in g.triples] and len(names) == 8
    valid = batch["target_ids"] > 0
    expected = {}
    for t in model.trained_triples:  # the reference: each cut model alone, plain cross-entropy at its one size
        small = model.cut_triple(t)
        items = small.item_matrix()
        states = small.sequence_states(batch["input_ids"], items)[valid]
        vectors = small.heads(small._head, states) if t.uses_head else states
        logits = vectors @ items[1:, : t.size].t()
        expected[t.label] = F.cross_entropy(logits, batch["target_ids"][valid] - 1)
    for name, value in zip(names, per_size):
        torch.testing.assert_close(value, expected[name].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, sum(expected.values()), atol=1e-4, rtol=1e-5)
    total.backward()  # every head gets a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.heads.parameters())
    assert n == int(valid.sum())


def test_grid_ranks_are_each_cut_models_ranks_and_metrics_are_named_by_triple():
    model = _model(depths=[1, 2], pairs=[[8, 8], [32, 8], [32, 32]])
    batch = _batch()
    with torch.no_grad():
        model._start_evaluation(model.test_metrics)
        model._eval_items = model.net.item_matrix()
        ranks = model._group_ranks(batch, batch["seen_ids"])
        for row, t in enumerate(model.trained_triples):
            small = model.cut_triple(t)
            users = small.user_vectors(batch["input_ids"])
            items = small.item_matrix()[:, : t.size]
            expected = target_ranks(users, items, batch["target"], [t.size], seen_ids=batch["seen_ids"])[0]
            assert torch.equal(ranks[row], expected)
    assert model.metric_name("ndcg_10/d2") == f"ndcg_10/{model.trained_triples[1].label}"
    assert model.metric_name("count") == "count"


def test_grid_options_are_checked_as_model_options():
    with pytest.raises(OptionError, match="pairs"):
        _model(pairs=[[8, 16]])
    with pytest.raises(OptionError, match="monitor_size"):
        _model(pairs=[[8, 8]], monitor_size=8)
    with pytest.raises(OptionError, match="SASRec is not nested"):
        _model(encoder="sasrec", pairs=[[8, 8]])
    assert _model().trained_triples is None and _model(depths=[1, 2]).trained_triples == (Triple(1, 8, 8), Triple(2, 16, 16), Triple(2, 32, 32))


def test_grid_distillation_and_sampled_loss_run_per_group():
    model = _model(depths=[1, 2], pairs=[[8, 8], [32, 8], [32, 16], [32, 32]], distill=0.5)
    _, names, _, kl, _ = model.training_loss(_batch())
    # the largest size of each group is its own teacher: no KL there
    groups = vector_groups(model.trained_triples)
    assert [k is None for k in kl] == [t == g.triples[-1] for g in groups for t in g.triples]
    assert names == [t.label for g in groups for t in g.triples]
    plain = _model(distill=0.5)
    _, names, _, kl, _ = plain.training_loss(_batch())
    assert names == ["d8", "d16", "d32"] and kl[-1] is None and all(k is not None for k in kl[:-1])
    sampled = _model(pairs=[[8, 8], [32, 8]], loss="sampled", negatives=16, negative_sampling="uniform")
    total, names, per_size, kl, _ = sampled.training_loss(_batch())
    assert torch.isfinite(total) and len(per_size) == 2 and kl == [None, None]


def test_a_triple_label_names_its_triple_and_nothing_else():
    for triple in (Triple(1, 16, 16), Triple(2, 128, 64), Triple(12, 1024, 8)):
        assert Triple.from_label(triple.label) == triple
    for label in ("d64", "L2_w128", "L2_w128_d64_x", "l2_w128_d64", "L2_w-1_d64", "L2_w128_d6.4", ""):
        with pytest.raises(ValueError, match="is not a triple label"):
            Triple.from_label(label)
