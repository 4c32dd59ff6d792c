"""Selective scan (chunked == step by step, kernels == PyTorch) and what is specific to nested Mamba.

The encoder contract (causal, padding-independent, finite, exactly nested) is tests/test_encoders.py.
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys

import pytest
import torch

from encoder_inputs import left_padded
from recsys.nn.mamba import ChunkwiseProjection, NestedMambaEncoder, NestedMambaMixer, check_group_sizes
from recsys.nn.nested import cut_to_size
from recsys.nn.selective_scan import (
    causal_depthwise_conv1d,
    dispatch_selective_scan,
    kernels_available,
    selective_scan,
    selective_scan_reference,
)

SIZES = (4, 8, 16)


def scan_inputs(batch=2, dim=12, length=23, n_state=5, groups=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        u=randn(batch, dim, length),
        delta=randn(batch, dim, length),
        A=-torch.exp(randn(dim, n_state)),
        B=randn(batch, groups, n_state, length),
        C=randn(batch, groups, n_state, length),
        D=randn(dim),
        z=randn(batch, dim, length),
        delta_bias=randn(dim),
    )


# --- selective scan ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 23, 40])
@pytest.mark.parametrize("groups", [1, 3, 12])
def test_chunked_scan_matches_step_by_step(chunk_size, groups):
    inputs = scan_inputs(groups=groups)
    expected = selective_scan_reference(**inputs, delta_softplus=True)
    got = selective_scan(**inputs, delta_softplus=True, chunk_size=chunk_size)
    assert got.shape == expected.shape == inputs["u"].shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_scan_without_optional_terms_and_ungrouped_b_c():
    inputs = scan_inputs(groups=1)
    # 3-d B/C (batch, N, L) means one group shared by every channel, as in selective_scan_fn.
    B, C = inputs["B"][:, 0], inputs["C"][:, 0]
    u, delta, A = inputs["u"], inputs["delta"].abs(), inputs["A"]
    torch.testing.assert_close(
        selective_scan(u, delta, A, B, C), selective_scan_reference(u, delta, A, B, C), atol=1e-5, rtol=1e-5
    )


def test_reference_is_the_recurrence():
    """One channel, one state, written out by hand: h_t = e^{dt a} h + dt b u, y = c h + d u."""
    u = torch.tensor([[[1.0, 2.0, -1.0]]])
    delta = torch.tensor([[[0.5, 1.0, 0.25]]])
    A = torch.tensor([[-2.0]])
    B = torch.tensor([[[[1.0, 0.5, 2.0]]]])
    C = torch.tensor([[[[3.0, -1.0, 1.0]]]])
    D = torch.tensor([0.5])
    h, ys = 0.0, []
    for t in range(3):
        h = torch.exp(delta[0, 0, t] * A[0, 0]) * h + delta[0, 0, t] * B[0, 0, 0, t] * u[0, 0, t]
        ys.append(C[0, 0, 0, t] * h + D[0] * u[0, 0, t])
    expected = torch.stack(ys).view(1, 1, 3)
    torch.testing.assert_close(selective_scan_reference(u, delta, A, B, C, D), expected)
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, D, chunk_size=2), expected)


@pytest.mark.parametrize("chunk_size", [1, 4, 23])
def test_scan_gradients_match_step_by_step(chunk_size):
    """Our scan has a hand-written backward: it must give autograd's gradients of the reference."""
    inputs = {k: v.requires_grad_() for k, v in scan_inputs(dtype=torch.float64).items()}
    grads = []
    for fn in (selective_scan_reference, functools.partial(selective_scan, chunk_size=chunk_size)):
        out = fn(**inputs, delta_softplus=True)
        grads.append(torch.autograd.grad(out.square().sum(), list(inputs.values())))
    for name, expected, got in zip(inputs, *grads):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9, msg=lambda m: f"d/d{name}: {m}")


def test_scan_is_stable_with_large_steps():
    """Strong decay over long chunks must not overflow (no exp of a growing positive sum)."""
    inputs = {k: v.requires_grad_() for k, v in scan_inputs(length=64).items()}
    inputs["delta"] = inputs["delta"].detach().abs() * 50
    got = selective_scan(**inputs, chunk_size=64)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, selective_scan_reference(**inputs), atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert all(torch.isfinite(v.grad).all() for k, v in inputs.items() if k != "delta")


def test_scan_rejects_groups_that_do_not_divide_channels():
    inputs = scan_inputs(groups=5)
    with pytest.raises(ValueError, match="groups"):
        selective_scan(**inputs)


def test_dispatch_on_cpu_runs_the_pytorch_scan():
    inputs = scan_inputs()
    assert not kernels_available("cpu")
    torch.testing.assert_close(
        dispatch_selective_scan(**inputs, delta_softplus=True), selective_scan(**inputs, delta_softplus=True)
    )
    with pytest.raises(RuntimeError, match="use_kernels=True"):
        dispatch_selective_scan(**inputs, use_kernels=True)


