"""Cross-entropy over a large vocabulary without an fp32 copy of the logits kept for backward.

The usual `F.cross_entropy(logits.float(), targets)` makes an fp32 copy of the logits and keeps fp32
log-probabilities of the same size for backward: two fp32 [tokens, vocab] tensors, held from the loss until
backward reaches it, on top of the bf16 logits the caller gets anyway. Here the forward keeps only the logits
and one fp32 log-sum-exp per row, and both passes work through the rows in chunks of _CHUNK_ELEMENTS fp32
values. The per-row arithmetic is the same (fp32 log-sum-exp, softmax minus one-hot),
so the loss equals the plain formulation up to fp32 rounding. On the CPU (fp32 or bf16 logits, a vocabulary
of a multiple of 16), both passes are one C kernel each (ops/native/elementwise.c): a row's log-sum-exp in one
read, and its gradient written straight in the logits' dtype (faster than the operator chains:
docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import chain_gradients
from .native import elementwise as native

_CHUNK_ELEMENTS = 2**23  # fp32 elements per chunk (32 MiB)


def _row_chunks(rows: int, vocab: int):
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def _native_ok(logits: torch.Tensor) -> bool:
    return logits.dim() == 2 and logits.shape[1] % 16 == 0 and logits.stride(1) == 1 and native.fused_ok(logits)


class _SummedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        if _native_ok(logits):
            log_norm = native.logsumexp_rows(logits)
        else:
            log_norm = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
            for start, end in _row_chunks(*logits.shape):
                log_norm[start:end] = torch.logsumexp(logits[start:end].float(), dim=-1)
        target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, safe_targets, valid, log_norm)
        ctx.ignore_index = ignore_index
        return torch.where(valid, log_norm - target_logits, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, safe_targets, valid, log_norm = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph (second derivatives): see ops/fused.py
            targets = torch.where(valid, safe_targets, ctx.ignore_index)
            reference = lambda z: summed_cross_entropy_reference(z, targets, ctx.ignore_index)  # noqa: E731
            return chain_gradients(reference, (logits,), (True,), grad_total)[0], None, None
        row_scale = valid.to(torch.float32) * grad_total
        if _native_ok(logits):
            return native.cross_entropy_backward(logits, log_norm, safe_targets, row_scale), None, None
        grad_logits = torch.empty_like(logits)
        for start, end in _row_chunks(*logits.shape):
            probs = (logits[start:end].float() - log_norm[start:end, None]).exp_()
            rows = torch.arange(end - start, device=logits.device)
            probs[rows, safe_targets[start:end]] -= 1.0
            grad_logits[start:end] = probs.mul_(row_scale[start:end, None])
        return grad_logits, None, None


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum over rows of -log softmax(logits[n])[targets[n]], fp32, rows whose target is ignore_index skipped.

    logits [N, V] in any float dtype, targets [N] integer ids.
    """
    return _SummedCrossEntropy.apply(logits, targets, ignore_index)


def summed_cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
