"""The memory-flat Matryoshka loss against the naive per-size sum: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from recsys.nn.loss import (
    MatryoshkaLoss,
    matryoshka_cross_entropy,
    naive_matryoshka_cross_entropy,
    sampled_matryoshka_cross_entropy,
)


def _case(positions=37, items=50, sizes=(2, 4, 8, 16), dtype=torch.float64, ignored=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = sizes[-1]
    user = torch.randn(positions, d, generator=gen, dtype=dtype)
    item_matrix = torch.randn(items + 1, d, generator=gen, dtype=dtype)
    targets = torch.randint(1, items + 1, (positions,), generator=gen)
    targets[torch.randperm(positions, generator=gen)[:ignored]] = 0
    return user, item_matrix, targets


def _value_and_grads(fn, user, items, targets, sizes, **kw):
    user = user.clone().requires_grad_()
    items = items.clone().requires_grad_()
    out = fn(user, items, targets, sizes, **kw)
    d_user, d_items = torch.autograd.grad(out.total, (user, items))
    return out, d_user, d_items


@pytest.mark.parametrize(
    "sizes, weights, block_rows",
    [
        ((2, 4, 8, 16), None, 28),  # 7 positions per block: does not divide the 32 valid ones
        ((2, 4, 8, 16), (0.5, 1.0, 2.0, 0.25), 28),  # non-uniform weights
        ((16,), None, 512),  # M = 1, one block
        ((16,), None, 5),  # M = 1, several blocks
        ((1, 3, 6, 10, 16), (1.0, 0.0, 3.0, 1.0, 0.5), 15),  # M = 5, uneven chunks, a zero weight
        ((2, 4, 8, 16), None, 1),  # fewer rows than sizes: one position per block
    ],
)
def test_equals_naive_float64(sizes, weights, block_rows):
    user, items, targets = _case(sizes=sizes)
    flat, du, dz = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes,
                                    weights=weights, block_rows=block_rows)
    ref, du_ref, dz_ref = _value_and_grads(naive_matryoshka_cross_entropy, user, items, targets, sizes,
                                           weights=weights)
    assert isinstance(flat, MatryoshkaLoss)
    assert flat.per_size.shape == (len(sizes),)
    assert not flat.per_size.requires_grad
    torch.testing.assert_close(flat.total, ref.total, rtol=0, atol=1e-10)
    torch.testing.assert_close(flat.per_size, ref.per_size, rtol=0, atol=1e-10)
    torch.testing.assert_close(du, du_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(dz, dz_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("teacher", ["largest", "next"])
@pytest.mark.parametrize(
    "sizes, weights, block_rows",
    [
        ((2, 4, 8, 16), None, 28),
        ((1, 3, 6, 10, 16), (1.0, 0.0, 3.0, 1.0, 0.5), 15),  # a zero weight: distillation still acts
        ((4, 16), None, 1),
        ((16,), None, 16),  # one size: nothing to distil
    ],
)
def test_self_distillation_equals_naive(sizes, weights, block_rows, teacher):
    """In-place self-distillation: every smaller size also learns the detached softmax of its
    teacher (the largest, or the next larger size); loss, per-size KL and gradients equal the
    naive F.kl_div reference, in the same block pass."""
    user, items, targets = _case(sizes=sizes)
    kw = dict(weights=weights, distill=0.7, teacher=teacher)
    flat, du, dz = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes, block_rows=block_rows, **kw)
    ref, du_ref, dz_ref = _value_and_grads(naive_matryoshka_cross_entropy, user, items, targets, sizes, **kw)
    torch.testing.assert_close(flat.total, ref.total, rtol=0, atol=1e-10)
    torch.testing.assert_close(flat.per_size, ref.per_size, rtol=0, atol=1e-10)
    torch.testing.assert_close(flat.distill, ref.distill, rtol=0, atol=1e-10)
    torch.testing.assert_close(du, du_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(dz, dz_ref, rtol=0, atol=1e-10)
    assert flat.distill[-1] == 0 and (len(sizes) == 1 or (flat.distill[:-1] > 0).all())
    plain = matryoshka_cross_entropy(user, items, targets, sizes, weights=weights)
    torch.testing.assert_close(flat.total, plain.total + 0.7 * flat.distill.sum(), rtol=0, atol=1e-10)


def test_distillation_gradient_leaves_the_largest_size_alone():
    """The teacher is detached: the largest size's chunk gets no gradient from distillation."""
    user, items, targets = _case()
    sizes = (2, 4, 8, 16)
    _, du_plain, dz_plain = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes)
    _, du, dz = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes, distill=2.0)
    torch.testing.assert_close(du[:, 8:], du_plain[:, 8:], rtol=0, atol=1e-12)
    torch.testing.assert_close(dz[:, 8:], dz_plain[:, 8:], rtol=0, atol=1e-12)
    assert not torch.allclose(du[:, :8], du_plain[:, :8])


