"""Grouped expert matmul: rows sorted by expert, each group multiplied by its own weight.

`grouped_linear(x, weight, offsets)` computes, for every expert e, `x[start_e:end_e] @ weight[e].T`, where the
rows of `x` are already grouped by expert and `offsets[e]` is the end row of group e (an int32 cumulative sum
that stays on the device). The result equals a per-expert loop of `F.linear` exactly: each output row is
one dot product per column, in the same precision.

Paths, picked by `grouped_linear`:
- `torch.nn.functional.grouped_mm`: one call for all experts, no host sync (torch.compile fullgraph works),
  forward and backward. Needs 16-byte aligned row strides and a dtype the device's kernel accepts.
- `loop`: a Python loop over `F.linear` on host-known group sizes; the fallback for any other case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GROUPED_MM_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16,),
}


def grouped_linear_reference(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Obviously correct version: split by group size and apply each expert's weight with F.linear."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    outputs = [F.linear(x[start:end], weight[e]) for e, (start, end) in enumerate(zip(starts, ends))]
    return torch.cat(outputs, dim=0)


def _aligned(t: torch.Tensor) -> bool:
    row_bytes = t.shape[-1] * t.element_size()
    return row_bytes % 16 == 0


def can_use_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    if x.dtype not in _GROUPED_MM_DTYPES.get(x.device.type, ()) or weight.dtype != x.dtype:
        return False
    # x is [M, in] and weight [E, out, in]: both the `in` and the `out` row lengths must be 16-byte multiples.
    return _aligned(x) and _aligned(weight) and weight.shape[1] * weight.element_size() % 16 == 0


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [M, in] grouped by expert (group e ends at `offsets[e]`), weight [E, out, in] -> [M, out]."""
    if can_use_grouped_mm(x, weight):
        return F.grouped_mm(x.contiguous(), weight.transpose(1, 2), offs=offsets)
    return grouped_linear_reference(x, weight, offsets)
