"""`scattered_experts`: argument checks, and the autograd Function over the kernels in `kernels.py`."""

from __future__ import annotations

import torch

from .kernels import Blocks, block_table, rows_matmul, weight_grad

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def slot_placement(index: torch.Tensor) -> torch.Tensor:
    """For an index [L] that names each of its L / c targets exactly c times: a permutation p of [0, L) with
    p[i] // c == index[i]. Writing row i to p[i] of an [L] buffer viewed as [targets, c] lines up every
    target's c contributions so that a sum over c reduces them, deterministically (no atomics). Ties keep the
    grouped order (stable sort), so the sum adds each target's rows in the order an index_add would.
    """
    order = torch.argsort(index, stable=True)
    placement = torch.empty_like(order)
    placement[order] = torch.arange(index.shape[0], device=index.device)
    return placement


def _reduced_write(num_rows: int, targets: int, width: int, like: torch.Tensor):
    """Output buffer for rows that sum onto `targets` rows: fp32 [L, width] when rows collide, else [targets, width]."""
    if num_rows == targets:
        return torch.empty(targets, width, device=like.device, dtype=like.dtype), False
    return torch.empty(num_rows, width, device=like.device, dtype=torch.float32), True


class _ScatteredExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gates, in_index, out_index, expert_ends, out_rows, num_rows, blocks):
        table = block_table(expert_ends, num_rows, blocks.m)
        width = weight.shape[1]
        if out_rows is None:  # grouped, or scattered to a permutation of the L rows
            y = torch.empty(num_rows, width, device=x.device, dtype=x.dtype)
            rows_matmul(x, weight, True, table, num_rows, in_index, y, out_index, gates, blocks)
        else:
            buffer, collides = _reduced_write(num_rows, out_rows, width, x)
            write_index = slot_placement(out_index) if collides else out_index
            rows_matmul(x, weight, True, table, num_rows, in_index, buffer, write_index, gates, blocks)
            y = buffer.view(out_rows, num_rows // out_rows, width).sum(1).to(x.dtype) if collides else buffer
        ctx.save_for_backward(x, weight, gates, in_index, out_index, expert_ends, table)
        ctx.num_rows, ctx.blocks = num_rows, blocks
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, gates, in_index, out_index, expert_ends, table = ctx.saved_tensors
        need_x, need_w, need_g = ctx.needs_input_grad[:3]
        num_rows, blocks = ctx.num_rows, ctx.blocks
        dx = dw = dgates = None
        # Row i's output went to out_index[i] (a token when reducing), so its gradient is read from there.
        if need_x or need_g:
            if in_index is None:
                dx, collides = torch.empty_like(x), False
            else:
                dx, collides = _reduced_write(num_rows, x.shape[0], x.shape[1], x)
            write_index = slot_placement(in_index) if collides else in_index
            partial = rows_matmul(
                dy, weight, False, table, num_rows, out_index, dx, write_index, gates, blocks,
                dgate_source=x if need_g else None, dgate_rows=in_index,
            )
            if collides:  # rows of x were read several times (tokens, once per choice): sum their gradients
                dx = dx.view(x.shape[0], num_rows // x.shape[0], x.shape[1]).sum(1).to(x.dtype)
            if need_g:
                dgates = partial.sum(0).to(gates.dtype)
        if need_w:
            dw = weight_grad(dy, out_index, x, in_index, gates, expert_ends, weight.shape, blocks)
        return dx if need_x else None, dw, dgates, None, None, None, None, None, None


def _check_index(name: str, index: torch.Tensor | None, length: int | None, device: torch.device) -> torch.Tensor:
    if index is None:
        raise ValueError(f"{name} is required when its side is scattered (not grouped)")
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {index.dtype} of shape {tuple(index.shape)}")
    if length is not None and index.shape[0] != length:
        raise ValueError(f"{name} has {index.shape[0]} rows, expected {length} (one per grouped row)")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device}, x on {device}")
    return index.contiguous()


def scattered_experts(
    x: torch.Tensor,
    weight: torch.Tensor,
    sorted_rows_in: torch.Tensor | None,
    expert_ends: torch.Tensor,
    sorted_rows_out: torch.Tensor | None,
    *,
    grouped_in: bool,
    grouped_out: bool,
    gates: torch.Tensor | None = None,
    out_rows: int | None = None,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """See the package docstring (`jetmoe.ops.triton`) for the semantics and the MoE/MoA call patterns."""
    if x.dim() != 2 or weight.dim() != 3:
        raise ValueError(f"x must be [rows, in] and weight [E, out, in], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[2]:
        raise ValueError(f"x has {x.shape[1]} features but weight expects {weight.shape[2]} (weight is [E, out, in])")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one of {_DTYPES}, got {x.dtype} and {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if expert_ends.dim() != 1 or expert_ends.shape[0] != weight.shape[0] or expert_ends.dtype.is_floating_point:
        raise ValueError(
            f"expert_ends must be 1-D integer [E={weight.shape[0]}], got {expert_ends.dtype} {tuple(expert_ends.shape)}"
        )
    if expert_ends.device != x.device:
        raise ValueError(f"expert_ends is on {expert_ends.device}, x on {x.device}")

    if grouped_in:
        num_rows, in_index = x.shape[0], None
    else:
        in_index = _check_index("sorted_rows_in", sorted_rows_in, None, x.device)
        num_rows = in_index.shape[0]
        if x.shape[0] == 0 or num_rows % x.shape[0]:
            raise ValueError(
                f"sorted_rows_in has {num_rows} rows, not a multiple of x's {x.shape[0]}: every row of x must be "
                "read the same number of times (tokens k times, slots once)"
            )
    out_index = None if grouped_out else _check_index("sorted_rows_out", sorted_rows_out, num_rows, x.device)
    if out_rows is not None:
        if grouped_out:
            raise ValueError("out_rows (a reduction onto out_rows rows) needs grouped_out=False and sorted_rows_out")
        if out_rows <= 0 or num_rows % out_rows:
            raise ValueError(f"out_rows={out_rows} must be positive and divide the {num_rows} grouped rows")
    if gates is not None:
        if gates.shape != (num_rows,) or not gates.dtype.is_floating_point:
            raise ValueError(f"gates must be floating [{num_rows}] (grouped order), got {gates.dtype} {tuple(gates.shape)}")
        if gates.device != x.device:
            raise ValueError(f"gates is on {gates.device}, x on {x.device}")
        gates = gates.contiguous()

    return _ScatteredExperts.apply(
        x, weight, gates, in_index, out_index, expert_ends.to(torch.int32).contiguous(), out_rows, num_rows,
        blocks or Blocks(),
    )
