"""ops/grouped_matmul.py and ops/permute.py against their plain references, forward and backward."""

from __future__ import annotations

import pytest
import torch

from jetmoe.ops.grouped_matmul import (
    grouped_linear,
    grouped_linear_reference,
    grouped_weight_grad_reference,
)
from jetmoe.ops.permute import permute_rows, repeat_rows

# (in, out): aligned rows take F.grouped_mm on CPU, odd ones the per-expert loop.
SHAPES = [(64, 96), (6, 10)]
OFFSETS = [[5, 5, 12, 20], [0, 0, 0, 20], [20, 20, 20, 20]]  # with empty experts, first and last


def _loop_linear(x, weight, offsets):
    """Row by row, each with its own expert: independent of any grouping code."""
    expert_of_row = torch.bucketize(torch.arange(x.shape[0]), offsets.long(), right=True)
    return torch.stack([x[i] @ weight[e].T for i, e in enumerate(expert_of_row.tolist())])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ends", OFFSETS)
def test_grouped_linear_forward_and_backward_equal_the_loop(dtype, shape, ends):
    torch.manual_seed(0)
    features_in, features_out = shape
    x = torch.randn(20, features_in, dtype=dtype, requires_grad=True)
    weight = torch.randn(4, features_out, features_in, dtype=dtype, requires_grad=True)
    offsets = torch.tensor(ends, dtype=torch.int32)
    grad = torch.randn(20, features_out, dtype=dtype)

    out = grouped_linear(x, weight, offsets)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    ref = grouped_linear_reference(x_ref, w_ref, offsets)
    ref.backward(grad)

    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=0, atol=0)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, _loop_linear(x.detach(), weight.detach(), offsets), **tol)
    # An expert that received no rows gets an exactly zero weight gradient.
    starts = [0] + ends[:-1]
    for e, (start, end) in enumerate(zip(starts, ends)):
        if start == end:
            assert torch.count_nonzero(weight.grad[e]) == 0


def test_weight_grad_reference_is_the_per_expert_outer_product_sum():
    torch.manual_seed(0)
    grad, x = torch.randn(7, 3), torch.randn(7, 5)
    offsets = torch.tensor([2, 2, 7], dtype=torch.int32)
    dw = grouped_weight_grad_reference(grad, x, offsets)
    expected = torch.stack([grad[:2].T @ x[:2], torch.zeros(3, 5), grad[2:].T @ x[2:]])
    torch.testing.assert_close(dw, expected)


def test_grouped_linear_accepts_an_expanded_gradient():
    """`out.sum().backward()` hands the op a stride-0 gradient, which F.grouped_mm rejects."""
    x = torch.randn(16, 32, requires_grad=True)
    weight = torch.randn(2, 16, 32, requires_grad=True)
    grouped_linear(x, weight, torch.tensor([8, 16], dtype=torch.int32)).sum().backward()
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_grouped_linear_compiles_fullgraph_in_fp32():
    torch._dynamo.reset()
    x = torch.randn(12, 32)
    weight = torch.randn(3, 16, 32, requires_grad=True)
    offsets = torch.tensor([4, 4, 12], dtype=torch.int32)
    compiled = torch.compile(lambda a, w, o: grouped_linear(a, w, o).square().sum(), fullgraph=True, backend="aot_eager")
    compiled(x, weight, offsets).backward()
    expected = torch.autograd.grad(grouped_linear_reference(x, weight, offsets).square().sum(), weight)[0]
    torch.testing.assert_close(weight.grad, expected)


