"""The multimodal item tower and the whole network (tower + encoder) cut to each size."""

import pytest
import torch

from recsys.item_features import CategoricalBag, ItemFeatures
from recsys.nn.embedding_tables import ID_TABLE
from recsys.nn.item_tower import FixedItemMatrix, ItemTower
from recsys.nn.lru import NestedLRUEncoder
from recsys.nn.nested import cut_to_size, nested_parameter_count
from recsys.nn.recommender import SequentialRecommender

SIZES = (4, 8, 16)
N = 30


def _features() -> ItemFeatures:
    g = torch.Generator().manual_seed(0)
    text = torch.randn(N + 1, 12, generator=g)
    image = torch.randn(N + 1, 6, generator=g)
    image_mask = torch.rand(N + 1, generator=g) > 0.3  # some items have no image
    image_mask[0] = False
    image[~image_mask] = 0
    lengths = torch.randint(0, 4, (N + 1,), generator=g)
    lengths[0] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    values = torch.randint(0, 7, (int(offsets[-1]),), generator=g)
    in_training = torch.ones(N + 1, dtype=torch.bool)
    in_training[0] = False
    in_training[-5:] = False  # five cold-start items
    return ItemFeatures(
        num_items=N,
        dense={"text": text, "image": image},
        dense_mask={"text": torch.arange(N + 1) > 0, "image": image_mask},
        bags={"genres": CategoricalBag(values, offsets, 7)},
        in_training=in_training,
    )


