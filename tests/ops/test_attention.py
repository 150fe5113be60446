"""shared_kv_attention against the explicit reference, with queries that may attend to nothing (left padding)."""

from __future__ import annotations

import pytest
import torch

from jetmoe.ops.attention import shared_kv_attention, shared_kv_attention_reference


def _inputs(dtype, q_len=3, key_len=5, requires_grad=False):
    generator = torch.Generator().manual_seed(0)
    shape_q, shape_kv = (2, 2, 2, q_len, 8), (2, 2, key_len, 8)  # [B, Nkv, k, T, D], [B, Nkv, S, D]
    tensors = [torch.randn(s, generator=generator).to(dtype) for s in (shape_q, shape_kv, shape_kv)]
    mask = torch.ones(2, 1, q_len, key_len, dtype=torch.bool)
    mask[0, :, 0] = False  # batch 0's first query sees no key
    mask[1, :, :, :2] = False
    return [t.requires_grad_(requires_grad) for t in tensors], mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_with_a_fully_masked_row_equals_the_guarded_path(dtype):
    """CPU inference skips the guard for rows that see no key (SDPA's CPU kernel already gives them 0): same
    values as the guarded path that autograd takes, and 0 in those rows."""
    (query, key, value), mask = _inputs(dtype)
    with torch.no_grad():
        fast = shared_kv_attention(query, key, value, mask, scale=0.35)
    guarded = shared_kv_attention(query.requires_grad_(), key, value, mask, scale=0.35).detach()
    assert torch.equal(fast, guarded)
    assert not fast[0, :, :, 0].any()
    expected, _ = shared_kv_attention_reference(query.detach(), key, value, mask, scale=0.35)
    seen = mask.any(-1)[:, :, None, :, None].expand_as(fast)
    tolerance = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)  # the reference rounds probs to bf16
    torch.testing.assert_close(fast[seen], expected[seen], **tolerance)


def test_gradients_stay_finite_with_a_fully_masked_row():
    (query, key, value), mask = _inputs(torch.float32, requires_grad=True)
    shared_kv_attention(query, key, value, mask, scale=0.35).square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (query, key, value))
