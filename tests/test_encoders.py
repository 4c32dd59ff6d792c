"""The contract every sequence encoder keeps, checked once for all of them.

Every encoder built by :func:`recsys.nn.encoders.build_encoder` maps left-padded item vectors
``x (B, L, D)`` and ``mask (B, L)`` (True for real items) to ``(B, L, D)`` and must be:

- causal: the output at ``t`` does not depend on inputs after ``t``;
- padding-independent: the values under padding do not change real positions' outputs (exactly),
  and a left-padded row gives what the same items alone give;
- finite, gradients included, for rows with one real item or none;
- exactly nested where it is nested (a :class:`NestedModule`): cut to ``s`` and fed the first ``s``
  input dimensions it gives the first ``s`` output dimensions, which depend on nothing beyond them.

What is specific to one encoder (LRU's scan against its loop, Mamba's selective scan against its
reference, SASRec's ``max_len``) stays in that encoder's own test file.
"""

from __future__ import annotations

import pytest
import torch

from encoder_inputs import left_padded
from recsys.nn.encoders import ENCODERS, build_encoder
from recsys.nn.nested import NestedModule, cut_sizes, cut_to_size, nested_parameter_count

SIZES = (4, 8, 16)


#: every encoder, the LRU with its blocks' norms after the residual sums, and with LRURec's feed-forward
VARIANTS = {**{name: (name, {}) for name in ENCODERS}, "lru-post-norm": ("lru", {"post_norm": True}),
            "lru-gelu-ffn": ("lru", {"ffn": "gelu", "ffn_mult": 4})}


def make(variant: str, train: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    name, options = VARIANTS[variant]
    encoder = build_encoder(name, SIZES, **options)
    return encoder.train(train)


@pytest.fixture(scope="module", params=list(VARIANTS))
def encoder(request):
    return make(request.param).eval()


def nested_sizes(encoder) -> tuple[int, ...]:
    """The sizes ``encoder`` can be cut to; skips the test for an encoder that is not nested."""
    if not isinstance(encoder, NestedModule):
        pytest.skip(f"{type(encoder).__name__} is not nested")
    return cut_sizes(encoder)


# --- shapes -----------------------------------------------------------------------------------


def test_shapes_and_sizes(encoder):
    x, mask = left_padded()
    with torch.no_grad():
        assert encoder(x, mask).shape == (3, 9, SIZES[-1])
    assert encoder.sizes == SIZES and encoder.width == SIZES[-1]


# --- causality --------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
def test_output_at_t_ignores_later_inputs(encoder, padded):
    x, mask = left_padded()
    if not padded:
        mask[:] = True
    with torch.no_grad():
        out = encoder(x, mask)
        for t in (0, 4, 7):
            changed = x.clone()
            changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
            after = encoder(changed, mask)
            torch.testing.assert_close(after[:, : t + 1], out[:, : t + 1], atol=1e-6, rtol=1e-6)
            # ... while the later outputs do change (the check is not vacuous)
            later = mask[:, t + 1 :]
            assert not torch.allclose(after[:, t + 1 :][later], out[:, t + 1 :][later])


# --- padding ----------------------------------------------------------------------------------


def test_values_under_padding_do_not_reach_real_positions(encoder):
    x, mask = left_padded()
    changed = x.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    with torch.no_grad():
        assert torch.equal(encoder(changed, mask)[mask], encoder(x, mask)[mask])


def test_left_padded_row_equals_unpadded_sequence(encoder):
    x, mask = left_padded()
    with torch.no_grad():
        padded = encoder(x, mask)
        for row in range(x.shape[0]):
            real = x[row, mask[row]].unsqueeze(0)
            alone = encoder(real, torch.ones(real.shape[:2], dtype=torch.bool))
            torch.testing.assert_close(alone[0], padded[row, mask[row]], atol=1e-5, rtol=1e-5)


# --- rows with few real items, gradients ------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fully_padded_row_is_finite_in_evaluation_and_training(name):
    x, mask = left_padded()
    mask[1] = False
    encoder = make(name)
    with torch.no_grad():
        assert torch.isfinite(encoder.eval()(x, mask)).all()
    encoder.train()
    x.requires_grad_()
    out = encoder(x, mask)
    assert torch.isfinite(out).all()
    out[:, -1].square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for param_name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), param_name


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_reach_every_parameter(name):
    encoder = make(name, train=True)
    x, mask = left_padded()
    x.requires_grad_()
    encoder(x, mask)[:, -1].square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for param_name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), param_name
        assert p.grad.abs().sum() > 0, param_name


# --- exact nesting ----------------------------------------------------------------------------


def test_cut_encoder_equals_prefix_of_full_encoder(encoder):
    x, mask = left_padded()
    with torch.no_grad():
        full = encoder(x, mask)
        for size in nested_sizes(encoder):
            small = cut_to_size(encoder, size)
            assert small.sizes == tuple(s for s in SIZES if s <= size)
            out = small(x[..., :size], mask)
            assert out.shape == (3, 9, size)
            torch.testing.assert_close(out, full[..., :size], atol=1e-5, rtol=1e-5)


def test_prefix_ignores_later_dimensions(encoder):
    x, mask = left_padded()
    with torch.no_grad():
        full = encoder(x, mask)
        for size in nested_sizes(encoder)[:-1]:
            changed = x.clone()
            changed[..., size:] = torch.randn_like(changed[..., size:]) * 5
            assert torch.equal(encoder(changed, mask)[..., :size], full[..., :size])


def test_cut_shrinks_parameters(encoder):
    sizes = nested_sizes(encoder)
    cuts = [cut_to_size(encoder, s) for s in sizes]
    counts = [nested_parameter_count(c) for c in cuts]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    stored = [sum(p.numel() for p in c.parameters()) for c in cuts]
    assert stored == sorted(stored) and len(set(stored)) == len(stored)
    assert stored[-1] == sum(p.numel() for p in encoder.parameters())
