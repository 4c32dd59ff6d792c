"""Exact nesting of the building blocks in recsys.nn.nested."""

import pytest
import torch

from recsys.model_options import OptionError
from recsys.nn.nested import (
    ChunkwiseProjection,
    NestedLayerNorm,
    NestedLinear,
    PrefixProjection,
    check_sizes,
    chunk_bounds,
    chunk_widths,
    cut_to_size,
    nested_parameter_count,
    prefix_scores,
    scale_prefix_gradient,
    set_prefix_gradient,
)

SIZES = (4, 8, 16, 32)


def _perturb_beyond(x: torch.Tensor, size: int, mult: int = 1) -> torch.Tensor:
    y = x.clone()
    y[..., mult * size :] = torch.randn_like(y[..., mult * size :]) * 10
    return y


@pytest.mark.parametrize("in_mult,out_mult", [(1, 1), (1, 2), (2, 1), (3, 2)])
@pytest.mark.parametrize("mode", ["masked", "blocks"])
def test_nested_linear_prefix_closed_and_cut(in_mult, out_mult, mode):
    torch.manual_seed(0)
    layer = NestedLinear(SIZES, in_mult=in_mult, out_mult=out_mult, mode=mode)
    x = torch.randn(5, 3, in_mult * SIZES[-1])
    full = layer(x)
    assert full.shape == (5, 3, out_mult * SIZES[-1])
    for s in SIZES:
        small = cut_to_size(layer, s)
        assert small.weight.shape == (out_mult * s, in_mult * s)
        torch.testing.assert_close(small(x[..., : in_mult * s]), full[..., : out_mult * s], rtol=1e-5, atol=1e-5)
        # inputs beyond the prefix do not reach outputs up to the prefix
        moved = layer(_perturb_beyond(x, s, in_mult))
        torch.testing.assert_close(moved[..., : out_mult * s], full[..., : out_mult * s], rtol=1e-5, atol=1e-5)


def test_masked_and_block_modes_agree_in_value_and_gradient():
    torch.manual_seed(1)
    masked = NestedLinear(SIZES, out_mult=2, mode="masked")
    blocks = NestedLinear(SIZES, out_mult=2, mode="blocks")
    blocks.load_state_dict(masked.state_dict())
    x = torch.randn(7, SIZES[-1], requires_grad=True)
    a, b = masked(x), blocks(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), [x, masked.weight])
    gb = torch.autograd.grad(b.square().sum(), [x, blocks.weight])
    torch.testing.assert_close(ga[0], gb[0], rtol=1e-5, atol=1e-5)
    # only the block-lower-triangular part gets gradient
    torch.testing.assert_close(ga[1] * masked.mask, gb[1] * masked.mask, rtol=1e-5, atol=1e-5)
    assert torch.all(ga[1][masked.mask == 0] == 0)


@pytest.mark.parametrize("factor", [0.0, 0.3])
@pytest.mark.parametrize("make", [lambda: NestedLinear(SIZES, in_mult=2, out_mult=3, mode="blocks"),
                                  lambda: ChunkwiseProjection(SIZES, 5, in_mult=2, bias=True)])
def test_prefix_gradient_scales_only_what_a_chunk_sends_back_to_earlier_chunks(make, factor):
    """``prefix_gradient``: forward values and the weights' gradients are those of the plain layer,
    bit for bit; the gradient to the input is the one through the weight whose blocks that read an
    earlier chunk are multiplied by the factor."""
    torch.manual_seed(2)
    plain = make()
    scaled = make()
    scaled.load_state_dict(plain.state_dict())
    set_prefix_gradient(scaled, factor)
    x = torch.randn(3, 4, 2 * SIZES[-1], requires_grad=True)
    y_plain, y_scaled = plain(x), scaled(x)
    assert torch.equal(y_plain, y_scaled.reshape(y_plain.shape))
    g = torch.randn_like(y_plain)
    dx_plain, dw_plain = torch.autograd.grad(y_plain, [x, plain.weight], g)
    dx, dw = torch.autograd.grad(y_scaled, [x, scaled.weight], g)
    torch.testing.assert_close(dw, dw_plain)
    own, cross = scaled.own_mask, scaled.mask - scaled.own_mask
    assert own.sum() > 0 and cross.sum() > 0 and torch.all(own <= scaled.mask)
    expected = g.flatten(-2) if g.dim() == 4 else g
    torch.testing.assert_close(dx, expected @ (plain.weight * (own + factor * cross)))
    assert not torch.allclose(dx, dx_plain)
    with torch.no_grad():  # evaluation takes the plain path
        assert scaled.input_gradient_weight() is None


