"""bf16 on a CPU without bf16 arithmetic (AVX2-only x86-64, Arm without the bf16 extension).

There PyTorch's bf16 matrix products are emulated and run slower than fp32's, so a bf16 product over many rows
(a prompt) runs in fp32 on widened copies of its operands, rounded back to bf16 once: the fp32 sums of the
bf16 products, as a bf16 kernel accumulates them, in another order. Few rows (decoding) stay in bf16, where
reading the weights, not arithmetic, bounds the step and jetmoe's kernels widen bf16 in registers.
"""

from __future__ import annotations

import functools

import torch

from .native import build

# From this many rows a product's arithmetic outweighs widening its weight (docs/performance.md).
UPCAST_MIN_ROWS = 32


@functools.cache
def emulated() -> bool:
    """Whether bf16 arithmetic is emulated on this CPU (read once: oneDNN reads its instruction-set cap once too)."""
    return not build.bf16_arithmetic()


def upcast(x: torch.Tensor, rows: int) -> bool:
    """Whether a bf16 CPU product over `rows` rows of `x` should run in fp32."""
    return rows >= UPCAST_MIN_ROWS and x.dtype == torch.bfloat16 and x.device.type == "cpu" and emulated()
