"""recsys.nn.dropout: nn.Dropout's contract with a cheaper mask (keep rate, scale, gradient, eval)."""

import pytest
import torch

from recsys.nn.dropout import Dropout, dropout


def test_keeps_one_minus_p_of_the_elements_scaled_so_the_mean_is_kept():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    for p in (0.1, 0.2, 0.5, 0.9):
        out = dropout(x, p)
        kept = out != 0
        assert abs(kept.float().mean().item() - (1 - p)) < 3e-3
        scale = 65536 / (65536 - round(p * 65536))
        assert torch.equal(out[kept], torch.full_like(out[kept], scale))
        assert abs(out.mean().item() - 1) < 1e-2
    # no correlation between the four elements a 64-bit draw serves
    lanes = (dropout(x, 0.5) != 0).view(-1, 4).float()
    corr = torch.corrcoef(lanes.T)
    assert (corr - torch.eye(4)).abs().max() < 0.01


def test_gradient_is_the_same_mask_and_scale_and_eval_is_identity():
    torch.manual_seed(1)
    x = torch.randn(64, 33, dtype=torch.bfloat16, requires_grad=True)
    layer = Dropout(0.3)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    out.sum().backward()
    scale = 65536 / (65536 - round(0.3 * 65536))
    torch.testing.assert_close(x.grad.float(), (out != 0).float() * scale, rtol=1e-2, atol=0)
    layer.eval()
    assert layer(x) is x
    assert dropout(x, 0.0) is x


def test_seeded_draws_repeat():
    x = torch.randn(100, 7)
    torch.manual_seed(5)
    a = dropout(x, 0.25)
    torch.manual_seed(5)
    assert torch.equal(a, dropout(x, 0.25))


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan"), True, "0.1"])
def test_bad_probability_is_refused(p):
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(p)