def test_scale_prefix_gradient_keeps_the_value_and_scales_the_head_gradient():
    x = torch.randn(5, 8, requires_grad=True)
    y = scale_prefix_gradient(x, 3, 0.25)
    assert torch.equal(y, x)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(grad, torch.tensor([0.25] * 3 + [1.0] * 5).expand(5, 8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        set_prefix_gradient(NestedLinear(SIZES), 1.5)


def test_nested_parameter_count_follows_the_blocks():
    layer = NestedLinear((2, 4), bias=False)
    # output chunk 1 reads 2 inputs (2x2), chunk 2 reads 4 inputs (2x4)
    assert nested_parameter_count(layer) == 2 * 2 + 2 * 4
    assert nested_parameter_count(cut_to_size(layer, 2)) == 4


def test_nested_layernorm_normalises_each_chunk_on_its_own():
    torch.manual_seed(2)
    norm = NestedLayerNorm(SIZES)
    x = torch.randn(6, SIZES[-1]) * 3 + 1
    y = norm(x)
    for a, b in [(0, 4), (4, 8), (8, 16), (16, 32)]:
        torch.testing.assert_close(y[:, a:b].mean(-1), torch.zeros(6), atol=1e-5, rtol=0)
    for s in SIZES:
        torch.testing.assert_close(cut_to_size(norm, s)(x[:, :s]), y[:, :s])
        torch.testing.assert_close(norm(_perturb_beyond(x, s))[:, :s], y[:, :s])


def test_prefix_projection_cut_keeps_first_rows():
    proj = PrefixProjection(10, SIZES)
    x = torch.randn(3, 10)
    for s in SIZES:
        torch.testing.assert_close(cut_to_size(proj, s)(x), proj(x)[:, :s])


@pytest.mark.parametrize(
    "sizes,width,message",
    [
        ([], None, "must not be empty"),
        ([8, 4], None, "strictly increasing"),
        ([8, 8], None, "strictly increasing"),
        ([0, 4], None, "positive integers"),
        ([4.0, 8], None, "positive integers"),
        ([4, 8], 16, "must equal the model width 16"),
    ],
)
def test_bad_sizes_are_refused(sizes, width, message):
    with pytest.raises(ValueError, match=message):
        check_sizes(sizes, width)


def test_cut_to_unknown_size_names_the_valid_sizes():
    with pytest.raises(ValueError, match=r"size 12 is not one of the model's sizes \[4, 8, 16, 32\]"):
        cut_to_size(NestedLinear(SIZES), 12)


@pytest.mark.parametrize("inplace", [False, True])
def test_prefix_scores_are_the_scores_of_every_prefix(inplace):
    g = torch.Generator().manual_seed(0)
    user, items = torch.randn(5, 32, generator=g, dtype=torch.float64), torch.randn(7, 32, generator=g, dtype=torch.float64)
    got = [s.clone() for s in prefix_scores(user, items, SIZES, inplace=inplace)]
    for s, scores in zip(SIZES, got):
        torch.testing.assert_close(scores, user[:, :s] @ items[:, :s].T)
    # per-row candidate lists (B, L, D), as a funnel re-ranks them
    per_row = torch.randn(5, 3, 32, generator=g, dtype=torch.float64)
    for s, scores in zip(SIZES, prefix_scores(user, per_row, SIZES, inplace=inplace)):
        torch.testing.assert_close(scores, torch.einsum("bd,bld->bl", user[:, :s], per_row[:, :, :s]))


def test_prefix_scores_sum_in_the_requested_dtype():
    user, items = torch.randn(4, 32).bfloat16(), torch.randn(6, 32).bfloat16()
    for s, scores in zip(SIZES, prefix_scores(user, items, SIZES, dtype=torch.float32)):
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores, (user[:, :s].float() @ items[:, :s].float().T), atol=0.1, rtol=0.05)


def test_chunk_bounds_and_widths():
    assert chunk_bounds(SIZES) == [(0, 4), (4, 8), (8, 16), (16, 32)]
    assert chunk_bounds((2, 6), mult=3) == [(0, 6), (6, 18)]
    assert chunk_widths(SIZES) == (4, 4, 8, 16)
    assert chunk_widths((2, 6), mult=3) == (6, 12)
    assert chunk_widths((5,)) == (5,)


@pytest.mark.parametrize("inplace", [False, True])
def test_prefix_scores_mask_stays_minus_infinity_at_every_size(inplace):
    g = torch.Generator().manual_seed(1)
    user, items = torch.randn(5, 32, generator=g), torch.randn(7, 32, generator=g)
    mask = torch.rand(5, 7, generator=g) < 0.3
    for s, scores in zip(SIZES, prefix_scores(user, items, SIZES, inplace=inplace, mask=mask)):
        expected = (user[:, :s] @ items[:, :s].T).masked_fill(mask, -torch.inf)
        torch.testing.assert_close(scores, expected)
    per_row, row_mask = torch.randn(5, 3, 32, generator=g), torch.tensor([True, False, False])
    for s, scores in zip(SIZES, prefix_scores(user, per_row, SIZES, inplace=inplace, mask=row_mask)):
        expected = torch.einsum("bd,bld->bl", user[:, :s], per_row[:, :, :s]).masked_fill(row_mask, -torch.inf)
        torch.testing.assert_close(scores, expected)


def test_prefix_scores_differentiate_like_separate_products():
    g = torch.Generator().manual_seed(2)
    user = torch.randn(4, 32, generator=g, dtype=torch.float64, requires_grad=True)
    items = torch.randn(6, 32, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(len(SIZES), 4, 6, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(
        sum((w * s).sum() for w, s in zip(weights, prefix_scores(user, items, SIZES))), (user, items)
    )
    want = torch.autograd.grad(
        sum((w * (user[:, :s] @ items[:, :s].T)).sum() for w, s in zip(weights, SIZES)), (user, items)
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# -- nesting="slices": every weight dense, a size is its top-left slice -----------------------------


@pytest.mark.parametrize("in_mult,out_mult", [(1, 1), (1, 2), (2, 1)])
def test_sliced_linear_is_dense_and_cuts_to_the_top_left_slice(in_mult, out_mult):
    torch.manual_seed(0)
    layer = NestedLinear(SIZES, in_mult=in_mult, out_mult=out_mult, nesting="slices")
    x = torch.randn(5, in_mult * SIZES[-1])
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert nested_parameter_count(layer) == layer.weight.numel() + layer.bias.numel()
    for s in SIZES:
        small = cut_to_size(layer, s)
        weight, bias = layer.weight[: out_mult * s, : in_mult * s], layer.bias[: out_mult * s]
        torch.testing.assert_close(small(x[:, : in_mult * s]), torch.nn.functional.linear(x[:, : in_mult * s], weight, bias))
    # the outputs of a slice read inputs beyond it: the full width is not a prefix of itself
    assert not torch.allclose(layer(_perturb_beyond(x, SIZES[0], in_mult))[:, :out_mult * SIZES[0]],
                              layer(x)[:, :out_mult * SIZES[0]])


def test_sliced_linear_initialises_every_size_like_a_dense_layer_of_its_width():
    """Each size's ring (its slice outside the smaller size's) is drawn with the fan-in of its
    slice, as ``nn.Linear`` of that width would be: the smallest slice is wider than the full one."""
    torch.manual_seed(0)
    sizes = (16, 64, 256)
    layer = NestedLinear(sizes, nesting="slices")
    for size, below in zip(sizes, (0, *sizes[:-1])):
        ring = layer.weight[:size, :size].clone()
        ring[:below, :below] = float("nan")
        ring = ring[~ring.isnan()]
        bound = 1 / size**0.5
        assert ring.abs().max() <= bound and ring.abs().max() > 0.9 * bound, size


def test_sliced_layer_norm_normalises_the_whole_width_of_every_size():
    torch.manual_seed(0)
    norm = NestedLayerNorm(SIZES, nesting="slices")
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(3, SIZES[-1]) * 4 + 1
    for s in SIZES:
        expected = torch.nn.functional.layer_norm(x[:, :s], (s,), norm.weight[:s], norm.bias[:s], norm.eps)
        torch.testing.assert_close(cut_to_size(norm, s)(x[:, :s]), expected)
    torch.testing.assert_close(norm(x), torch.nn.functional.layer_norm(x, (SIZES[-1],), norm.weight, norm.bias, norm.eps))


def test_an_unknown_nesting_is_refused():
    with pytest.raises(ValueError, match="nesting must be one of blocks, slices"):
        NestedLinear(SIZES, nesting="diagonal")


@pytest.mark.parametrize("encoder", ["lru", "mamba"])
def test_truncated_normal_init_draws_every_weight_and_keeps_the_nesting(encoder):
    """``init_std``: every weight matrix and embedding table within two standard deviations and
    spread like the normal, the masks' zero blocks still zero, and each cut size still computes
    exactly the first dimensions of the full model's user vectors."""
    from recsys.model import MatryoshkaRecommender
    from recsys.nn.nested import NestedLinear, cut_to_size
    from tests.test_export import _features

    torch.manual_seed(0)
    model = MatryoshkaRecommender(item_features=_features(), sizes=[8, 16, 32], encoder=encoder, max_len=12,
                                  use_id_embedding=True, init_std=0.02, nesting="blocks").eval()
    drawn = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, torch.nn.EmbeddingBag, NestedLinear))]
    assert len(drawn) >= 6
    for weight in drawn:
        assert float(weight.abs().max()) <= 0.04
    big = torch.cat([w.detach().flatten() for w in drawn])
    big = big[big != 0]  # the masks' zeros
    assert 0.015 < float(big.std()) < 0.02
    for m in model.modules():
        if isinstance(m, NestedLinear):
            assert not bool((m.weight * (1 - m.mask)).any())
    ids = torch.randint(1, 30, (4, 12))
    with torch.no_grad():
        full = model.net.user_vectors(ids)
        for size in (8, 16):
            torch.testing.assert_close(cut_to_size(model.net, size).user_vectors(ids), full[:, :size], atol=1e-5, rtol=1e-4)
    with pytest.raises(OptionError, match="init_std"):
        MatryoshkaRecommender(item_features=_features(), sizes=[8, 16], use_id_embedding=True, init_std=-1.0)
