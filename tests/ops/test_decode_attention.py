"""jetmoe's decoding attention kernel (ops/native/decode.c): softmax attention of a few queries over (cached) K/V,
against a float64 reference, with masks, strided views, the cache write it can do first, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jetmoe.ops import native
from jetmoe.ops.attention import shared_kv_attention
from jetmoe.ops.native import decode

pytestmark = pytest.mark.skipif(not native.available(), reason="jetmoe's C kernels do not build here")
BF16 = torch.bfloat16


def _reference(query, key, value, mask, scale):
    """float64 softmax attention: query [B, Nkv, G, T, D], key/value [B, Nkv, S, D], mask [B or 1, 1, T, S]."""
    scores = torch.einsum("bhgtd,bhsd->bhgts", query.double(), key.double()) * scale
    if mask is not None:
        additive = mask.double()
        if mask.dtype == torch.bool:
            additive = torch.zeros(mask.shape, dtype=torch.double).masked_fill(~mask, float("-inf"))
        scores = scores + additive[:, :, None]
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhgts,bhsd->bhgtd", probs, value.double())


def _inputs(batch=2, heads=3, groups=2, length=1, positions=37, dim=64, seed=0, dtype=BF16):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, groups, length, dim, generator=g).to(dtype)
    key = torch.randn(batch, heads, positions, dim, generator=g).to(dtype)
    value = torch.randn(batch, heads, positions, dim, generator=g).to(dtype)
    return query, key, value


@pytest.mark.parametrize("mask_kind", ["none", "bool", "bf16", "fp32"])
@pytest.mark.parametrize("length", [1, 3])
def test_matches_softmax_attention(mask_kind, length):
    query, key, value = _inputs(length=length)
    mask = None
    if mask_kind != "none":
        allowed = torch.rand(2, 1, length, 37, generator=torch.Generator().manual_seed(1)) > 0.3
        allowed[..., 0] = True
        mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        mask = mask.to({"bool": torch.bool, "bf16": BF16, "fp32": torch.float32}[mask_kind])
    with torch.no_grad():
        got = decode.attention(query, key, value, mask, 0.125)
    want = _reference(query, key, value, mask, 0.125)
    assert got.dtype == BF16 and got.shape == query.shape
    torch.testing.assert_close(got.double(), want, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "fp32"])
@pytest.mark.parametrize("length", [1, 3])
def test_fp32_matches_softmax_attention_to_fp32_rounding(mask_kind, length):
    """fp32 throughout (no bf16 rounding of the probabilities): within fp32 roundings of the float64 result."""
    query, key, value = _inputs(length=length, dtype=torch.float32)
    mask = None
    if mask_kind != "none":
        allowed = torch.rand(2, 1, length, 37, generator=torch.Generator().manual_seed(1)) > 0.3
        allowed[..., 0] = True
        mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        got = decode.attention(query, key, value, mask, 0.125)
    assert got.dtype == torch.float32 and got.shape == query.shape
    torch.testing.assert_close(got.double(), _reference(query, key, value, mask, 0.125), rtol=1e-5, atol=1e-6)


def test_agrees_with_sdpa_to_within_bf16_rounding():
    query, key, value = _inputs(batch=1, heads=8, groups=2, positions=200)
    with torch.no_grad():
        got = decode.attention(query, key, value, None, 0.125)
        sdpa = F.scaled_dot_product_attention(query.reshape(1, 16, 1, 64), key, value, scale=0.125, enable_gqa=True)
    difference = (got.reshape(sdpa.shape).float() - sdpa.float()).abs()
    assert difference.max() <= 2 ** -7 and (difference > 0).float().mean() < 0.2


def test_a_query_that_sees_nothing_gets_zero_and_views_work():
    query, key, value = _inputs(groups=2, length=1, positions=12)
    buffer_k = torch.zeros(2, 3, 20, 64, dtype=BF16)
    buffer_v = torch.zeros(2, 3, 20, 64, dtype=BF16)
    buffer_k[:, :, :12], buffer_v[:, :, :12] = key, value
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[1] = False  # row 1 may attend to nothing
    permuted = query.permute(0, 3, 2, 1, 4).contiguous().permute(0, 3, 2, 1, 4)  # strided query
    with torch.no_grad():
        got = decode.attention(permuted, buffer_k[:, :, :12], buffer_v[:, :, :12], mask, 0.125)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    torch.testing.assert_close(got[0].double(), _reference(query, key, value, None, 0.125)[0], rtol=1.6e-2, atol=1e-2)


def test_writes_the_new_rows_first_then_attends_over_them():
    query, key, value = _inputs(positions=10)
    buffer_k, buffer_v = key.clone(), value.clone()
    new_k, new_v = torch.randn(2, 3, 64).to(BF16), torch.randn(2, 3, 64).to(BF16)
    where = torch.tensor([4, 9])
    with torch.no_grad():
        got = decode.attention(query, buffer_k, buffer_v, None, 0.125, new=(new_k, new_v, where))
    key[0, :, 4], value[0, :, 4], key[1, :, 9], value[1, :, 9] = new_k[0], new_v[0], new_k[1], new_v[1]
    assert torch.equal(buffer_k, key) and torch.equal(buffer_v, value)
    with torch.no_grad():
        assert torch.equal(got, decode.attention(query, key, value, None, 0.125))
    with torch.no_grad(), pytest.raises(ValueError, match="outside"):
        decode.attention(query, buffer_k, buffer_v, None, 0.125, new=(new_k, new_v, torch.tensor([4, 10])))


def test_shared_kv_attention_takes_the_kernel_only_for_few_products_in_bf16_or_fp32_inference():
    query, key, value = _inputs(batch=1, heads=2, groups=2, positions=30)
    with torch.no_grad():
        assert decode.attention_takes(query, key, value, None)
        expected = decode.attention(query, key, value, None, 0.125)
        assert torch.equal(shared_kv_attention(query, key, value, None, 0.125), expected)
        long_key = torch.zeros(1, 2, decode.MAX_ATTENTION_PRODUCTS, 64, dtype=BF16)
        assert not decode.attention_takes(query, long_key, long_key, None)  # SDPA's blocked kernel wins there
        assert decode.attention_takes(query.float(), key.float(), value.float(), None)
        assert not decode.attention_takes(query.half(), key.half(), value.half(), None)
        assert not decode.attention_takes(query.float(), key, value, None)  # mixed dtypes
    assert not decode.attention_takes(query, key, value, None)  # autograd on


def test_bad_inputs_are_rejected():
    query, key, value = _inputs()
    with torch.no_grad():
        with pytest.raises(ValueError, match="decode attention"):
            decode.attention(query, key[:, :, :5], value, None, 0.125)
        with pytest.raises(ValueError, match="decode attention"):
            decode.attention(query, key, value, torch.ones(2, 1, 1, 5, dtype=torch.bool), 0.125)
        with pytest.raises(ValueError, match="decode attention"):
            decode.attention(query, key, value, None, 0.125, new=(key[:, :, 0], value[:, :, 0], torch.tensor([1])))
        with pytest.raises(ValueError, match="bf16 or fp32 alike"):
            decode.attention(query.float(), key, value, None, 0.125)  # mixed dtypes
        with pytest.raises(ValueError, match="bf16 or fp32 alike"):
            decode.attention(query, key, value, None, 0.125, out=torch.empty(query.shape))  # an fp32 out for bf16


def test_threads_split_the_work_without_changing_a_value():
    """(row, kv head) pairs go to the threads; each output is computed whole by one of them."""
    query, key, value = _inputs(batch=2, heads=3, groups=2, length=3, positions=300, seed=4)
    mask = torch.rand(2, 1, 3, 300, generator=torch.Generator().manual_seed(5)) > 0.2
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            with torch.no_grad():
                results.append(decode.attention(query, key, value, mask, 0.125))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    torch.testing.assert_close(results[0].double(), _reference(query, key, value, mask, 0.125), rtol=1.6e-2, atol=1e-2)