@pytest.mark.parametrize(
    "sizes, block_rows",
    [((16,), 16), ((16,), 5), ((2, 4, 8, 16), 28), ((4, 16), 1)],  # one size (slices' case), several, one row a block
)
def test_an_outside_teacher_equals_naive(sizes, block_rows):
    """A teacher outside the loss (its own user vectors and item matrix, of another width): every
    size, the largest too, learns its detached softmax; loss, KL and gradients equal the naive
    reference, and no gradient reaches the teacher."""
    user, items, targets = _case(sizes=sizes)
    t_user, t_items, _ = _case(sizes=(24,), seed=1)
    t_user, t_items = t_user.requires_grad_(), t_items.requires_grad_()
    kw = dict(distill=0.7, teacher_vectors=(t_user, t_items))
    flat, du, dz = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes, block_rows=block_rows, **kw)
    ref, du_ref, dz_ref = _value_and_grads(naive_matryoshka_cross_entropy, user, items, targets, sizes, **kw)
    for a, b in ((flat.total, ref.total), (flat.per_size, ref.per_size), (flat.distill, ref.distill), (du, du_ref), (dz, dz_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert (flat.distill > 0).all()
    plain, du_plain, _ = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes)
    torch.testing.assert_close(flat.total, plain.total + 0.7 * flat.distill.sum(), rtol=0, atol=1e-10)
    assert not torch.allclose(du[:, -1], du_plain[:, -1])  # the largest size learns from it too
    assert t_user.grad is None and t_items.grad is None
    # a teacher that is the largest size's own vectors gives the in-place self-distillation's KL to it
    inplace = matryoshka_cross_entropy(user, items, targets, sizes, distill=0.7)
    own = matryoshka_cross_entropy(user, items, targets, sizes, distill=0.7, teacher_vectors=(user, items))
    torch.testing.assert_close(own.distill[:-1], inplace.distill[:-1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("side_by_side", [False, True])
@pytest.mark.parametrize("sizes, block_rows", [((16,), 16), ((2, 4, 8, 16), 28), ((4, 16), 1)])
def test_an_outside_teacher_of_the_smaller_sizes_alone_equals_naive(sizes, block_rows, side_by_side):
    """``teach_largest=False``: only the sizes below the largest learn the outside teacher's
    softmax (as with the loss's own teacher); loss, KL and gradients equal the naive reference, and
    the largest size's gradient is the one it gets without distillation."""
    user, items, targets = _case(sizes=sizes)
    t_user, t_items, _ = _case(sizes=(24,), seed=1)
    kw = dict(distill=0.7, teacher_vectors=(t_user, t_items), teach_largest=False, side_by_side=side_by_side)
    flat, du, dz = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes, block_rows=block_rows, **kw)
    ref, du_ref, dz_ref = _value_and_grads(naive_matryoshka_cross_entropy, user, items, targets, sizes, **kw)
    for a, b in ((flat.total, ref.total), (flat.per_size, ref.per_size), (flat.distill, ref.distill), (du, du_ref), (dz, dz_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert flat.distill[-1] == 0 and (flat.distill[:-1] > 0).all()
    plain, du_plain, _ = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes, side_by_side=side_by_side)
    torch.testing.assert_close(flat.total, plain.total + 0.7 * flat.distill.sum(), rtol=0, atol=1e-10)
    largest = slice(sizes[-2] if len(sizes) > 1 else 0, sizes[-1])
    torch.testing.assert_close(du[:, largest], du_plain[:, largest], rtol=0, atol=1e-10)  # its chunk: its own terms


@pytest.mark.parametrize("teacher", ["largest", "next"])
@pytest.mark.parametrize("sizes, weights, distill, block_rows", [
    ((2, 4, 8, 16), None, 0.0, 28),
    ((2, 4, 8, 16), None, 0.7, 28),
    ((1, 3, 6, 10, 16), (1.0, 0.0, 3.0, 1.0, 0.5), 0.7, 15),  # uneven chunks, a zero weight
    ((4, 16), None, 0.7, 1),
])
def test_side_by_side_equals_naive(sizes, weights, distill, block_rows, teacher):
    """Sizes side by side (``side_by_side``: each size its own network, its vectors in its own
    chunk): each size's logits are its chunk's product alone; loss, KL and gradients equal the
    naive reference, with and without distillation, and differ from the prefix loss."""
    user, items, targets = _case(sizes=sizes)
    kw = dict(weights=weights, distill=distill, teacher=teacher, side_by_side=True)
    flat, du, dz = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes, block_rows=block_rows, **kw)
    ref, du_ref, dz_ref = _value_and_grads(naive_matryoshka_cross_entropy, user, items, targets, sizes, **kw)
    for a, b in ((flat.total, ref.total), (flat.per_size, ref.per_size), (flat.distill, ref.distill), (du, du_ref), (dz, dz_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    prefix = matryoshka_cross_entropy(user, items, targets, sizes, weights=weights)
    assert not torch.allclose(flat.per_size[1:], prefix.per_size[1:])
    torch.testing.assert_close(flat.per_size[0], prefix.per_size[0], rtol=0, atol=1e-10)  # the first chunk is the first prefix


def test_side_by_side_sizes_learn_from_an_outside_teacher_as_the_naive_loss_does():
    """Side by side with a teacher outside the loss: every size, the largest too, learns its softmax."""
    sizes = (2, 4, 8, 16)
    user, items, targets = _case(sizes=sizes)
    t_user, t_items, _ = _case(sizes=(24,), seed=1)
    kw = dict(distill=0.7, teacher_vectors=(t_user, t_items), side_by_side=True)
    flat, du, dz = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes, block_rows=28, **kw)
    ref, du_ref, dz_ref = _value_and_grads(naive_matryoshka_cross_entropy, user, items, targets, sizes, **kw)
    for a, b in ((flat.total, ref.total), (flat.per_size, ref.per_size), (flat.distill, ref.distill), (du, du_ref), (dz, dz_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert (flat.distill > 0).all()


@pytest.mark.parametrize("teacher", ["largest", "next"])
def test_side_by_side_is_one_loss_per_size_in_one_pass(teacher):
    """One side-by-side pass equals one loss per size over its own chunk, each smaller size with
    its teacher's chunk as an outside teacher: totals, cross-entropies, KL and gradients."""
    sizes, weights = (2, 4, 8, 16), (0.5, 1.0, 2.0, 0.25)
    user, items, targets = _case(sizes=sizes)
    joint, du, dz = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes, weights=weights,
                                     distill=0.7, teacher=teacher, side_by_side=True, block_rows=28)
    u, z = user.clone().requires_grad_(), items.clone().requires_grad_()
    bounds = [(0, 2), (2, 4), (4, 8), (8, 16)]
    losses = []
    for m, (a, b) in enumerate(bounds):
        t = 3 if teacher == "largest" else m + 1
        outside = (u[:, bounds[t][0]:bounds[t][1]], z[:, bounds[t][0]:bounds[t][1]]) if m < 3 else None
        losses.append(matryoshka_cross_entropy(u[:, a:b], z[:, a:b], targets, (b - a,), weights=(weights[m],),
                                               distill=0.7 if outside else 0.0, teacher_vectors=outside, block_rows=7))
    total = sum(loss.total for loss in losses)
    du_ref, dz_ref = torch.autograd.grad(total, (u, z))
    torch.testing.assert_close(joint.total, total, rtol=0, atol=1e-10)
    torch.testing.assert_close(joint.per_size, torch.cat([loss.per_size for loss in losses]), rtol=0, atol=1e-10)
    torch.testing.assert_close(joint.distill[:-1], torch.cat([loss.distill for loss in losses[:-1]]), rtol=0, atol=1e-10)
    assert joint.distill[-1] == 0
    torch.testing.assert_close(du, du_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(dz, dz_ref, rtol=0, atol=1e-10)


def test_a_teacher_whose_softmax_has_exact_zeros_adds_nothing_for_them():
    """A peaked teacher (float32, logits hundreds apart) has probabilities that are exactly zero:
    they add nothing to its ``sum p log p``, as in the reference's KL."""
    user, items, targets = _case(sizes=(16,), dtype=torch.float32)
    t_user, t_items, _ = _case(sizes=(24,), seed=1, dtype=torch.float32)
    t_user = t_user * 40
    kw = dict(distill=0.7, teacher_vectors=(t_user, t_items))
    assert (torch.softmax(t_user @ t_items[1:].T, dim=1) == 0).any()
    flat = matryoshka_cross_entropy(user, items, targets, (16,), **kw)
    ref = naive_matryoshka_cross_entropy(user, items, targets, (16,), **kw)
    assert torch.isfinite(flat.distill).all()
    torch.testing.assert_close(flat.distill, ref.distill, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, message", [
    ({"teacher_vectors": "x"}, "needs distill"),
    ({"distill": 1.0, "teacher_vectors": ("a", "b")}, "teacher's user vectors"),
    ({"distill": 1.0, "teacher_vectors": (torch.zeros(3, 4, dtype=torch.float64), torch.zeros(51, 4, dtype=torch.float64))}, "37 rows"),
    ({"distill": 1.0, "teacher_vectors": (torch.zeros(37, 4, dtype=torch.float64), torch.zeros(51, 5, dtype=torch.float64))}, "do not match"),
])
def test_an_outside_teacher_is_checked(kw, message):
    user, items, targets = _case()
    with pytest.raises(ValueError, match=message):
        matryoshka_cross_entropy(user, items, targets, (2, 4, 8, 16), **kw)


@pytest.mark.parametrize("kw, message", [({"distill": -1.0}, "distill"), ({"distill": float("nan")}, "distill"),
                                         ({"distill": 1.0, "teacher": "smallest"}, "teacher")])
def test_distillation_settings_are_checked(kw, message):
    user, items, targets = _case()
    with pytest.raises(ValueError, match=message):
        matryoshka_cross_entropy(user, items, targets, (2, 4, 8, 16), **kw)


def test_equals_naive_float32():
    sizes = (8, 16, 32, 64)
    user, items, targets = _case(positions=70, items=300, sizes=sizes, dtype=torch.float32, ignored=9)
    flat, du, dz = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes,
                                    weights=(0.3, 1.0, 1.0, 2.0), block_rows=16)
    ref, du_ref, dz_ref = _value_and_grads(naive_matryoshka_cross_entropy, user, items, targets, sizes,
                                           weights=(0.3, 1.0, 1.0, 2.0))
    assert flat.total.dtype == torch.float32 and du.dtype == torch.float32 and dz.dtype == torch.float32
    torch.testing.assert_close(flat.total, ref.total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat.per_size, ref.per_size, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(du, du_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz, dz_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side_by_side", [False, True])
@pytest.mark.parametrize("dtype, spread", [(torch.float32, 40.0), (torch.float64, 400.0)])
def test_target_probability_underflow_is_exact(dtype, spread, side_by_side):
    """Logits so spread that some targets' softmax probability underflows to 0: the CE of those
    rows comes from their recomputed logits and still equals the naive loss (gradients too)."""
    sizes = (2, 4, 8, 16)
    user, items, targets = _case(positions=30, items=40, sizes=sizes, dtype=dtype, ignored=4)
    user = user * spread
    kw = dict(side_by_side=side_by_side)
    flat, du, dz = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes, block_rows=8, **kw)
    ref, du_ref, dz_ref = _value_and_grads(naive_matryoshka_cross_entropy, user, items, targets, sizes, **kw)
    start = sizes[-2] if side_by_side else 0  # the largest size's logits
    logits = user[targets > 0, start:] @ items[1:, start:].t()
    gap = logits.amax(dim=1) - logits.gather(1, targets[targets > 0, None] - 1).squeeze(1)
    assert gap.max() > -math.log(torch.finfo(dtype).tiny)  # some target probability is below the tiniest float
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(flat.per_size, ref.per_size, rtol=tol, atol=0)
    # logits in the hundreds: float32 rounding of a logit moves its probability by about 1e-5
    grad_tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(du, du_ref, rtol=grad_tol, atol=grad_tol)
    torch.testing.assert_close(dz, dz_ref, rtol=grad_tol, atol=grad_tol)


def test_total_is_weighted_sum_of_per_size():
    sizes, weights = (2, 4, 8, 16), (0.5, 1.0, 2.0, 0.25)
    user, items, targets = _case(sizes=sizes)
    out = matryoshka_cross_entropy(user, items, targets, sizes, weights=weights)
    expected = sum(w * ce for w, ce in zip(weights, out.per_size))
    torch.testing.assert_close(out.total, expected, rtol=0, atol=1e-12)


def test_padding_item_is_never_a_candidate():
    """Changing row 0 of the items (even to a huge score) changes nothing, and it gets no gradient."""
    sizes = (2, 4, 8)
    user, items, targets = _case(sizes=sizes)
    out, du, dz = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes)
    loud = items.clone()
    loud[0] = 100.0
    out2, du2, dz2 = _value_and_grads(matryoshka_cross_entropy, user, loud, targets, sizes)
    torch.testing.assert_close(out.total, out2.total, rtol=0, atol=1e-12)
    torch.testing.assert_close(du, du2, rtol=0, atol=1e-12)
    assert torch.equal(dz[0], torch.zeros_like(dz[0]))
    assert torch.equal(dz2[0], torch.zeros_like(dz2[0]))


def test_ignored_positions_have_no_effect():
    sizes = (2, 4, 8)
    user, items, targets = _case(sizes=sizes, ignored=10)
    keep = targets > 0
    out, du, dz = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes, block_rows=4)
    sub, du_sub, dz_sub = _value_and_grads(matryoshka_cross_entropy, user[keep], items, targets[keep], sizes)
    torch.testing.assert_close(out.total, sub.total, rtol=0, atol=1e-12)
    assert torch.equal(du[~keep], torch.zeros_like(du[~keep]))
    torch.testing.assert_close(du[keep], du_sub, rtol=0, atol=1e-12)
    torch.testing.assert_close(dz, dz_sub, rtol=0, atol=1e-12)


def test_no_valid_position_gives_zero():
    sizes = (2, 4)
    user, items, targets = _case(sizes=sizes, positions=6)
    targets = torch.zeros_like(targets)
    for fn in (matryoshka_cross_entropy, naive_matryoshka_cross_entropy):
        out, du, dz = _value_and_grads(fn, user, items, targets, sizes)
        assert out.total.item() == 0.0
        assert torch.equal(out.per_size, torch.zeros(2, dtype=out.per_size.dtype))
        assert not du.any() and not dz.any()


def test_gradient_scales_with_upstream_gradient():
    sizes = (2, 4, 8)
    user, items, targets = _case(sizes=sizes)
    u = user.clone().requires_grad_()
    z = items.clone().requires_grad_()
    out = matryoshka_cross_entropy(u, z, targets, sizes, block_rows=8)
    (3.0 * out.total).backward()
    _, du, dz = _value_and_grads(matryoshka_cross_entropy, user, items, targets, sizes, block_rows=8)
    torch.testing.assert_close(u.grad, 3.0 * du, rtol=0, atol=1e-12)
    torch.testing.assert_close(z.grad, 3.0 * dz, rtol=0, atol=1e-12)


def test_repeated_backward_accumulates():
    """Backward hands out the gradients computed in forward: a second pass must not alter them."""
    sizes = (2, 4, 8)
    user, items, targets = _case(sizes=sizes)
    u, z = user.clone().requires_grad_(), items.clone().requires_grad_()
    out = matryoshka_cross_entropy(u, z, targets, sizes)
    out.total.backward(retain_graph=True)
    first_u, first_z = u.grad.clone(), z.grad.clone()
    out.total.backward(retain_graph=True)
    out.total.backward()
    torch.testing.assert_close(u.grad, 3 * first_u, rtol=0, atol=1e-12)
    torch.testing.assert_close(z.grad, 3 * first_z, rtol=0, atol=1e-12)


def test_gradcheck():
    sizes = (1, 2, 4)
    user, items, targets = _case(positions=6, items=7, sizes=sizes, ignored=1)
    user.requires_grad_()
    items.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda u, z: matryoshka_cross_entropy(u, z, targets, sizes, weights=(1.0, 0.5, 2.0), block_rows=4).total,
        (user, items),
    )


def test_only_one_input_needs_grad_and_no_grad_mode():
    sizes = (2, 4, 8)
    user, items, targets = _case(sizes=sizes)
    _, du_ref, dz_ref = _value_and_grads(naive_matryoshka_cross_entropy, user, items, targets, sizes)
    u = user.clone().requires_grad_()
    out = matryoshka_cross_entropy(u, items, targets, sizes)
    (du,) = torch.autograd.grad(out.total, (u,))
    torch.testing.assert_close(du, du_ref, rtol=0, atol=1e-10)
    z = items.clone().requires_grad_()
    out = matryoshka_cross_entropy(user, z, targets, sizes)
    (dz,) = torch.autograd.grad(out.total, (z,))
    torch.testing.assert_close(dz, dz_ref, rtol=0, atol=1e-10)
    with torch.no_grad():
        out = matryoshka_cross_entropy(user.requires_grad_(), items, targets, sizes)
    ref = naive_matryoshka_cross_entropy(user, items, targets, sizes)
    assert not out.total.requires_grad
    torch.testing.assert_close(out.total, ref.total.detach(), rtol=0, atol=1e-10)


def test_bfloat16_inputs_and_autocast():
    """Low-precision products, float32 softmax: close to the float32 loss at bfloat16 accuracy."""
    sizes = (8, 16, 32)
    user, items, targets = _case(positions=40, items=120, sizes=sizes, dtype=torch.float32)
    user, items = 0.3 * user, 0.3 * items
    ref, du_ref, dz_ref = _value_and_grads(naive_matryoshka_cross_entropy, user, items, targets, sizes)

    out, du, dz = _value_and_grads(matryoshka_cross_entropy, user.bfloat16(), items.bfloat16(), targets, sizes,
                                   block_rows=16)
    assert out.total.dtype == torch.float32 and du.dtype == torch.bfloat16 and dz.dtype == torch.bfloat16
    torch.testing.assert_close(out.per_size, ref.per_size, rtol=2e-2, atol=0)
    torch.testing.assert_close(du.float(), du_ref, rtol=0, atol=3e-2 * du_ref.abs().max().item())
    torch.testing.assert_close(dz.float(), dz_ref, rtol=0, atol=3e-2 * dz_ref.abs().max().item())

    u, z = user.clone().requires_grad_(), items.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = matryoshka_cross_entropy(u, z, targets, sizes, block_rows=16)
        naive = naive_matryoshka_cross_entropy(user, items, targets, sizes)
    out.total.backward()
    assert out.total.dtype == torch.float32
    assert u.grad.dtype == torch.float32 and z.grad.dtype == torch.float32
    # both run their products in bfloat16; the flat loss matches the naive one under autocast
    torch.testing.assert_close(out.per_size, naive.per_size, rtol=1e-2, atol=0)
    torch.testing.assert_close(u.grad, du_ref, rtol=0, atol=3e-2 * du_ref.abs().max().item())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda u, z, t, s, w: (u, z, t, (2, 4), w), "largest size must equal"),
        (lambda u, z, t, s, w: (u, z, t, (4, 2, 8), w), "strictly increasing"),
        (lambda u, z, t, s, w: (u, z, t, s, (1.0, 1.0)), "3 sizes"),
        (lambda u, z, t, s, w: (u, z, t, s, (1.0, -1.0, 1.0)), "non-negative"),
        (lambda u, z, t, s, w: (u, z, t, s, (1.0, float("nan"), 1.0)), "finite"),
        (lambda u, z, t, s, w: (u, z, t.clone().fill_(51), s, w), r"\[0, 50\]"),
        (lambda u, z, t, s, w: (u, z, t - 1, s, w), r"\[0, 50\]"),
        (lambda u, z, t, s, w: (u, z, t.float(), s, w), "integer"),
        (lambda u, z, t, s, w: (u, z, t[:-1], s, w), "targets must have shape"),
        (lambda u, z, t, s, w: (u[:, :4], z, t, s, w), "width"),
        (lambda u, z, t, s, w: (u.float(), z, t, s, w), "same dtype"),
        (lambda u, z, t, s, w: (u[0], z, t, s, w), "user must be a 2-D"),
        (lambda u, z, t, s, w: (u, z[:1], t, s, w), "padding row"),
    ],
)
def test_clear_errors(change, message):
    user, items, targets = _case(sizes=(2, 4, 8))
    args = change(user, items, targets, (2, 4, 8), None)
    for fn in (matryoshka_cross_entropy, naive_matryoshka_cross_entropy):
        with pytest.raises(ValueError, match=message):
            fn(*args[:4], weights=args[4])


