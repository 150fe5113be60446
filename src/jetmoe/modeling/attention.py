"""Mixture of attention heads (MoA): per-token expert query/output projections over shared K/V.

Flow for x [B, T, H]:
  route   -> plan (once)
  map     -> every (token, choice) slot gets Nkv query heads from its expert's Wq
  attend  -> each slot's heads attend over the layer's shared K/V heads (dense kv_proj, RoPE, cache)
  reduce  -> each slot's attention output goes through its expert's Wo, gate-weighted, summed, plus bias
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..ops.attention import shared_kv_attention_reference
from ..ops.dense import Linear
from .backends import backend_for
from .experts import ParallelExperts, experts_combine
from .routing import RoutingPlan, TopKRouter, grouped_to_slots, slots_to_grouped, tokens_to_grouped


class JetMoeMoA(nn.Module):
    """The attention experts: router, per-expert query (input_linear) and output (output_linear) projections."""

    def __init__(self, config):
        super().__init__()
        hidden, head_width = config.hidden_size, config.num_key_value_heads * config.kv_channels
        self.router = TopKRouter(hidden, config.num_local_experts, config.num_experts_per_tok)
        self.input_linear = ParallelExperts(config.num_local_experts, hidden, head_width)
        self.output_linear = ParallelExperts(config.num_local_experts, head_width, hidden)
        self.bias = nn.Parameter(torch.empty(hidden))

    def map(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """x [N, H] -> queries per slot [N*k, Nkv*D] (slot order: token-major, best choice first)."""
        return grouped_to_slots(self.input_linear(tokens_to_grouped(x, plan), plan), plan)

    def reduce(self, slot_outputs: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Attention outputs per slot [N*k, Nkv*D] -> [N, H]."""
        return experts_combine(self.output_linear, slots_to_grouped(slot_outputs, plan), plan, self.bias)


class JetMoeAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.kv_channels
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.experts = JetMoeMoA(config)
        self.kv_proj = Linear(config.hidden_size, 2 * config.num_key_value_heads * config.kv_channels, bias=False)

    @property
    def top_k(self) -> int:
        """Experts per token: the router's (from config.num_experts_per_tok), the one source."""
        return self.experts.router.top_k

    @property
    def num_key_value_groups(self) -> int:
        """For attention functions from transformers' registry: queries are passed kv-head-major, so the usual
        grouped-query convention (query head i reads kv head i // groups) is the right one."""
        return self.top_k

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """[B, T, H] -> (output [B, T, H], attention probabilities or None, router logits [B*T, E])."""
        batch, length, hidden = hidden_states.shape
        k, kv_heads, head_dim = self.top_k, self.num_key_value_heads, self.head_dim
        x = hidden_states.reshape(-1, hidden)
        plan = self.experts.router(x)

        ops = backend_for(x)
        cos, sin = position_embeddings  # [B or 1, T, D]
        query = ops.rotary(self.experts.map(x, plan).view(batch, length, k * kv_heads, head_dim), cos, sin)
        query = query.view(batch, length, k, kv_heads, head_dim)
        key, value = self.kv_proj(hidden_states).view(batch, length, 2, kv_heads, head_dim).unbind(2)
        key, value = ops.rotary(key, cos, sin).transpose(1, 2), value.transpose(1, 2)  # [B, Nkv, T, D]
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        query = query.permute(0, 3, 2, 1, 4)  # [B, Nkv, k, T, D]: kv-head-major
        out, probs = self._attend(query, key, value, attention_mask, output_attentions, **kwargs)
        slot_outputs = out.permute(0, 3, 2, 1, 4).reshape(batch * length * k, kv_heads * head_dim)
        output = self.experts.reduce(slot_outputs, plan).view(batch, length, hidden)
        return output, probs, plan.router_logits

    def _attend(self, query, key, value, attention_mask, output_attentions, **kwargs):
        dropout = self.attention_dropout if self.training else 0.0
        implementation = self.config._attn_implementation or "sdpa"
        batch, _, _, length, _ = query.shape
        ours = output_attentions or implementation in ("eager", "sdpa")
        if attention_mask is None and 1 < length < key.shape[2] and ours:
            # transformers' mask builders give None for a prompt into an empty static cache: SDPA's is_causal,
            # aligned top-left (query i sees keys 0..i; the slots after the prompt are empty). Our kernels read
            # None as the last `length` of the keys, so that mask is spelled out.
            positions = torch.arange(key.shape[2], device=key.device)
            attention_mask = (positions[:length, None] >= positions[None, :]).expand(batch, 1, length, -1)
        if output_attentions or implementation == "eager":
            return shared_kv_attention_reference(
                query, key, value, attention_mask, self.scaling, dropout_p=dropout, training=self.training
            )
        if implementation == "sdpa":
            return backend_for(query).attention(query, key, value, attention_mask, self.scaling, dropout), None
        batch, kv_heads, k, length, head_dim = query.shape
        attention = ALL_ATTENTION_FUNCTIONS[implementation]
        out, _ = attention(
            self,
            query.reshape(batch, kv_heads * k, length, head_dim),
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
            **kwargs,
        )  # [B, T, Nkv*k, D]
        return out.view(batch, length, kv_heads, k, head_dim).permute(0, 2, 3, 1, 4), None