@pytest.mark.parametrize("use_ids", [False, True])
def test_tower_and_encoder_are_exactly_nested(use_ids):
    torch.manual_seed(0)
    net = SequentialRecommender(ItemTower(SIZES, _features(), use_id_embedding=use_ids), NestedLRUEncoder(SIZES)).eval()
    ids = torch.randint(1, N + 1, (4, 9))
    ids[0, :4] = 0
    z, users = net.item_matrix(), net.user_vectors(ids)
    counts = []
    for s in SIZES:
        small = cut_to_size(net, s)
        torch.testing.assert_close(small.item_matrix(), z[:, :s], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(small.user_vectors(ids), users[:, :s], rtol=1e-5, atol=1e-5)
        counts.append(nested_parameter_count(small))
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_padding_row_is_zero_and_cold_items_have_feature_vectors():
    tower = ItemTower(SIZES, _features(), use_id_embedding=True)
    z = tower()
    assert torch.all(z[0] == 0)
    assert torch.all(z[-5:].abs().sum(-1) > 0)  # cold-start items are recommendable


def test_id_embedding_is_not_used_for_cold_items():
    torch.manual_seed(1)
    features = _features()
    with_ids = ItemTower(SIZES, features, use_id_embedding=True)
    without = ItemTower(SIZES, features, use_id_embedding=False)
    state = {k: v for k, v in with_ids.state_dict().items() if k in without.state_dict()}
    without.load_state_dict(state)
    torch.testing.assert_close(with_ids()[-5:], without()[-5:])
    assert not torch.allclose(with_ids()[1:5], without()[1:5])


def test_id_dropout_leaves_whole_id_vectors_out_in_training_only():
    torch.manual_seed(2)
    features = _features()
    tower = ItemTower(SIZES, features, use_id_embedding=True, id_dropout=0.5)
    plain = ItemTower(SIZES, features, use_id_embedding=True)
    plain.load_state_dict(tower.state_dict())
    without = ItemTower(SIZES, features, use_id_embedding=False)
    without.load_state_dict({k: v for k, v in tower.state_dict().items() if k in without.state_dict()})
    with_ids, features_only = plain(), without()
    torch.testing.assert_close(tower.eval()(), with_ids)  # evaluation: every warm item keeps its ID vector
    z = tower.train()()
    dropped = torch.isclose(z, features_only).all(-1)
    kept = torch.isclose(z, with_ids).all(-1)
    warm = features.in_training
    assert torch.all(dropped | kept)  # each row is one or the other, never a mix
    assert 0 < int((dropped & warm).sum()) < int(warm.sum())  # p = 0.5 over 25 warm items
    (z * torch.randn_like(z)).sum().backward()
    grads = tower.ids.embeddings[ID_TABLE].weight.grad  # a left-out ID vector gets no gradient from that step
    assert torch.all(grads[dropped & warm] == 0) and torch.all(grads[kept & warm].abs().sum(-1) > 0)


def test_id_dropout_needs_ids_and_a_probability():
    with pytest.raises(ValueError, match="id_dropout"):
        ItemTower(SIZES, _features(), use_id_embedding=False, id_dropout=0.2)
    with pytest.raises(ValueError, match="id_dropout"):
        ItemTower(SIZES, _features(), use_id_embedding=True, id_dropout=1.0)


def test_features_round_trip_through_the_state_dict():
    features = _features()
    tower = ItemTower(SIZES, features, use_id_embedding=True)
    back = ItemTower.features_from_state_dict(tower.state_dict())
    rebuilt = ItemTower(SIZES, back, use_id_embedding=True)
    rebuilt.load_state_dict(tower.state_dict())
    torch.testing.assert_close(rebuilt(), tower())


def test_fixed_item_matrix_cut_keeps_columns():
    z = torch.randn(N + 1, 16)
    fixed = FixedItemMatrix(z, SIZES)
    torch.testing.assert_close(cut_to_size(fixed, 8)(), z[:, :8])


def test_unknown_modality_and_empty_tower_are_refused():
    with pytest.raises(ValueError, match=r"unknown item modalities \['audio'\]"):
        ItemTower(SIZES, _features(), modalities=["audio"])
    with pytest.raises(ValueError, match="at least one modality"):
        ItemTower(SIZES, _features(), modalities=[])


def test_plain_torch_tables_equal_torchrec(monkeypatch):
    """Without torchrec the tower uses plain torch tables: same state-dict keys, same Z, same gradients."""
    from recsys.nn import embedding_tables

    assert embedding_tables.TORCHREC, "the test environment has torchrec"
    torch.manual_seed(0)
    with_torchrec = ItemTower(SIZES, _features(), use_id_embedding=True)
    monkeypatch.setattr(embedding_tables, "TORCHREC", False)
    plain = ItemTower(SIZES, _features(), use_id_embedding=True)
    assert isinstance(plain.bags, embedding_tables.PlainBagTables)
    assert with_torchrec.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(with_torchrec.state_dict())

    weights = torch.randn(N + 1, SIZES[-1])
    z_torchrec, z_plain = with_torchrec(), plain()
    torch.testing.assert_close(z_plain, z_torchrec, rtol=0, atol=1e-6)
    (z_torchrec * weights).sum().backward()
    (z_plain * weights).sum().backward()
    for (name, a), (_, b) in zip(with_torchrec.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6, msg=name)

    small = cut_to_size(plain, SIZES[0])  # cutting rebuilds plain tables too
    assert isinstance(small.bags, embedding_tables.PlainBagTables)
    torch.testing.assert_close(small(), cut_to_size(with_torchrec, SIZES[0])(), rtol=0, atol=1e-6)


def test_plain_tables_use_torchrecs_initialisation(monkeypatch):
    from recsys.nn import embedding_tables

    monkeypatch.setattr(embedding_tables, "TORCHREC", False)
    table = embedding_tables.id_table(400, 8).embeddings[embedding_tables.ID_TABLE].weight
    bound = (1 / 400) ** 0.5
    assert table.abs().max() <= bound and table.abs().max() > 0.9 * bound


@pytest.mark.parametrize("use_ids", [False, True])
def test_rows_of_the_tower_equal_those_rows_of_its_matrix_with_gradients(use_ids):
    """tower(rows) (what a sampled loss computes) is tower()[rows] exactly, repeats and the padding
    row included, and so are the gradients it sends to the tables and projections."""
    torch.manual_seed(0)
    tower = ItemTower(SIZES, _features(), use_id_embedding=use_ids).eval()
    rows = torch.tensor([0, 29, 3, 3, 17, 1, 30])
    weights = torch.randn(len(rows), SIZES[-1])
    subset = tower(rows)
    torch.testing.assert_close(subset, tower()[rows], rtol=0, atol=0)
    grads = torch.autograd.grad((subset * weights).sum(), list(tower.parameters()))
    wanted = torch.autograd.grad((tower()[rows] * weights).sum(), list(tower.parameters()))
    for got, want in zip(grads, wanted):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
