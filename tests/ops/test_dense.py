"""ops/dense.Linear: the cached K x N copy of a large bf16 weight for prompts (inference only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jetmoe.ops import dense


@pytest.fixture
def small_thresholds(monkeypatch):
    """The K x N path for a test-sized weight and prompt."""
    monkeypatch.setattr(dense, "KN_COPY_MIN_WEIGHT", 64 * 96)
    monkeypatch.setattr(dense, "KN_COPY_MIN_ROWS", 8)
    monkeypatch.setattr(dense, "kn_copy_helps", lambda: True)  # as on a CPU that multiplies bf16 in hardware


def test_prompts_use_a_cached_copy_that_follows_the_weight(small_thresholds):
    torch.manual_seed(0)
    layer = dense.Linear(64, 96, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 8, 64).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        assert layer._kn_cache is not None
        copy = layer._kn_cache[1]
        assert torch.equal(copy, layer.weight.t()) and copy.is_contiguous()
        # Same products as F.linear up to the order of the sums (one rounding of an fp32 sum either way).
        torch.testing.assert_close(out, F.linear(x, layer.weight), rtol=1e-2, atol=1e-2)
        layer(x)
        assert layer._kn_cache[1] is copy  # reused while the weight is unchanged

        layer.weight.mul_(-2)  # an in-place update (as an optimizer step): the copy is rebuilt
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-2, atol=1e-2)
        assert torch.equal(layer._kn_cache[1], layer.weight.t())
        layer.weight = torch.nn.Parameter(torch.randn(96, 64).to(torch.bfloat16))  # new storage: rebuilt too
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-2, atol=1e-2)


def test_training_small_inputs_and_fp32_keep_f_linear(small_thresholds):
    torch.manual_seed(0)
    layer = dense.Linear(64, 96, bias=False).to(torch.bfloat16)
    x = torch.randn(8, 64).to(torch.bfloat16)
    out = layer(x)  # autograd: the plain product, gradients to the weight itself
    out.float().sum().backward()
    assert layer._kn_cache is None and layer.weight.grad is not None
    with torch.no_grad():
        layer(x[:4])  # fewer rows than the threshold
        assert layer._kn_cache is None
        layer.float()(x.float())
        assert layer._kn_cache is None


def test_where_bf16_is_emulated_prompts_keep_the_stored_weight(small_thresholds, monkeypatch):
    """Without bf16 arithmetic (AVX2) the K x N product is many times slower: no copy, F.linear's values exactly."""
    monkeypatch.setattr(dense, "kn_copy_helps", lambda: False)
    torch.manual_seed(0)
    layer = dense.Linear(64, 96, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 8, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight))
    assert layer._kn_cache is None


def test_the_copy_follows_the_cpus_bf16_arithmetic(monkeypatch):
    """kn_copy_helps is the CPU's answer, read once (held below bf16 by ONEDNN_MAX_CPU_ISA: no)."""
    from jetmoe.ops import cpu_bf16
    from jetmoe.ops.native import build

    cpu_bf16.emulated.cache_clear()
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not dense.kn_copy_helps()
    cpu_bf16.emulated.cache_clear()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert dense.kn_copy_helps()
    cpu_bf16.emulated.cache_clear()  # the next caller reads this CPU's own answer
