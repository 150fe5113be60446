"""Plain-torch version of `scattered_experts`, obviously correct and differentiable through autograd.

It gathers rows into grouped order, loops over experts with F.linear, scales by the gates and scatters or
index_adds the rows back: every copy the kernels avoid, done explicitly. It syncs the host (group sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scattered_experts_reference(
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
) -> torch.Tensor:
    rows = x if grouped_in else x[sorted_rows_in]
    ends = expert_ends.tolist()
    starts = [0] + ends[:-1]
    products = torch.cat([F.linear(rows[s:e], weight[i]) for i, (s, e) in enumerate(zip(starts, ends))])
    if gates is not None:
        products = products * gates[:, None].to(products.dtype)
    if out_rows is not None:
        return products.new_zeros(out_rows, products.shape[1]).index_add(0, sorted_rows_out, products)
    if grouped_out:
        return products
    return products.new_empty(products.shape).index_copy(0, sorted_rows_out, products)
