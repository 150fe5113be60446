"""shared_kv_attention against the explicit reference, with queries that may attend to nothing (left padding), and
its recomputed backward for bf16 training on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jetmoe.ops import attention as attention_ops
from jetmoe.ops import native
from jetmoe.ops.attention import additive_inference_mask, shared_kv_attention, shared_kv_attention_reference
from jetmoe.ops.native import elementwise as native_elementwise


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


# --- bf16 training on the CPU: SDPA's forward, the backward recomputed (ops/attention._CausalAttention) ---------

requires_native = pytest.mark.skipif(native.load() is None, reason="no C compiler or no AVX-512 BF16 here")


def _causal_inputs(batch, kv_heads, groups, length, head_dim, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(length)
    shapes = [(batch, kv_heads, groups, length, head_dim), (batch, kv_heads, length, head_dim)]
    query, key, value = (torch.randn(shapes[min(i, 1)], generator=generator).to(dtype) for i in range(3))
    grad = torch.randn(shapes[0], generator=generator).to(dtype)
    return [t.requires_grad_() for t in (query, key, value)], grad


def _float64_gradients(query, key, value, grad, scale):
    batch, kv_heads, groups, length, head_dim = query.shape
    q, k, v = (t.detach().double().requires_grad_() for t in (query, key, value))
    out = F.scaled_dot_product_attention(
        q.reshape(batch, -1, length, head_dim), k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
        is_causal=True, scale=scale,
    )  # fmt: skip
    return torch.autograd.grad(out, (q, k, v), grad.double().reshape_as(out))


def _rms(a, b):
    return (a.double() - b).square().mean().sqrt().item()


@requires_native
@pytest.mark.parametrize(
    "shape", [(2, 8, 2, 512, 64), (1, 2, 3, 37, 16), (2, 2, 2, 100, 128)]  # [B, Nkv, k, T, D]: tails of 16 keys
)
def test_recomputed_backward_is_as_accurate_as_sdpas(shape):
    """Output: SDPA's, bit for bit (the same forward kernel). Gradients against float64: within 2x SDPA's own
    rms error (measured: dq 1.6-1.8x, dk and dv 0.8-1.1x)."""
    (query, key, value), grad = _causal_inputs(*shape)
    scale = shape[-1] ** -0.5
    out = shared_kv_attention(query, key, value, None, scale)
    assert type(out.grad_fn).__name__ == "_CausalAttentionBackward"
    ours = torch.autograd.grad(out, (query, key, value), grad)
    batch, kv_heads, groups, length, head_dim = shape
    sdpa = F.scaled_dot_product_attention(
        query.reshape(batch, -1, length, head_dim), key, value, is_causal=True, scale=scale, enable_gqa=True
    )
    assert torch.equal(out, sdpa.view_as(out))
    theirs = torch.autograd.grad(sdpa, (query, key, value), grad.reshape_as(sdpa))
    for name, mine, reference, exact in zip("qkv", ours, theirs, _float64_gradients(query, key, value, grad, scale)):
        assert mine.shape == exact.shape and mine.dtype == torch.bfloat16, name
        assert _rms(mine, exact) <= 2 * _rms(reference, exact), name


@requires_native
def test_recomputed_backward_works_through_chunks_of_kv_heads(monkeypatch):
    """The backward runs over chunks of K/V heads to bound its buffers: one head at a time gives the same."""
    (query, key, value), grad = _causal_inputs(2, 3, 2, 40, 16)
    whole = torch.autograd.grad(shared_kv_attention(query, key, value, None, 0.25), (query, key, value), grad)
    monkeypatch.setattr(attention_ops, "_RECOMPUTED_CHUNK_ELEMENTS", 1)
    chunked = torch.autograd.grad(shared_kv_attention(query, key, value, None, 0.25), (query, key, value), grad)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


@requires_native
def test_second_derivatives_through_the_recomputed_backward_are_the_explicit_formulas():
    """create_graph: the backward differentiates the explicit attention instead (SDPA's flash kernel has no
    second derivative at all)."""
    results = []
    for attend in (
        lambda q, k, v: shared_kv_attention(q, k, v, None, 0.25),
        lambda q, k, v: shared_kv_attention_reference(q, k, v, None, 0.25)[0],
    ):
        (query, key, value), grad = _causal_inputs(1, 2, 2, 24, 16)
        out = attend(query, key, value)
        (grad_q,) = torch.autograd.grad(out, query, grad, create_graph=True)
        grad_q.float().square().sum().backward()
        results.append((out.grad_fn, grad_q, query.grad, key.grad, value.grad))
    assert type(results[0][0]).__name__ == "_CausalAttentionBackward"
    for ours, explicit in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(ours, explicit, rtol=0, atol=0)


@requires_native
def test_which_attention_calls_take_the_recomputed_backward():
    """bf16, causal without a mask, autograd, no dropout, at most RECOMPUTED_BACKWARD_MAX_KEYS keys; else SDPA's own."""

    def node(length=16, dtype=torch.bfloat16, mask=None, dropout=0.0, grad=True, q_len=None):
        (query, key, value), _ = _causal_inputs(1, 2, 2, length, 16, dtype)
        if q_len is not None:
            query = query[:, :, :, -q_len:]
        with torch.set_grad_enabled(grad):
            out = shared_kv_attention(query, key, value, mask, 0.25, dropout_p=dropout)
        return type(out.grad_fn).__name__ if out.grad_fn is not None else None

    assert node() == "_CausalAttentionBackward"
    assert node(dtype=torch.float32) != "_CausalAttentionBackward"  # SDPA's backward is faster in fp32
    assert node(length=attention_ops.RECOMPUTED_BACKWARD_MAX_KEYS + 16) != "_CausalAttentionBackward"
    assert node(mask=torch.ones(16, 16, dtype=torch.bool).tril()) != "_CausalAttentionBackward"
    assert node(dropout=0.1) != "_CausalAttentionBackward"
    assert node(q_len=4) != "_CausalAttentionBackward"  # queries after a cache: not the square causal case
    assert node(grad=False) is None


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_probability_kernels_follow_their_formulas(dtype):
    """exp(scale * s - lse) where row r (position r % q_len of the last q_len of the keys) sees the key, else
    0; and the score gradient probs * (grad_probs - delta) * scale, written over grad_probs."""
    generator = torch.Generator().manual_seed(3)
    blocks, groups, q_len, keys, scale = 3, 2, 21, 37, 0.3
    scores = torch.randn(blocks, groups * q_len, keys, generator=generator).to(dtype)
    log_norm = torch.randn(blocks, groups * q_len, generator=generator) + 3
    grad_probs = torch.randn(blocks, groups * q_len, keys, generator=generator).to(dtype)
    delta = torch.randn(blocks, groups * q_len, generator=generator)
    position = torch.arange(groups * q_len) % q_len + (keys - q_len)
    sees = torch.arange(keys)[None, :] <= position[:, None]
    probs = torch.where(sees, torch.exp(scale * scores.float() - log_norm[..., None]), 0.0)
    expected_grad = probs * (grad_probs.float() - delta[..., None]) * scale
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    got = native_elementwise.causal_attention_probs(scores, log_norm, q_len, scale)
    assert got.dtype == dtype and not got[~sees.expand_as(got)].any()
    torch.testing.assert_close(got.float(), probs, **tolerance)
    out = native_elementwise.causal_attention_score_grad(scores, grad_probs, log_norm, delta, q_len, scale)
    assert out.data_ptr() == grad_probs.data_ptr()
    torch.testing.assert_close(out.float(), expected_grad, **tolerance)


@requires_native
def test_causal_probability_kernels_reject_bad_shapes():
    scores, log_norm = torch.zeros(2, 6, 5), torch.zeros(2, 6)
    with pytest.raises(ValueError, match="q_len <= keys"):
        native_elementwise.causal_attention_probs(scores, log_norm, 4, 1.0)  # 6 rows are not groups of 4
    with pytest.raises(ValueError, match="q_len <= keys"):
        native_elementwise.causal_attention_probs(scores, log_norm, 6, 1.0)  # more queries than keys
    with pytest.raises(ValueError, match="lse fp32"):
        native_elementwise.causal_attention_probs(scores, log_norm.double(), 3, 1.0)
    with pytest.raises(ValueError, match="all one dtype"):
        native_elementwise.causal_attention_score_grad(scores.bfloat16(), scores, log_norm, log_norm, 3, 1.0)
    with pytest.raises(ValueError, match="delta fp32"):
        native_elementwise.causal_attention_score_grad(scores, scores.clone(), log_norm, log_norm[:1], 3, 1.0)
