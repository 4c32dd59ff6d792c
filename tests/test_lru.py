"""The nested LRU: parallel scan == step-by-step recurrence, padding never leaks, exact nesting."""

import torch

from recsys.nn.lru import LRULayer, NestedLRUEncoder, linear_recurrence_loop, linear_recurrence_scan
from recsys.nn.nested import cut_to_size

SIZES = (4, 8, 16)


def test_parallel_scan_equals_loop_for_every_length():
    torch.manual_seed(0)
    decay = torch.polar(torch.rand(16) * 0.999, torch.rand(16) * 6.28)
    for length in (1, 2, 3, 7, 8, 33, 64, 200):
        inputs = torch.randn(3, length, 16, dtype=torch.cfloat)
        torch.testing.assert_close(
            linear_recurrence_scan(decay, inputs), linear_recurrence_loop(decay, inputs), rtol=1e-5, atol=1e-5
        )


def _left_padded(seq: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, _, d = seq.shape
    x = torch.cat([torch.randn(b, pad, d) * 100, seq], dim=1)  # garbage at padded positions
    mask = torch.cat([torch.zeros(b, pad, dtype=torch.bool), torch.ones(b, seq.shape[1], dtype=torch.bool)], dim=1)
    return x, mask


def test_encoder_scan_equals_sequential_with_left_padding():
    torch.manual_seed(1)
    enc = NestedLRUEncoder(SIZES, n_blocks=2, r_min=0.8, r_max=0.99).eval()
    x, mask = _left_padded(torch.randn(2, 12, 16), pad=5)
    scan = enc(x, mask)
    loop = enc(x, mask, sequential=True)
    torch.testing.assert_close(scan[mask], loop[mask], rtol=1e-5, atol=1e-5)


def test_padding_does_not_leak_into_real_positions():
    torch.manual_seed(2)
    enc = NestedLRUEncoder(SIZES, n_blocks=2, r_min=0.8, r_max=0.99).eval()
    seq = torch.randn(2, 9, 16)
    unpadded = enc(seq, torch.ones(2, 9, dtype=torch.bool))
    x, mask = _left_padded(seq, pad=6)
    padded = enc(x, mask)
    torch.testing.assert_close(padded[:, 6:], unpadded, rtol=1e-5, atol=1e-5)


def test_encoder_is_exactly_nested():
    torch.manual_seed(3)
    enc = NestedLRUEncoder(SIZES, n_blocks=2).eval()
    x, mask = _left_padded(torch.randn(3, 10, 16), pad=2)
    full = enc(x, mask)
    for s in SIZES:
        small = cut_to_size(enc, s)
        assert small.sizes == tuple(t for t in SIZES if t <= s)
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in enc.parameters()) or s == SIZES[-1]
        torch.testing.assert_close(small(x[..., :s], mask), full[..., :s], rtol=1e-5, atol=1e-5)
        y = x.clone()
        y[..., s:] = torch.randn_like(y[..., s:])
        torch.testing.assert_close(enc(y, mask)[..., :s], full[..., :s], rtol=1e-5, atol=1e-5)


def test_lru_decay_magnitude_starts_in_the_configured_ring():
    layer = LRULayer((8, 32), r_min=0.5, r_max=0.9)
    radius = layer.decay().abs()
    assert radius.min() >= 0.5 - 1e-5 and radius.max() <= 0.9 + 1e-5


def test_gradients_are_finite():
    enc = NestedLRUEncoder(SIZES)
    x, mask = _left_padded(torch.randn(2, 6, 16, requires_grad=True), pad=3)
    enc(x, mask)[:, -1].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