def test_causal_depthwise_conv1d_is_causal_and_per_channel():
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 3, 7, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    out = causal_depthwise_conv1d(x, weight, bias)
    expected = torch.zeros_like(x)
    for t in range(7):
        for k in range(4):  # weight[:, -1] multiplies the current input, weight[:, -1-j] the one j steps back
            if t - k >= 0:
                expected[..., t] += weight[:, 3 - k] * x[..., t - k]
    torch.testing.assert_close(out, expected + bias[:, None])
    torch.testing.assert_close(causal_depthwise_conv1d(x, weight, bias, silu=True), torch.nn.functional.silu(out))


def _mamba_ssm_importable() -> bool:
    if not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None:
        return False
    return kernels_available("cuda")


@pytest.mark.skipif(
    not _mamba_ssm_importable(), reason="needs a CUDA GPU and an importable mamba_ssm (the 'gpu' install profile)"
)
def test_kernels_match_pytorch_scan():
    """mamba_ssm's fused kernels and our PyTorch code give the same numbers, grouped B/C included."""
    inputs = {k: v.cuda() for k, v in scan_inputs(batch=3, dim=48, length=50, n_state=16, groups=6).items()}
    inputs["delta"] = inputs["delta"] * 0.5
    kernel = dispatch_selective_scan(**inputs, delta_softplus=True, use_kernels=True)
    ours = dispatch_selective_scan(**inputs, delta_softplus=True, use_kernels=False)
    torch.testing.assert_close(kernel, ours, atol=1e-4, rtol=1e-4)

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(3, 48, 50, device="cuda", generator=g)
    weight, bias = torch.randn(48, 4, device="cuda", generator=g), torch.randn(48, device="cuda", generator=g)
    torch.testing.assert_close(
        causal_depthwise_conv1d(x, weight, bias, silu=True, use_kernels=None),
        causal_depthwise_conv1d(x, weight, bias, silu=True, use_kernels=False),
        atol=1e-4,
        rtol=1e-4,
    )

    torch.manual_seed(0)
    encoder = NestedMambaEncoder((16, 32, 64), use_kernels=False).cuda().eval()
    x, mask = left_padded(width=64)
    x, mask = x.cuda(), mask.cuda()
    with torch.no_grad():
        ours = encoder(x, mask)
        for module in encoder.modules():
            if isinstance(module, NestedMambaMixer):
                module.use_kernels = True
        kernel = encoder(x, mask)
    torch.testing.assert_close(kernel[mask], ours[mask], atol=1e-4, rtol=1e-4)


def test_importing_recsys_does_not_import_mamba_ssm():
    code = "import sys, recsys.nn.mamba, recsys.nn.selective_scan; assert 'mamba_ssm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- nested Mamba encoder ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return NestedMambaEncoder(SIZES, n_blocks=2, d_state=4).eval()


def test_cut_shrinks_the_mixer_parameters(encoder):
    mixer = cut_to_size(encoder, 8).blocks[0].mixer
    assert mixer.A_log.shape == (16, 4) and mixer.conv_weight.shape == (16, 4) and mixer.D.shape == (16,)
    assert mixer.bc_proj.weight.shape == (2 * 8, 16)  # two chunks of 2N outputs, reading 2*8 channels
    # groups are 2*4 channels wide; chunk widths 4, 4, 8 span 1, 1, 2 groups
    assert encoder.blocks[0].mixer.chunk_of_group.tolist() == [0, 1, 2, 2]
    assert mixer.chunk_of_group.tolist() == [0, 1]


def test_sizes_must_be_whole_multiples_of_the_smallest():
    assert check_group_sizes((16, 32, 64, 128)) == (1, 1, 2, 4)
    with pytest.raises(ValueError, match="multiple of the smallest size 16"):
        NestedMambaEncoder((16, 24, 32))


def test_chunkwise_projection_reads_only_its_prefix():
    torch.manual_seed(0)
    proj = ChunkwiseProjection(SIZES, out_features=3, in_mult=2)
    x = torch.randn(5, 32)
    out = proj(x)
    assert out.shape == (5, 3, 3)
    changed = x.clone()
    changed[:, 8:] = 0.0  # beyond chunk 0's prefix (2 * 4 channels)
    assert torch.equal(proj(changed)[:, 0], out[:, 0])
    assert not torch.equal(proj(changed)[:, 1], out[:, 1])


def test_runs_under_autocast(encoder):
    """Mixed precision (as Lightning's bf16-mixed): the scan itself runs in float32 inside."""
    x, mask = left_padded()
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(x, mask)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(out.float(), encoder(x, mask), atol=0.05, rtol=0.05)
