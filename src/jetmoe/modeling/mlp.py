"""Mixture of GLU MLP experts: route, up+gate projection, activation, down projection, gated sum."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .backends import backend_for
from .experts import ParallelExperts, experts_combine, experts_silu_glu
from .routing import tokens_to_grouped
from .routing import TopKRouter


class JetMoeMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.router = TopKRouter(hidden, config.num_local_experts, config.num_experts_per_tok)
        # input_linear rows [0:I] feed the activation (gate), rows [I:2I] are the linear "up" half.
        self.input_linear = ParallelExperts(config.num_local_experts, hidden, 2 * inner)
        self.output_linear = ParallelExperts(config.num_local_experts, inner, hidden)
        self.activation = ACT2FN[config.activation_function]
        self.silu = config.activation_function in ("silu", "swish")
        self.bias = nn.Parameter(torch.empty(hidden))

    def glu(self, h: torch.Tensor) -> torch.Tensor:
        """[rows, 2I] = [gate | up] -> activation(gate) * up."""
        if self.silu:
            return backend_for(h).silu_glu(h)
        gate, up = h.chunk(2, dim=-1)
        return self.activation(gate) * up

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, H] -> ([B, T, H], router logits [B*T, E])."""
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        plan = self.router(x)
        grouped = tokens_to_grouped(x, plan)
        if self.silu:
            activated = experts_silu_glu(self.input_linear, grouped, plan)
        else:
            activated = self.glu(self.input_linear(grouped, plan))
        out = experts_combine(self.output_linear, activated, plan, self.bias)
        return out.view_as(hidden_states), plan.router_logits
