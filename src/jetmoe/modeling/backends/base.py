"""`Backend`: the operations the model calls, as plain PyTorch operators (the "torch" reference backend).

Every operation here is the obviously correct form, on any device, with autograd. Faster backends subclass
`Backend` and replace what they do faster; what they leave is this.
"""

from __future__ import annotations

import torch

from ...ops import fused
from ...ops.attention import shared_kv_attention_reference
from ...ops.grouped_matmul import grouped_linear_reference, slot_products
from ..routing import RoutingPlan, grouped_to_slots


class Backend:
    name = "torch"

    def supports(self, device: torch.device) -> bool:
        """Whether this backend runs tensors of `device`."""
        return True

    # --- element-wise --------------------------------------------------------------------------------------

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return fused.rms_norm_reference(x, weight, eps)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, heads, D] rotated by cos/sin [B or 1, T, D] (rotate-half)."""
        return fused.rotary_reference(x, cos, sin)

    def silu_glu(self, h: torch.Tensor) -> torch.Tensor:
        """[rows, 2I] = [gate | up] -> silu(gate) * up."""
        return fused.silu_glu_reference(h)

    # --- expert products over a routing plan (rows in the plan's grouped order) ------------------------------

    def expert_linear(self, x: torch.Tensor, weight: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """x [N*k, in] in the plan's grouped order, weight [E, out, in] -> [N*k, out]: row r times its expert's W.T."""
        if plan.in_slot_order:
            return slot_products(x, plan.slot_experts, weight.shape[1], lambda rows, e: rows @ weight[e].T)
        return grouped_linear_reference(x, weight, plan.expert_ends)

    def expert_glu(self, experts, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """silu_glu(experts(x, plan)) for an experts module (`ParallelExperts` or a replacement)."""
        return self.silu_glu(experts(x, plan))

    def expert_combine(self, experts, x: torch.Tensor, plan: RoutingPlan, bias: torch.Tensor) -> torch.Tensor:
        """The experts' outputs for grouped rows x [N*k, in], gate-weighted and summed per token, plus the
        (ungated) bias: [N, out]."""
        return self.combine(experts(x, plan), plan, bias)

    def combine(self, grouped_outputs: torch.Tensor, plan: RoutingPlan, bias: torch.Tensor) -> torch.Tensor:
        return fused.combine_reference(grouped_to_slots(grouped_outputs, plan), plan.gates, bias)

    # --- attention ------------------------------------------------------------------------------------------

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:
        """query [B, Nkv, k, T, D] over shared key/value [B, Nkv, S, D] -> [B, Nkv, k, T, D]; mask None (causal,
        queries the last T positions), boolean "may attend" or additive [B or 1, 1, T, S]."""
        out, _ = shared_kv_attention_reference(query, key, value, mask, scale, dropout_p, training=dropout_p > 0)
        return out

    # --- whole steps, where a backend offers them -------------------------------------------------------------

    def decoder_layer(self, layer, hidden_states, position_embeddings, mask, cache, output_attentions, **kwargs):
        """A decoder layer's forward (output, attention probabilities, router logits), or None: the layer then
        runs its modules, which call the operations above."""
        return None

    def decoder_stack(
        self, layers, hidden_states, position_embeddings, mask, cache, router_logits: bool, norm=None, head=None
    ):
        """All layers of a step: (output, router logits), or None: the model then runs the layers one by one.
        With `norm` (the final norm module) the output is norm(last layer's output), with `head` (the output
        head) as well head(norm(...))."""
        return None

    def __repr__(self) -> str:
        return f"<jetmoe backend {self.name!r}>"
