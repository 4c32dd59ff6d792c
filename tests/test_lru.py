"""The nested LRU: parallel scan == step-by-step recurrence == the reference loop, decay initialisation.

The encoder contract (causal, padding-independent, finite, exactly nested) is tests/test_encoders.py.
"""

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
    """With slow decay (a state that would carry a leak far): scan == loop, padded == unpadded."""
    torch.manual_seed(1)
    enc = NestedLRUEncoder(SIZES, n_blocks=2, r_min=0.8, r_max=0.99).eval()
    seq = torch.randn(2, 12, 16)
    x, mask = _left_padded(seq, pad=5)
    scan = enc(x, mask, sequential=False)
    loop = enc(x, mask, sequential=True)
    torch.testing.assert_close(scan[mask], loop[mask], rtol=1e-5, atol=1e-5)
    unpadded = enc(seq, torch.ones(2, 12, dtype=torch.bool))
    torch.testing.assert_close(scan[:, 5:], unpadded, rtol=1e-5, atol=1e-5)


def test_final_state_equals_the_last_output_of_the_whole_pass():
    """The serving pass (the last block computes its last position only, its recurrence as one
    weighted sum) gives the whole forward's last output; so does user_vectors, and every cut size."""
    from recsys.nn.lru import linear_recurrence_last

    torch.manual_seed(2)
    decay = torch.polar(torch.rand(16) * 0.99, torch.rand(16) * 6)
    inputs = torch.randn(3, 30, 16, dtype=torch.complex64)
    torch.testing.assert_close(linear_recurrence_last(decay, inputs), linear_recurrence_loop(decay, inputs)[:, -1:],
                               rtol=1e-4, atol=1e-4)
    enc = NestedLRUEncoder(SIZES, n_blocks=3, r_min=0.8, r_max=0.99).eval()
    x, mask = _left_padded(torch.randn(4, 12, 16), pad=5)
    torch.testing.assert_close(enc.final_state(x, mask), enc(x, mask)[:, -1], rtol=1e-5, atol=1e-5)
    for s in SIZES[:-1]:
        small = cut_to_size(enc, s)
        torch.testing.assert_close(small.final_state(x[..., :s], mask), enc(x, mask)[:, -1, :s], rtol=1e-5, atol=1e-5)


def test_lru_decay_magnitude_starts_in_the_configured_ring():
    layer = LRULayer((8, 32), r_min=0.5, r_max=0.9)
    radius = layer.decay().abs()
    assert radius.min() >= 0.5 - 1e-5 and radius.max() <= 0.9 + 1e-5


def test_step_by_step_recurrence_and_its_gradients_equal_the_reference():
    """The CPU's recurrence (a hand-written backward) against the plain loop under autograd:
    states, the inputs' and the decay's gradients, for complex and real inputs and every length."""
    from recsys.nn.lru import linear_recurrence_steps

    torch.manual_seed(3)
    for dtype in (torch.complex64, torch.float32):
        for length in (1, 2, 7, 50, 200):
            if dtype.is_complex:
                decay = torch.polar(torch.rand(16) * 0.999, torch.rand(16) * 6.28)
            else:
                decay = torch.rand(16) * 1.998 - 0.999
            decay = decay.requires_grad_()
            inputs = torch.randn(3, length, 16, dtype=dtype, requires_grad=True)
            weights = torch.randn(3, length, 16, dtype=dtype)
            got, want = linear_recurrence_steps(decay, inputs), linear_recurrence_loop(decay, inputs)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            grads = torch.autograd.grad((got * weights).real.sum(), (decay, inputs))
            wanted = torch.autograd.grad((want * weights).real.sum(), (decay, inputs))
            for g, w in zip(grads, wanted):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_layer_runs_the_same_on_either_recurrence_with_gradients():
    """The LRU layer's step-by-step and scan paths give the same outputs and parameter gradients."""
    torch.manual_seed(4)
    layer = LRULayer(SIZES, r_min=0.5, r_max=0.99)
    x, mask = _left_padded(torch.randn(3, 20, 16), pad=4)
    results = []
    for sequential in (True, False):
        layer.zero_grad()
        out = layer(x, mask, sequential=sequential)
        out.pow(2).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in layer.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_sliced_encoder_is_a_dense_encoder_at_every_size():
    """``nesting="slices"``: the full width is the dense one-size encoder with the same weights,
    and the encoder cut to a size is the dense encoder of that size holding the weights' slices."""
    torch.manual_seed(0)
    sizes = (4, 8, 16)
    sliced = NestedLRUEncoder(sizes, n_blocks=2, dropout=0.0, nesting="slices").eval()
    x, mask = torch.randn(3, 6, 16), torch.ones(3, 6, dtype=torch.bool)
    mask[0, :2] = False
    for size in sizes:
        dense = NestedLRUEncoder((size,), n_blocks=2, dropout=0.0).eval()
        state = {k: v[tuple(slice(0, n) for n in dense.state_dict()[k].shape)] for k, v in sliced.state_dict().items()}
        dense.load_state_dict(state)
        expected = dense(x[..., :size], mask)
        torch.testing.assert_close(cut_to_size(sliced, size)(x[..., :size], mask), expected)
        if size == sizes[-1]:
            torch.testing.assert_close(sliced(x, mask), expected)
        else:  # not a prefix of the full width's outputs
            assert not torch.allclose(sliced(x, mask)[..., :size], expected, atol=1e-3)
