"""Expert weights and the grouped products over a routing plan."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import grouped_linear
from .routing import RoutingPlan


class ParallelExperts(nn.Module):
    """`num_experts` linear maps stored as one weight [E, out, in] (expert e applies `x @ weight[e].T`)."""

    def __init__(self, num_experts: int, input_size: int, output_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, output_size, input_size))
        self.num_experts = num_experts
        self.input_size = input_size
        self.output_size = output_size

    def forward(self, grouped_inputs: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Rows in the plan's grouped order [N*k, in] -> [N*k, out]."""
        return grouped_linear(grouped_inputs, self.weight, plan.expert_ends)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in={self.input_size}, out={self.output_size}"


def combine(grouped_outputs: torch.Tensor, plan: RoutingPlan, bias: torch.Tensor) -> torch.Tensor:
    """Gate-weight grouped expert outputs [N*k, H] and sum them per token, then add the (ungated) bias."""
    weighted = grouped_outputs * plan.sorted_gates[:, None]
    out = grouped_outputs.new_zeros(plan.num_tokens, grouped_outputs.shape[1])
    return out.index_add(0, plan.sorted_tokens, weighted) + bias