def test_block_rows_must_be_positive():
    user, items, targets = _case(sizes=(2, 4, 8))
    with pytest.raises(ValueError, match="block_rows"):
        matryoshka_cross_entropy(user, items, targets, (2, 4, 8), block_rows=0)


# -- sampled softmax --------------------------------------------------------------------------------


def brute_sampled(user, items, targets, sizes, negatives, log_q, weights):
    """Position by position: target and the negatives other than the target, log-Q corrected."""
    per_size = []
    valid = [p for p in range(len(targets)) if targets[p] > 0]
    for s in sizes:
        total = 0.0
        for p in valid:
            t = int(targets[p])
            cands = [t] + [int(j) for j in negatives if int(j) != t]
            logits = user[p, :s] @ items[cands, :s].t()
            if log_q is not None:
                logits = logits - log_q[cands]
            total = total + torch.logsumexp(logits, 0) - logits[0]
        per_size.append(total / len(valid))
    return sum(w * ce for w, ce in zip(weights, per_size)), torch.stack(per_size)


def test_sampled_with_every_item_once_is_the_full_loss():
    sizes, weights = (2, 4, 8, 16), (0.5, 1.0, 2.0, 0.25)
    user, items, targets = _case(sizes=sizes)
    every = torch.randperm(50) + 1
    out, du, dz = _value_and_grads(sampled_matryoshka_cross_entropy, user, items, targets, sizes,
                                   negatives=every, weights=weights)
    ref, du_ref, dz_ref = _value_and_grads(naive_matryoshka_cross_entropy, user, items, targets, sizes,
                                           weights=weights)
    torch.testing.assert_close(out.per_size, ref.per_size, rtol=0, atol=1e-10)
    torch.testing.assert_close(du, du_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(dz, dz_ref, rtol=0, atol=1e-10)
    # a constant log-Q (uniform sampling) changes nothing
    uniform = torch.full((51,), -math.log(50.0), dtype=torch.float64)
    out2 = sampled_matryoshka_cross_entropy(user, items, targets, sizes, every, log_q=uniform, weights=weights)
    torch.testing.assert_close(out2.total, ref.total, rtol=0, atol=1e-10)


def test_sampled_equals_brute_force_with_hits_and_log_q():
    sizes, weights = (2, 4, 8), (1.0, 0.5, 2.0)
    user, items, targets = _case(positions=12, items=30, sizes=sizes, ignored=2)
    gen = torch.Generator().manual_seed(5)
    negatives = torch.randint(1, 31, (9,), generator=gen)
    negatives[:3] = targets[targets > 0][:3]  # accidental hits, and a repeat or two
    negatives[3] = negatives[4]
    log_q = torch.log(torch.rand(31, generator=gen, dtype=torch.float64) + 0.01)
    u, z = user.clone().requires_grad_(), items.clone().requires_grad_()
    out = sampled_matryoshka_cross_entropy(u, z, targets, sizes, negatives, log_q=log_q, weights=weights)
    du, dz = torch.autograd.grad(out.total, (u, z))
    u2, z2 = user.clone().requires_grad_(), items.clone().requires_grad_()
    ref_total, ref_per_size = brute_sampled(u2, z2, targets, sizes, negatives, log_q, weights)
    du_ref, dz_ref = torch.autograd.grad(ref_total, (u2, z2))
    torch.testing.assert_close(out.per_size, ref_per_size.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(du, du_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(dz, dz_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "negatives, log_q, message",
    [
        (torch.tensor([0, 1]), None, r"negatives must lie in \[1, 50\]"),
        (torch.tensor([51]), None, r"negatives must lie in \[1, 50\]"),
        (torch.tensor([1.0]), None, "integer"),
        (torch.tensor([], dtype=torch.long), None, "non-empty"),
        (torch.tensor([1, 2]), torch.zeros(50), r"log_q must have shape \(51,\)"),
    ],
)
def test_sampled_errors(negatives, log_q, message):
    user, items, targets = _case(sizes=(2, 4, 8))
    with pytest.raises(ValueError, match=message):
        sampled_matryoshka_cross_entropy(user, items, targets, (2, 4, 8), negatives, log_q=log_q)


def test_autocast_takes_user_vectors_of_a_bfloat16_product_with_a_float32_item_matrix():
    """Under autocast a head's product gives bfloat16 user vectors beside float32 items (an elastic
    grid's training step): both losses cast both, as they would cast two float32 inputs."""
    sizes = (8, 16, 32)
    user, items, targets = _case(positions=20, items=50, sizes=sizes, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = matryoshka_cross_entropy(user.bfloat16(), items, targets, sizes)
        same = matryoshka_cross_entropy(user, items, targets, sizes)
        negatives = torch.arange(1, 51)
        sampled = sampled_matryoshka_cross_entropy(user.bfloat16(), items, targets, sizes, negatives)
    torch.testing.assert_close(mixed.per_size, same.per_size)
    torch.testing.assert_close(sampled.per_size, same.per_size, rtol=1e-2, atol=0)
    with pytest.raises(ValueError, match="same dtype"):  # outside autocast a mix is still refused
        matryoshka_cross_entropy(user.bfloat16(), items, targets, sizes)


@pytest.mark.parametrize(
    "sizes, weights, block_rows",
    [
        ((2, 4, 8, 16), None, 28),
        ((1, 3, 6, 10, 16), (1.0, 0.0, 3.0, 1.0, 0.5), 15),  # a zero weight: its scale gets no gradient
        ((16,), None, 5),
    ],
)
@pytest.mark.parametrize("side_by_side", [False, True])
def test_logit_scales_equal_naive(sizes, weights, block_rows, side_by_side):
    """Per-size logit scales (learned inverse temperatures): loss and the gradients of the user
    vectors, the items and the scales themselves equal the naive loss's autograd."""
    user, items, targets = _case(sizes=sizes)
    scales = torch.linspace(0.5, 3.0, len(sizes), dtype=torch.float64)
    results = []
    for fn in (matryoshka_cross_entropy, naive_matryoshka_cross_entropy):
        u, z, t = user.clone().requires_grad_(), items.clone().requires_grad_(), scales.clone().requires_grad_()
        kw = {"block_rows": block_rows} if fn is matryoshka_cross_entropy else {}
        out = fn(u, z, targets, sizes, weights=weights, logit_scales=t, side_by_side=side_by_side, **kw)
        results.append((out.total, out.per_size, *torch.autograd.grad(out.total, (u, z, t))))
    for flat, ref in zip(*results):
        torch.testing.assert_close(flat, ref, rtol=0, atol=1e-10)
    unscaled = naive_matryoshka_cross_entropy(user, items, targets, sizes, weights=weights, side_by_side=side_by_side)
    assert not torch.allclose(results[1][1], unscaled.per_size)  # the scales do change the loss


def test_logit_scales_of_one_change_nothing():
    user, items, targets = _case()
    sizes = (2, 4, 8, 16)
    plain = matryoshka_cross_entropy(user, items, targets, sizes, block_rows=28)
    ones = matryoshka_cross_entropy(user, items, targets, sizes, block_rows=28, logit_scales=torch.ones(4, dtype=user.dtype))
    torch.testing.assert_close(plain.per_size, ones.per_size, rtol=0, atol=1e-12)


def test_sampled_loss_with_logit_scales_is_the_full_one_over_every_item():
    """With every item as a negative and no log-Q, the sampled loss is the full one, scales included."""
    user, items, targets = _case(ignored=0)
    sizes = (2, 4, 8, 16)
    scales = torch.tensor([2.0, 1.5, 1.0, 0.5], dtype=user.dtype)
    everything = torch.arange(1, items.shape[0])
    sampled = sampled_matryoshka_cross_entropy(user, items, targets, sizes, everything, logit_scales=scales)
    full = naive_matryoshka_cross_entropy(user, items, targets, sizes, logit_scales=scales)
    torch.testing.assert_close(sampled.per_size, full.per_size, rtol=0, atol=1e-10)


@pytest.mark.parametrize("scales, match", [
    (torch.ones(3), "shape"),
    (torch.tensor([1.0, 0.0, 1.0, 1.0]), "positive"),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0]), "finite"),
])
def test_bad_logit_scales_are_refused(scales, match):
    user, items, targets = _case(dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        matryoshka_cross_entropy(user, items, targets, (2, 4, 8, 16), logit_scales=scales)
    with pytest.raises(ValueError, match="distill"):
        matryoshka_cross_entropy(user, items, targets, (2, 4, 8, 16), logit_scales=torch.ones(4), distill=0.5)
