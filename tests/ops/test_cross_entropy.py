"""ops/cross_entropy.py against F.cross_entropy on fp32 logits, values and gradients, chunked and not."""

from __future__ import annotations

import pytest
import torch

from jetmoe.ops import cross_entropy
from jetmoe.ops.cross_entropy import summed_cross_entropy, summed_cross_entropy_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [2**23, 3 * 50])  # one chunk; chunks of 3 rows, last one short
def test_summed_cross_entropy_matches_the_fp32_formulation(dtype, chunk_elements, monkeypatch):
    monkeypatch.setattr(cross_entropy, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    logits = (4 * torch.randn(11, 50)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (11,))
    targets[[2, 7]] = -100  # ignored rows: no loss, zero gradient
    upstream = torch.tensor(0.37)

    got = summed_cross_entropy(logits, targets)
    (got * upstream).backward()
    grad = logits.grad.clone()
    logits.grad = None
    want = summed_cross_entropy_reference(logits, targets)
    (want * upstream).backward()

    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, logits.grad, **({} if dtype == torch.float32 else dict(rtol=0, atol=2**-9)))
    assert torch.count_nonzero(grad[[2, 7]]) == 0


def test_all_rows_ignored_gives_zero_and_zero_gradient():
    logits = torch.randn(3, 5, requires_grad=True)
    loss = summed_cross_entropy(logits, torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
