"""shared_kv_attention against the explicit reference, with queries that may attend to nothing (left padding)."""

from __future__ import annotations

import pytest
import torch

from jetmoe.ops.attention import additive_inference_mask, shared_kv_attention, shared_kv_attention_reference


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_additive_inference_mask_gives_the_boolean_masks_output_bit_for_bit(dtype):
    """The mask the model converts once per forward (CPU inference): SDPA's output is the boolean mask's."""
    (query, key, value), mask = _inputs(dtype, q_len=4, key_len=9)
    mask = torch.rand(2, 1, 4, 9, generator=torch.Generator().manual_seed(1)) < 0.6
    mask[..., 3] = True  # every query sees some key
    with torch.no_grad():
        additive = additive_inference_mask(mask, dtype)
        assert additive.dtype == dtype and additive.shape == mask.shape
        assert torch.equal(additive == 0, mask) and torch.isneginf(additive[~mask]).all()
        expected = shared_kv_attention(query, key, value, mask, scale=0.35)
        assert torch.equal(shared_kv_attention(query, key, value, additive, scale=0.35), expected)


def test_additive_inference_mask_keeps_the_boolean_mask_where_it_must():
    """Kept boolean: a query that sees no key (SDPA gives it 0 from a boolean mask, NaN from an additive
    one), under autograd (the guarded path needs the boolean form), and for masks that are not boolean."""
    _, mask = _inputs(torch.float32)
    with torch.no_grad():
        assert additive_inference_mask(mask, torch.float32) is mask
        assert additive_inference_mask(None, torch.float32) is None
        additive = torch.zeros(2, 1, 3, 5)
        assert additive_inference_mask(additive, torch.float32) is additive
    full = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    assert additive_inference_mask(full, torch.float32) is full  # grad mode is on here
