"""JetMoeRMSNorm's hand-written backward against autograd through the plain operations."""

from __future__ import annotations

import pytest
import torch

from jetmoe.modeling.norm_rotary import JetMoeRMSNorm


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
