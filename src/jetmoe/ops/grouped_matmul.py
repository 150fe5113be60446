"""Grouped expert matmul: rows sorted by expert, each group multiplied by its own weight.

`grouped_linear(x, weight, offsets)` computes, for every expert e, `x[start_e:end_e] @ weight[e].T`, where the
rows of `x` are already grouped by expert and `offsets[e]` is the end row of group e (an int32 cumulative sum
that stays on the device). The result equals a per-expert loop of `F.linear` exactly: each output row is
one dot product per column, in the same precision.

Paths, picked per call by `_grouped_linear` (measured on the 2-core Sapphire Rapids CPU, bf16 and fp32: the
single grouped call beat a loop of `F.linear` by 10-25% from 2 to 2048 rows and, at decode sizes, reads
only the experts that received rows; gathering each row's expert weight for a `bmm` cost 4-6x more there):
- `torch.nn.functional.grouped_mm`: one call for all experts, no host sync. Needs 16-byte aligned row
  strides and a dtype the device's kernel accepts.
- `triton` (CUDA, dtypes grouped_mm lacks there, e.g. fp32): the kernels of `ops/triton` in grouped mode.
  For bf16 on an H100 `grouped_mm` measured faster (MoE forward+backward 7.9 ms vs 14.0 ms at 8192
  tokens of the jetmoe-8b shapes; benchmarks/triton_experts.py), so it stays first there.
- `loop`: `F.linear` per expert on host-known group sizes; the fallback for any other case.

Both run inside the custom op `jetmoe::grouped_linear`, whose shape function is all torch.compile sees: a
compiled model traces through it with no graph break and no host sync, whatever path runs underneath (the
fake kernel torch ships for `aten._grouped_mm` accepts bf16 only, so calling it directly would not trace
fp32). Its backward is two more grouped products: dX with the transposed weights, and dW per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GROUPED_MM_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16,),
}


def _row_bytes_aligned(*sizes_and_tensor) -> bool:
    *sizes, t = sizes_and_tensor
    return all(size * t.element_size() % 16 == 0 for size in sizes)


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        hasattr(F, "grouped_mm")
        and a.dtype == b.dtype
        and a.dtype in _GROUPED_MM_DTYPES.get(a.device.type, ())
    )


def _triton_ok(t: torch.Tensor) -> bool:
    if t.device.type != "cuda":
        return False
    from .triton import TRITON_AVAILABLE

    return TRITON_AVAILABLE


def _group_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends))


def grouped_linear_reference(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Obviously correct version: split by group size and apply each expert's weight with F.linear."""
    outputs = [F.linear(x[start:end], weight[e]) for e, (start, end) in enumerate(_group_bounds(offsets))]
    return torch.cat(outputs, dim=0)


def grouped_weight_grad_reference(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dW[e] = grad_out[group e].T @ x[group e], stacked to [E, out, in]."""
    return torch.stack([grad_out[start:end].T @ x[start:end] for start, end in _group_bounds(offsets)])


@torch.library.custom_op("jetmoe::grouped_linear", mutates_args=())
def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out_features, in_features = weight.shape[1], weight.shape[2]
    if _grouped_mm_ok(x, weight) and _row_bytes_aligned(in_features, out_features, x):
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    if _triton_ok(x):
        from .triton import scattered_experts

        return scattered_experts(x, weight, None, offsets, None, grouped_in=True, grouped_out=True)
    return grouped_linear_reference(x, weight, offsets)


@_grouped_linear.register_fake
def _(x, weight, offsets):
    return x.new_empty((x.shape[0], weight.shape[1]))


@torch.library.custom_op("jetmoe::grouped_weight_grad", mutates_args=())
def _grouped_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    grad_out, x = grad_out.contiguous(), x.contiguous()
    if _grouped_mm_ok(grad_out, x) and _row_bytes_aligned(grad_out.shape[1], x.shape[1], x.shape[0], x):
        return F.grouped_mm(grad_out.T, x, offs=offsets)
    if _triton_ok(x):
        from .triton.kernels import Blocks, weight_grad

        shape = torch.Size((offsets.shape[0], grad_out.shape[1], x.shape[1]))
        return weight_grad(grad_out, None, x, None, None, offsets, shape, Blocks())
    return grouped_weight_grad_reference(grad_out, x, offsets)


@_grouped_weight_grad.register_fake
def _(grad_out, x, offsets):
    return x.new_empty((offsets.shape[0], grad_out.shape[1], x.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight, offsets = inputs
    ctx.save_for_backward(x, weight, offsets)


def _backward(ctx, grad_out):
    x, weight, offsets = ctx.saved_tensors
    grad_x = _grouped_linear(grad_out, weight.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    grad_w = _grouped_weight_grad(grad_out, x, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_grouped_linear.register_autograd(_backward, setup_context=_setup_context)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [M, in] grouped by expert (group e ends at `offsets[e]`), weight [E, out, in] -> [M, out]."""
    if torch.is_autocast_enabled(x.device.type):
        # The custom op is opaque to autocast (its backward would mix a bf16 gradient with fp32 weights):
        # cast here, as autocast casts F.linear's operands; the cast is differentiable, so fp32 weights get grads.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    return _grouped_linear(x, weight, offsets)
