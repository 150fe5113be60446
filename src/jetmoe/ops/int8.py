"""int8 weight-only products: a float activation times int8 weights with one scale per output row, on the
fastest path for the row count (jetmoe's C kernel, aten's int8 kernel, or bf16 after conversion), and the
grouped form over the experts of a routing plan (a custom op for torch.compile)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native

# aten's int8 kernel is a matrix-vector design: fast for a few rows, but by a few dozen rows slower than converting
# the int8 weights to bf16 for the bf16 matmul (docs/performance.md). Prompts (prefill) take the second way.
INT8_ATEN_MAX_ROWS = 24


# jetmoe's kernel reads the weights once for all rows and takes them four at a time against each block of
# weights: up to this many rows a weight it beats converting the weights to bf16 for a matmul
# (docs/performance.md).
INT8_GEMV_MAX_ROWS = 64
_CPU_KERNEL_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, in] @ dequant(q [out, in], scale [out]).T -> [M, out] in x's dtype."""
    if x.shape[0] <= INT8_GEMV_MAX_ROWS and native.int8_ok(x, q, scale):
        return native.int8_gemv(x, q, scale)
    if (
        x.device.type == "cpu"
        and x.dtype in _CPU_KERNEL_DTYPES
        and q.shape[1] % 16 == 0
        and x.shape[0] <= INT8_ATEN_MAX_ROWS
    ):
        # The CPU kernel wants the scales in the activation dtype and needs `in` a multiple of 16 (it
        # crashes on other widths in bf16).
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scale.to(x.dtype))
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


def int8_grouped_linear_impl(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """Rows of x grouped by expert (group e ends at ends[e]) times expert e's int8 weight q[e] [out, in]."""
    # Group sizes on the host: on CPU that read is cheap, and only experts with rows cost anything.
    ends = ends.tolist()
    if max(b - a for a, b in zip([0, *ends], ends)) <= INT8_GEMV_MAX_ROWS and native.int8_ok(x, q, scale):
        return native.int8_gemv(x, q, scale, native.ends_groups(ends))  # batched decoding: one call
    outputs, start = [], 0
    for expert, end in enumerate(ends):
        if end > start:
            outputs.append(int8_matmul(x[start:end], q[expert], scale[expert]))
        start = end
    if not outputs:
        return x.new_zeros(0, q.shape[1])
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


@torch.library.custom_op("jetmoe::int8_grouped_linear", mutates_args=())
def int8_grouped_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """For torch.compile: an op whose shape function is all the compiler sees (no host read in the graph)."""
    return int8_grouped_linear_impl(x, q, scale, ends)


@int8_grouped_linear.register_fake
def _(x, q, scale, ends):
    return x.new_empty((x.shape[0], q.shape[1]))
