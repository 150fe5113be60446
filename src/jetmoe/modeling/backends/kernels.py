"""The fast backends: "cpu" (jetmoe's C kernels, oneDNN and MKL) and "cuda" (Triton and grouped_mm).

Both call the kernels of `ops`, each of which picks its implementation for the device, dtype and row count
(docs/performance.md). The CPU backend adds what only it has: the decoding steps of a whole layer, or of every
layer, as C calls (cpu_decode.py), and expert products fused with the step after them while decoding.
"""

from __future__ import annotations

import torch

from ...ops import fused, grouped_linear, native, slot_linear
from ...ops.attention import shared_kv_attention
from ..experts import ParallelExperts
from ..routing import RoutingPlan, grouped_to_slots
from . import cpu_decode
from .base import Backend


class KernelBackend(Backend):
    """The operations through `ops`: fused element-wise passes, grouped expert products, SDPA over shared K/V."""

    def rms_norm(self, x, weight, eps):
        return fused.rms_norm(x, weight, eps)

    def rotary(self, x, cos, sin):
        return fused.rotary(x, cos, sin)

    def silu_glu(self, h):
        return fused.silu_glu(h)

    def expert_linear(self, x: torch.Tensor, weight: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        if plan.in_slot_order:
            return slot_linear(x, weight, plan.slot_experts)
        return grouped_linear(x, weight, plan.expert_ends)

    def combine(self, grouped_outputs, plan, bias):
        if fused.combine_fusable(grouped_outputs, plan.gates, bias):
            slot_rows = None if plan.in_slot_order else plan.slot_to_grouped
            return fused.combine(grouped_outputs, slot_rows, plan.gates, bias)
        return fused.combine_reference(grouped_to_slots(grouped_outputs, plan), plan.gates, bias)

    def attention(self, query, key, value, mask, scale, dropout_p=0.0):
        return shared_kv_attention(query, key, value, mask, scale, dropout_p=dropout_p)


class CudaBackend(KernelBackend):
    name = "cuda"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"


class CpuBackend(KernelBackend):
    name = "cpu"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    # Decoding: a few-token plan's expert product and the step after it (the GLU, or the gated sum) as one C
    # call, with the same values as the two apart (ops/native/gemv.c); elsewhere the two steps run as they are.

    def expert_glu(self, experts, x, plan):
        if _fused_decode(x, experts, plan) and experts.output_size % 64 == 0:  # type first: wrappers lack sizes
            return native.gemv_silu_mul(x, experts.weight, native.slot_groups(plan.slot_experts))
        return self.silu_glu(experts(x, plan))

    def expert_combine(self, experts, x, plan, bias):
        if (
            _fused_decode(x, experts, plan)
            and experts.output_size % 16 == 0
            and plan.gates.dtype == bias.dtype == x.dtype
        ):
            groups = native.slot_groups(plan.slot_experts)
            return native.gemv_combine(x, experts.weight, groups, plan.gates, bias)
        return self.combine(experts(x, plan), plan, bias)

    def decoder_layer(self, layer, hidden_states, position_embeddings, mask, cache, output_attentions, **kwargs):
        prepared = cpu_decode.applicable(layer, hidden_states, output_attentions)
        if prepared is None:
            return None
        return cpu_decode.layer_forward(layer, prepared, hidden_states, position_embeddings, mask, cache, **kwargs)

    def decoder_stack(
        self, layers, hidden_states, position_embeddings, mask, cache, router_logits, norm=None, head=None
    ):
        return cpu_decode.layers_forward(
            layers, hidden_states, position_embeddings, mask, cache, router_logits, norm, head
        )


def _fused_decode(rows: torch.Tensor, experts, plan: RoutingPlan) -> bool:
    return (
        plan.in_slot_order
        and type(experts) is ParallelExperts  # not a replacement such as the int8 experts
        and not torch.is_grad_enabled()
        and native.gemv_ok(rows, experts.weight)
    )
