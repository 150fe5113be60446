"""A dense projection that decodes faster on CPU: a few rows go through a matrix-vector kernel.

bf16 or fp32, up to 8 rows (a decoding batch): jetmoe's C kernel (ops/native), which reads the weights once for
all rows at memory speed. Otherwise one bf16/fp16 row goes through `torch.mv`: on the 2-core Sapphire Rapids CPU
it read bf16 weights at 19-26 GB/s where a one-row `F.linear` managed 14-17 GB/s (the [32000, 1024] output
head of the "small" config: 2.5 ms instead of 3.8 ms per decoded token). Everything else (more rows, autograd)
is `F.linear` itself. Under torch.compile the kernel is an operator, and `mv` stays an aten call
(the engine's compile backend keeps it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native

# Up to this many rows (a decoding batch of up to 8), bf16 and fp32 products go through jetmoe's C kernel where
# it builds. In bf16 its cost grows with each row, where oneDNN's (AMX) hardly does, so larger batches take
# F.linear (the [32000, 1024] head alone on the 2-core CPU, kernel vs F.linear: 1 row 1.4 vs 2.4 ms, 4 rows
# 1.6 vs 2.5, 8 rows 2.9 vs 2.5; [32000, 2048]: 1 row 2.7 vs 5.0, 8 rows 6.3 vs 5.1. The engine's batch-8 step
# runs every product through the kernel all the same: the C decoder layers use it, and the two paths agree bit
# for bit).
# fp32 [32000, 1024] (benchmarks/gemv_bandwidth.py --rows 32000 --matrices 8): 1 row 4.3 vs 4.5 ms through
# F.linear (4.7 through torch.mv), 8 rows 5.6 vs 14.8 ms. More fp32 rows stay on F.linear although the kernel
# is faster there too (32 rows 12.6 vs 17.3 ms, 64 rows 20.7 vs 23.6): MKL's products are the reference's, so
# fp32 prompts give transformers' logits bit for bit.
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
    return F.linear(x, weight, bias)


# Many rows through a large bf16 weight (a prompt's logits, [2048, 1024] x [1024, 32000]): oneDNN multiplies
# by the stored [out, in] weight only after reordering it, on every call; by a K x N copy it does not need to.
# On the 2-core CPU: 2048 rows 120 -> 77 ms, 512 rows 28.7 -> 24.0 ms; a [1024, 1024] weight gains nothing.
# So inference with at least KN_COPY_MIN_ROWS rows through a weight of at least KN_COPY_MIN_WEIGHT elements (the output
# head) multiplies by a cached K x N copy: memory for one more copy of that weight (65 MB for a 32000 x 1024
# head in bf16), rebuilt whenever the weight changes (new storage, or an in-place update: its version).
KN_COPY_MIN_ROWS = 512
KN_COPY_MIN_WEIGHT = 1 << 24


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
