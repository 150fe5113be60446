"""JetMoeRMSNorm's hand-written backward against autograd through the plain operations; the rotary embedding's
tables against the oracle's."""

from __future__ import annotations

import pytest
import torch

from jetmoe import JetMoeConfig
from jetmoe.modeling.norm_rotary import JetMoeRMSNorm, JetMoeRotaryEmbedding


def _plain(hidden, weight, eps):
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(hidden.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rms_norm_output_is_identical_and_gradients_match(dtype):
    torch.manual_seed(0)
    norm = JetMoeRMSNorm(48).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    hidden = (3 * torch.randn(2, 5, 48)).to(dtype).requires_grad_()
    grad = torch.randn(2, 5, 48).to(dtype)

    out = norm(hidden)
    out.backward(grad)
    got_input, got_weight = hidden.grad.clone(), norm.weight.grad.clone()
    hidden.grad, weight = None, norm.weight.detach().clone().requires_grad_()
    want = _plain(hidden, weight, norm.variance_epsilon)
    want.backward(grad)

    assert torch.equal(out, want)  # same forward operations: bit for bit
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_input, hidden.grad, **tol)
    torch.testing.assert_close(got_weight, weight.grad, **tol)
    with torch.no_grad():
        assert torch.equal(norm(hidden), want)  # the inference path: the plain operations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_tables_are_the_oracles_bit_for_bit(monkeypatch, dtype):
    """Eager CPU calls read precomputed tables (positions below TABLE_POSITIONS), others compute: both give the
    oracle's cos/sin exactly, and an in-place change of inv_freq rebuilds the tables."""
    from transformers.models.jetmoe import modeling_jetmoe as oracle

    config = JetMoeConfig(kv_channels=64, max_position_embeddings=4096)
    ours, theirs = JetMoeRotaryEmbedding(config), oracle.JetMoeRotaryEmbedding(config)
    monkeypatch.setattr(JetMoeRotaryEmbedding, "TABLE_POSITIONS", 1000)
    x = torch.zeros(1, dtype=dtype)
    cases = [torch.arange(7)[None], torch.tensor([[0], [513], [999]]), torch.tensor([[998, 999, 1000, 3000]])]
    for positions in cases:
        for got, want in zip(ours(x, positions), theirs(x, positions)):
            assert got.dtype == want.dtype == dtype and torch.equal(got, want), positions
    assert ours._table_cache is not None and ours._table_cache[1][0].shape == (1000, 64)
    with torch.no_grad():
        ours.inv_freq.mul_(0.5)
        theirs.inv_freq.mul_(0.5)
    for got, want in zip(ours(x, cases[1]), theirs(x, cases[1])):
        assert torch.equal(got, want)
