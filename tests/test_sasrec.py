"""SASRec baseline: shapes, causality, padding invariance, finite outputs on empty rows."""

from __future__ import annotations

import pytest
import torch

from recsys.nn.item_tower import FixedItemMatrix
from recsys.nn.nested import cut_sizes, cut_to_size
from recsys.nn.recommender import SequentialRecommender
from recsys.nn.sasrec import SASRecEncoder

SIZES = (8, 16)


def left_padded(batch=3, length=9, width=16, seed=0):
    """Random item vectors and a mask with rows of 4, 1 and all 9 real items (left padding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, width, generator=g)
    lengths = torch.tensor([4, 1, length])[:batch]
    mask = torch.arange(length) >= (length - lengths)[:, None]
    return x, mask


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return SASRecEncoder(SIZES, n_blocks=2, n_heads=2, max_len=20).eval()


def test_shapes_and_sizes(encoder):
    x, mask = left_padded()
    with torch.no_grad():
        assert encoder(x, mask).shape == (3, 9, 16)
    assert encoder.sizes == SIZES and encoder.width == 16


def test_output_at_t_ignores_later_inputs(encoder):
    x, mask = left_padded()
    mask[:] = True
    with torch.no_grad():
        out = encoder(x, mask)
        for t in (0, 4, 7):
            changed = x.clone()
            changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
            after = encoder(changed, mask)
            torch.testing.assert_close(after[:, : t + 1], out[:, : t + 1], atol=1e-6, rtol=1e-6)
            assert not torch.allclose(after[:, t + 1 :], out[:, t + 1 :])


def test_padding_does_not_leak(encoder):
    x, mask = left_padded()
    changed = x.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    with torch.no_grad():
        torch.testing.assert_close(encoder(changed, mask)[mask], encoder(x, mask)[mask], atol=1e-6, rtol=1e-6)


def test_left_padded_row_equals_unpadded_sequence(encoder):
    x, mask = left_padded()
    with torch.no_grad():
        padded = encoder(x, mask)
        for row in range(x.shape[0]):
            real = x[row, mask[row]].unsqueeze(0)
            alone = encoder(real, torch.ones(real.shape[:2], dtype=torch.bool))
            torch.testing.assert_close(alone[0], padded[row, mask[row]], atol=1e-5, rtol=1e-5)


def test_fully_padded_row_is_finite_in_training_too():
    torch.manual_seed(0)
    encoder = SASRecEncoder(SIZES, dropout=0.2, max_len=20).train()
    x, mask = left_padded()
    mask[1] = False
    x.requires_grad_()
    out = encoder(x, mask)
    assert torch.isfinite(out).all()
    out[:, -1].square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_too_long_sequences_and_bad_heads_are_refused():
    encoder = SASRecEncoder(SIZES, max_len=5)
    x, mask = left_padded()
    with pytest.raises(ValueError, match="max_len 5"):
        encoder(x, mask)
    with pytest.raises(ValueError, match="n_heads=3"):
        SASRecEncoder(SIZES, n_heads=3)


def test_not_cuttable(encoder):
    with pytest.raises(TypeError, match="no nested modules"):
        cut_to_size(encoder, 8)


def test_a_recommender_with_sasrec_says_it_cuts_to_its_full_width_only(encoder):
    items = FixedItemMatrix(torch.randn(11, SIZES[-1]), SIZES)
    net = SequentialRecommender(items, encoder).eval()
    assert cut_sizes(net) == (SIZES[-1],)
    ids = torch.tensor([[0, 3, 5, 7]])
    torch.testing.assert_close(cut_to_size(net, SIZES[-1]).user_vectors(ids), net.user_vectors(ids))
    with pytest.raises(ValueError, match=rf"can be cut to sizes \[{SIZES[-1]}\] only, not {SIZES[0]}"):
        cut_to_size(net, SIZES[0])
