"""bf16 prompts on a CPU without bf16 arithmetic (ops/cpu_bf16.py): products over many rows run in fp32 and are
rounded once, giving the bf16 kernels' values within bf16 rounding; few rows (decoding) stay in bf16."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from oracle_pair import TINY, build_pair, random_ids

from jetmoe.ops import cpu_bf16, dense, grouped_matmul
from jetmoe.ops.attention import shared_kv_attention


@pytest.fixture
def emulated(monkeypatch):
    """Run as on a CPU without bf16 arithmetic, counting the fp32 products."""
    monkeypatch.setattr(cpu_bf16, "emulated", lambda: True)
    widened = []
    original = torch.Tensor.float

    def counting_float(self, *args, **kwargs):
        if self.dtype == torch.bfloat16:
            widened.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "float", counting_float)
    return widened


def _bf16_close(ours: torch.Tensor, exact: torch.Tensor) -> None:
    """Within two bf16 steps of the exact (float64) value, relative to the row's scale."""
    scale = exact.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
    assert ((ours.double() - exact).abs() / scale).max() <= 2 * 2**-8


def test_a_prompts_grouped_expert_products_run_in_fp32(emulated):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 64, generator=generator).bfloat16()
    weight = torch.randn(4, 48, 64, generator=generator).bfloat16()
    offsets = torch.tensor([30, 30, 70, 96], dtype=torch.int32)
    with torch.no_grad():
        out = grouped_matmul.grouped_linear(x, weight, offsets)
    assert out.dtype == torch.bfloat16 and (48, 64) in emulated
    _bf16_close(out, grouped_matmul.grouped_linear_reference(x.double(), weight.double(), offsets))
    emulated.clear()
    few = grouped_matmul.grouped_linear(x[:8], weight, torch.tensor([2, 4, 6, 8], dtype=torch.int32))
    assert few.dtype == torch.bfloat16 and not emulated  # decoding rows stay in bf16


def test_training_products_stay_in_bf16(emulated):
    """Autograd's products (the grouped experts' forward and backward, dense layers, attention) keep the bf16
    kernels where bf16 is emulated: only inference widens (the one warning says bf16 training is slower)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(96, 64, generator=generator).bfloat16().requires_grad_()
    weight = torch.randn(4, 48, 64, generator=generator).bfloat16().requires_grad_()
    offsets = torch.tensor([30, 30, 70, 96], dtype=torch.int32)
    grouped_matmul.grouped_linear(x, weight, offsets).sum().backward()
    layer = dense.Linear(64, 80).bfloat16()
    layer(x).sum().backward()
    query = torch.randn(1, 2, 2, 40, 16, generator=generator).bfloat16().requires_grad_()
    key, value = (torch.randn(1, 2, 40, 16, generator=generator).bfloat16() for _ in range(2))
    shared_kv_attention(query, key, value, None, 0.25).sum().backward()
    operands = {(48, 64), (64, 48), (80, 64), (1, 2, 2, 40, 16), (1, 2, 40, 16)}  # weights, attention inputs
    assert operands.isdisjoint(emulated)
    assert x.grad is not None and weight.grad is not None and query.grad is not None


def test_a_prompts_dense_products_and_attention_run_in_fp32(emulated):
    generator = torch.Generator().manual_seed(1)
    layer = dense.Linear(64, 80, bias=True).bfloat16()
    x = torch.randn(2, 40, 64, generator=generator).bfloat16()
    with torch.no_grad():
        out = layer(x)
    assert (80, 64) in emulated and out.dtype == torch.bfloat16
    _bf16_close(out, F.linear(x.double(), layer.weight.double(), layer.bias.double()))

    query = torch.randn(1, 2, 2, 40, 16, generator=generator).bfloat16()
    key, value = (torch.randn(1, 2, 40, 16, generator=generator).bfloat16() for _ in range(2))
    emulated.clear()
    with torch.no_grad():
        attended = shared_kv_attention(query, key, value, None, 0.25)
    assert emulated and attended.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(
        query.double().reshape(1, 4, 40, 16), key.double(), value.double(), is_causal=True, scale=0.25, enable_gqa=True
    ).view(1, 2, 2, 40, 16)
    _bf16_close(attended, expected)


def test_a_bf16_model_prefills_the_same_tokens_either_way(monkeypatch):
    model, _ = build_pair(dict(TINY, hidden_size=64, kv_channels=32, intermediate_size=64))
    model = model.bfloat16()
    ids = random_ids(2, 40)
    with torch.no_grad():
        native_bf16 = model(ids).logits
        monkeypatch.setattr(cpu_bf16, "emulated", lambda: True)
        widened = model(ids).logits
    assert widened.dtype == torch.bfloat16
    assert (widened.float() - native_bf16.float()).abs().max() <= 0.02 * native_bf16.float().abs().max()
    assert (widened.argmax(-1) == native_bf16.argmax(-1)).float().mean() >= 0.95


def test_onednn_held_below_bf16_counts_as_emulated():
    script = "from jetmoe.ops import cpu_bf16; print(cpu_bf16.emulated())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
