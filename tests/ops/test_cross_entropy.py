"""ops/cross_entropy.py against F.cross_entropy on fp32 logits, values and gradients, chunked and not."""

from __future__ import annotations

import pytest
import torch

from jetmoe.ops import cross_entropy, native
from jetmoe.ops.cross_entropy import summed_cross_entropy, summed_cross_entropy_reference
from jetmoe.ops.native import elementwise

requires_native = pytest.mark.skipif(native.load() is None, reason="no C compiler or no AVX-512 VNNI/BF16 here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "vocab, chunk_elements",
    [(50, 2**23), (50, 3 * 50), (160, 2**23)],  # one chunk; chunks of 3 rows, the last short; the C kernels
)
def test_summed_cross_entropy_matches_the_fp32_formulation(dtype, vocab, chunk_elements, monkeypatch):
    """(A vocabulary of a multiple of 16 on a CPU with the kernels takes the C path, 50 the operator chains.)"""
    monkeypatch.setattr(cross_entropy, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    logits = (4 * torch.randn(11, vocab)).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (11,))
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


@requires_native
def test_the_c_path_runs_and_handles_non_finite_rows(monkeypatch):
    ran = []
    for name in ("logsumexp_rows", "cross_entropy_backward"):
        kernel = getattr(elementwise, name)
        monkeypatch.setattr(elementwise, name, lambda *a, _k=kernel, _n=name: (ran.append(_n), _k(*a))[1])
    logits = torch.randn(4, 32).requires_grad_()
    summed_cross_entropy(logits, torch.tensor([1, 2, 3, 4])).backward()
    assert ran == ["logsumexp_rows", "cross_entropy_backward"]
    rows = torch.tensor([[float("-inf")] * 16, [float("inf")] + [0.0] * 15, [float("nan")] + [0.0] * 15])
    assert torch.equal(elementwise.logsumexp_rows(rows).isnan(), torch.tensor([False, False, True]))
    assert elementwise.logsumexp_rows(rows)[:2].tolist() == [float("-inf"), float("inf")]
    with pytest.raises(ValueError, match="targets must lie"):
        elementwise.cross_entropy_backward(torch.randn(2, 16), torch.zeros(2), torch.tensor([0, 16]), torch.ones(2))
    with pytest.raises(ValueError, match="logits"):
        elementwise.logsumexp_rows(torch.randn(2, 20))
