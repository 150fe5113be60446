"""Expert weights, and the products over a routing plan that the MoA and the MoE share."""

from __future__ import annotations

import torch
from torch import nn

from .backends import backend_for
from .routing import RoutingPlan, grouped_to_slots, slots_to_grouped, tokens_to_grouped  # noqa: F401 (re-exported)


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
        return backend_for(grouped_inputs).expert_linear(grouped_inputs, self.weight, plan)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in={self.input_size}, out={self.output_size}"


def combine(grouped_outputs: torch.Tensor, plan: RoutingPlan, bias: torch.Tensor) -> torch.Tensor:
    """Gate-weight grouped expert outputs [N*k, H] and sum each token's k of them, then add the (ungated) bias."""
    return backend_for(grouped_outputs).combine(grouped_outputs, plan, bias)


def experts_silu_glu(experts: nn.Module, grouped_inputs: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """silu_glu(experts(grouped_inputs, plan)): [N*k, in] -> [N*k, out / 2]."""
    return backend_for(grouped_inputs).expert_glu(experts, grouped_inputs, plan)


def experts_combine(
    experts: nn.Module, grouped_inputs: torch.Tensor, plan: RoutingPlan, bias: torch.Tensor
) -> torch.Tensor:
    """combine(experts(grouped_inputs, plan), plan, bias): [N*k, in] -> [N, out]."""
    return backend_for(grouped_inputs).expert_combine(experts, grouped_inputs, plan, bias)
