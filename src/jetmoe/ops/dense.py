"""A dense projection that decodes faster on CPU: a few rows go through a matrix-vector kernel.

bf16 or fp32, up to DENSE_GEMV_MAX_ROWS rows (a decoding batch): jetmoe's C kernel (ops/native), which reads the
weights once for all rows at memory speed. Otherwise one bf16/fp16 row goes through `torch.mv`, which reads the
weights faster than a one-row `F.linear` (docs/performance.md). Everything else (more rows, autograd)
is `F.linear` itself. Under torch.compile the kernel is an operator, and `mv` stays an aten call
(the engine's compile backend keeps it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_bf16, native

# Up to this many rows (a decoding batch), bf16 and fp32 products go through jetmoe's C kernel where it builds.
# In bf16 its cost grows with each row where oneDNN's (AMX) hardly does, so larger batches take F.linear (the C
# decoder layers use the kernel at batch 8 all the same: both paths agree bit for bit). More fp32 rows stay on
# MKL, the reference's products, so fp32 prompts give transformers' logits bit for bit (docs/performance.md).
DENSE_GEMV_MAX_ROWS = 8


def _one_row_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.dtype == weight.dtype
        and x.numel() == x.shape[-1]
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`. The matrix-vector paths (no bias: F.linear adds it before rounding) also
    accumulate each output in fp32 and round once, so they differ by the order of the additions only."""
    inference = not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    if bias is None and inference and x.numel() <= DENSE_GEMV_MAX_ROWS * x.shape[-1] and native.gemv_ok(x, weight):
        out = native.gemv(x.reshape(-1, x.shape[-1]), weight)
        return out.view(*x.shape[:-1], weight.shape[0])
    if bias is None and _one_row_inference(x, weight):
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    if inference and weight.dtype == x.dtype and cpu_bf16.upcast(x, x.numel() // x.shape[-1]):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


# Many rows through a large bf16 weight (a prompt's logits): oneDNN multiplies by the stored [out, in] weight
# only after reordering it, on every call; by a K x N copy it does not need to (docs/performance.md). So
# inference with at least KN_COPY_MIN_ROWS rows through a weight of at least KN_COPY_MIN_WEIGHT elements (the
# output head) multiplies by a cached K x N copy: memory for one more copy of that weight, rebuilt whenever the
# weight changes (new storage, or an in-place update: its version). Only where the CPU multiplies bf16 in
# hardware: where bf16 is emulated (AVX2), `linear` multiplies prompts in fp32 instead (ops/cpu_bf16.py).
KN_COPY_MIN_ROWS = 512
KN_COPY_MIN_WEIGHT = 1 << 24


def kn_copy_helps() -> bool:
    """Whether bf16 is multiplied in hardware here."""
    return not cpu_bf16.emulated()


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose forward is `linear` above, or, for prompts through
    a large bf16 weight on the CPU, a product with a cached K x N copy of the weight (see above)."""

    _kn_cache: tuple | None = None  # (key of the weight it copies, the copy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            self.bias is None
            and weight.numel() >= KN_COPY_MIN_WEIGHT
            and x.numel() >= KN_COPY_MIN_ROWS * x.shape[-1]
            and x.dtype == weight.dtype == torch.bfloat16
            and x.is_cpu
            and weight.is_cpu
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling()
            and kn_copy_helps()
        ):
            return torch.matmul(x, self._weight_kn())
        return linear(x, weight, self.bias)

    def _weight_kn(self) -> torch.Tensor:
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.shape, weight.dtype)
        if self._kn_cache is None or self._kn_cache[0] != key:
            self._kn_cache = None  # drop the stale copy before making the new one
            self._kn_cache = (key, weight.detach().t().contiguous())
        return self._kn_cache[1]
