"""Expert weights and the grouped products over a routing plan."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import fused, grouped_linear, native, slot_linear
from ..ops.permute import permute_rows, repeat_rows
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
        if plan.in_slot_order:
            return slot_linear(grouped_inputs, self.weight, plan.slot_experts)
        return grouped_linear(grouped_inputs, self.weight, plan.expert_ends)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in={self.input_size}, out={self.output_size}"


def tokens_to_grouped(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Token rows [N, H] -> each token's k slots in grouped order [N*k, H]."""
    if plan.in_slot_order:
        return x.repeat_interleave(plan.top_k, dim=0)
    return repeat_rows(x, plan.sorted_tokens, plan.slot_to_grouped, plan.top_k)


def slots_to_grouped(slot_rows: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Slot order [N*k, D] -> grouped order."""
    if plan.in_slot_order:
        return slot_rows
    return permute_rows(slot_rows, plan.sorted_slots, plan.slot_to_grouped)


def grouped_to_slots(grouped_rows: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Grouped order [N*k, D] -> slot order (token-major, best choice first)."""
    if plan.in_slot_order:
        return grouped_rows
    return permute_rows(grouped_rows, plan.slot_to_grouped, plan.sorted_slots)


def combine(grouped_outputs: torch.Tensor, plan: RoutingPlan, bias: torch.Tensor) -> torch.Tensor:
    """Gate-weight grouped expert outputs [N*k, H] and sum each token's k of them, then add the (ungated) bias."""
    if fused.combine_fusable(grouped_outputs, plan.gates, bias):
        return fused.combine(grouped_outputs, None if plan.in_slot_order else plan.slot_to_grouped, plan.gates, bias)
    return fused.combine_reference(grouped_to_slots(grouped_outputs, plan), plan.gates, bias)


# Decoding: a few-token plan's expert product and the step that follows it (the GLU, or the gated sum) in one
# call of jetmoe's C kernels, with the same values as the two steps apart: run apart, the second step began
# right after the product had streamed its weights through the caches and paid to reload its own code and data
# (ops/native/gemv.c, docs/performance.md). Under torch.compile (the engine's compiled decode step) the call is
# one operator.
# Elsewhere (training, sorted plans, fp16, other devices) the two steps run as they are.


def _fused_decode(rows: torch.Tensor, experts: nn.Module, plan: RoutingPlan) -> bool:
    return (
        plan.in_slot_order
        and type(experts) is ParallelExperts  # not a replacement such as the int8 experts
        and not torch.is_grad_enabled()
        and native.gemv_ok(rows, experts.weight)
    )


def experts_silu_glu(experts: ParallelExperts, grouped_inputs: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """silu_glu(experts(grouped_inputs, plan)): [N*k, in] -> [N*k, out / 2]."""
    if _fused_decode(grouped_inputs, experts, plan) and experts.output_size % 64 == 0:  # type first: peft LoRA wraps experts
        return native.gemv_silu_mul(grouped_inputs, experts.weight, native.slot_groups(plan.slot_experts))
    return fused.silu_glu(experts(grouped_inputs, plan))


def experts_combine(
    experts: ParallelExperts, grouped_inputs: torch.Tensor, plan: RoutingPlan, bias: torch.Tensor
) -> torch.Tensor:
    """combine(experts(grouped_inputs, plan), plan, bias): [N*k, in] -> [N, out]."""
    if (
        _fused_decode(grouped_inputs, experts, plan)  # first: a peft LoRA wrapper has no output_size
        and experts.output_size % 16 == 0
        and plan.gates.dtype == bias.dtype == grouped_inputs.dtype
    ):
        groups = native.slot_groups(plan.slot_experts)
        return native.gemv_combine(grouped_inputs, experts.weight, groups, plan.gates, bias)
    return combine(experts(grouped_inputs, plan), plan, bias)