def test_permute_and_repeat_rows_match_indexing_forward_and_backward():
    torch.manual_seed(0)
    tokens, k, width = 5, 3, 4
    slot_order = torch.randperm(tokens * k)  # e.g. slots grouped by expert
    inverse = torch.empty_like(slot_order).scatter_(0, slot_order, torch.arange(tokens * k))

    x = torch.randn(tokens, width, requires_grad=True)
    grouped = repeat_rows(x, slot_order // k, inverse, k)
    x_ref = x.detach().clone().requires_grad_()
    grouped_ref = x_ref[slot_order // k]
    torch.testing.assert_close(grouped, grouped_ref, rtol=0, atol=0)

    slots = permute_rows(grouped, inverse, slot_order)
    slots_ref = grouped_ref[inverse]
    torch.testing.assert_close(slots, slots_ref, rtol=0, atol=0)
    # Slot order is token-major: slot n*k + j belongs to token n.
    torch.testing.assert_close(slots.view(tokens, k, width), x.detach()[:, None].expand(tokens, k, width))

    weights = torch.randn(tokens * k, width)
    (slots * weights).sum().backward()
    (slots_ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("contiguous_grad", [True, False], ids=["grad-transposed-copy", "grad-view"])
def test_cpu_bucketed_groups_match_the_loop(monkeypatch, dtype, contiguous_grad):
    """Low-precision CPU path: groups over one bucket are computed on rounded-up row counts, reading the
    next groups' rows (or a zero-padded copy at the end); one-row groups take a matrix-vector product.
    Weight gradients of groups up to CONTIGUOUS_GRAD_MAX_ROWS take a contiguous transposed gradient, larger
    ones a transposed view (forced here by a limit of 0)."""
    from jetmoe.ops import grouped_matmul

    if not contiguous_grad:
        monkeypatch.setattr(grouped_matmul, "CONTIGUOUS_GRAD_MAX_ROWS", 0)
    torch.manual_seed(0)
    bucket = grouped_matmul.EXPERT_BUCKET_ROWS
    # A group spilling into a one-row group, an empty one and a five-row one (computed weight-first), then a
    # last group running past the end.
    ends = [bucket + 6, bucket + 7, bucket + 7, bucket + 12, 3 * bucket + 8]
    x = torch.randn(ends[-1], 48, dtype=dtype, requires_grad=True)
    weight = torch.randn(5, 40, 48, dtype=dtype, requires_grad=True)
    offsets = torch.tensor(ends, dtype=torch.int32)
    grad = torch.randn(ends[-1], 40, dtype=dtype)

    out = grouped_linear(x, weight, offsets)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    ref = grouped_linear_reference(x_ref, w_ref, offsets)
    ref.backward(grad)

    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(weight.grad, w_ref.grad)
    exact = _loop_linear(x.detach().double(), weight.detach().double(), offsets)
    torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=1e-2)
    assert torch.count_nonzero(weight.grad[2]) == 0  # the empty expert
    with torch.no_grad():  # inference skips the custom op's dispatch: same kernels, same result
        torch.testing.assert_close(grouped_linear(x, weight, offsets), out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_linear_one_row_matches_f_linear(dtype):
    """ops.dense.linear: the one-row bf16 inference path (a matrix-vector product) against F.linear."""
    from jetmoe.ops.dense import Linear, linear

    torch.manual_seed(0)
    weight, bias = torch.randn(300, 64, dtype=dtype), torch.randn(300, dtype=dtype)
    for shape in [(1, 1, 64), (64,), (3, 64)]:
        for b in (None, bias):
            x = torch.randn(shape, dtype=dtype)
            with torch.no_grad():
                got = linear(x, weight, b)
            want = torch.nn.functional.linear(x, weight, b)
            exact = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
            assert got.shape == want.shape and got.dtype == dtype
            torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=5e-2)  # one bf16 rounding
            torch.testing.assert_close(got, want, rtol=1e-2, atol=5e-2)
    layer = Linear(64, 300, bias=False).to(dtype)
    assert isinstance(layer, torch.nn.Linear) and list(layer.state_dict()) == ["weight"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ends", [[2, 3, 5, 8, 8, 11, 13, 16], [1, 2, 3, 4, 5, 6, 7, 8], [4, 4, 6, 9, 12, 12, 14, 20]])
def test_cpu_padded_bmm_for_decode_sized_groups_equals_the_expert_loop(monkeypatch, dtype, ends):
    """Batched decoding (at most 16 rows per expert, most experts in use) where jetmoe's C kernel does not
    run: one bmm over zero-padded groups, bit for bit what the per-expert loop computes (one-row groups there
    take a matrix-vector product)."""
    from jetmoe.ops import grouped_matmul

    monkeypatch.setattr(grouped_matmul.native, "gemv_ok", lambda x, weight: False)
    torch.manual_seed(0)
    x = torch.randn(ends[-1], 128, dtype=dtype)
    weight = torch.randn(8, 96, 128, dtype=dtype)
    offsets = torch.tensor(ends, dtype=torch.int32)
    calls = []
    padded_bmm = grouped_matmul._cpu_lowp_padded_bmm
    monkeypatch.setattr(grouped_matmul, "_cpu_lowp_padded_bmm", lambda *a: calls.append(1) or padded_bmm(*a))
    with torch.no_grad():
        out = grouped_linear(x, weight, offsets)
    assert calls, "the padded bmm path was not taken"
    starts = [0] + ends[:-1]
    loop = torch.cat([  # the loop's products: weight-first, or a matrix-vector product for one row
        grouped_matmul._cpu_lowp_few_rows(x[start:end], weight[e])
        for e, (start, end) in enumerate(zip(starts, ends)) if end > start
    ])  # fmt: skip
    assert torch.equal(out, loop)
    torch.testing.assert_close(out, grouped_linear_reference(x, weight, offsets))
