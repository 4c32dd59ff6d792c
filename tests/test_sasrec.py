"""SASRec baseline: what is specific to it (max_len, heads, not cuttable).

The encoder contract (shapes, causality, padding invariance, finite outputs on empty rows) is
tests/test_encoders.py.
"""

from __future__ import annotations

import pytest
import torch

from encoder_inputs import left_padded
from recsys.nn.item_tower import FixedItemMatrix
from recsys.nn.nested import cut_sizes, cut_to_size
from recsys.nn.recommender import SequentialRecommender
from recsys.nn.sasrec import SASRecEncoder

SIZES = (8, 16)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return SASRecEncoder(SIZES, n_blocks=2, n_heads=2, max_len=20).eval()


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


def test_attention_written_out_for_cpu_dropout_equals_the_fused_attention(monkeypatch):
    """In training on CPU the attention with dropout is written out (our dropout mask); with the
    mask taken away it is exactly the fused attention, padding and causality included."""
    import recsys.nn.sasrec as sasrec

    torch.manual_seed(0)
    attention = sasrec.CausalSelfAttention(16, 2, dropout=0.3)
    x = torch.randn(3, 9, 16)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :4] = False
    mask[1, :8] = False
    fused = attention.eval()(x, mask)
    monkeypatch.setattr(sasrec, "dropout", lambda t, p, training=True: t)
    written_out = attention.train()(x, mask)
    torch.testing.assert_close(written_out, fused, rtol=1e-5, atol=1e-6)
