"""Top-k routing: the router, the routing plan it produces, and the balancing losses over router logits.

A `RoutingPlan` is made once per router call and consumed as is by every step that follows (the MoA map and
reduce, the MoE MLP). It lives on the device: nothing here reads a value back to the host, except for the
few-token plans below (CPU only, where such a read costs microseconds).

Slots: token n's j-th choice is slot `n * k + j` (j = 0 is the highest logit). Sorting the slots by expert
(stable, so ties keep slot order) gives the grouped order every expert kernel works in.

Few-token plans (CPU inference, at most FEW_SLOTS slots: decoding) skip the sort: the rows stay in slot order,
the plan carries each slot's expert as host ints (`slot_experts`, one read of a few values), and each expert
product takes just its own rows: the sort, the grouped-order bookkeeping and the row moves into and out of that
order are ~25 small ops per layer, a measurable part of a batch-1 decode step (docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.dense import Linear
from ..ops.permute import permute_rows, repeat_rows


@dataclass(frozen=True)
class RoutingPlan:
    router_logits: torch.Tensor  # [N, E] fp32, pre-softmax: what `router_logits` outputs report
    expert_ids: torch.Tensor  # [N, k] chosen experts, best first
    gates: torch.Tensor  # [N, k] softmax over the k chosen logits, in the activation dtype
    sorted_slots: torch.Tensor | None  # [N*k] slot ids grouped by expert
    slot_to_grouped: torch.Tensor | None  # [N*k] inverse permutation: the grouped row of each slot
    sorted_tokens: torch.Tensor | None  # [N*k] token id of each grouped slot
    expert_ends: torch.Tensor | None  # [E] int32, end row of each expert's group (cumulative counts)
    # Few-token plans: the expert of every slot, on the host; the rows stay in slot order, and the grouped-order
    # fields above (sorted_slots, slot_to_grouped, sorted_tokens, expert_ends) are None.
    slot_experts: tuple[int, ...] | None = None

    @property
    def in_slot_order(self) -> bool:
        return self.slot_experts is not None

    @property
    def sorted_gates(self) -> torch.Tensor:
        """[N*k] gate of each grouped slot (for kernels that gate in grouped order; the CPU path gates in slot order)."""
        return self.gates.flatten()[self.sorted_slots]

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def num_experts(self) -> int:
        return self.router_logits.shape[1]


# Up to this many slots (tokens x top-k), CPU inference uses a few-token plan; beyond, gathering each expert's
# scattered rows costs more than the sort saves (docs/performance.md).
FEW_SLOTS = 4


def use_few_token_plan(x: torch.Tensor, top_k: int) -> bool:
    """CPU, no autograd, few slots. Under torch.compile only where dynamo captures host reads as symbolic
    ints (`capture_scalar_outputs`, which the engine's compiled decode step turns on); elsewhere the read
    would break the graph, and the sorted plan stays on the device."""
    if torch.compiler.is_compiling() and not torch._dynamo.config.capture_scalar_outputs:
        return False
    return x.device.type == "cpu" and x.shape[0] * top_k <= FEW_SLOTS and not torch.is_grad_enabled()


def make_plan(
    router_logits: torch.Tensor, top_k: int, gate_dtype: torch.dtype, few_tokens: bool = False
) -> RoutingPlan:
    """Pick the top-k experts per token from fp32 logits [N, E] and group the slots by expert (or, with
    `few_tokens`, keep them in slot order and read their experts to the host)."""
    num_experts = router_logits.shape[1]
    top_logits, expert_ids = router_logits.topk(top_k, dim=1)
    gates = torch.softmax(top_logits, dim=1).to(gate_dtype)
    if few_tokens:
        slot_experts = tuple(expert_ids.flatten().tolist())
        if torch.compiler.is_compiling():  # symbolic ints: tell the compiler they index the expert weights
            for expert in slot_experts:
                torch._check(expert >= 0)
                torch._check(expert < num_experts)
        return RoutingPlan(
            router_logits=router_logits,
            expert_ids=expert_ids,
            gates=gates,
            sorted_slots=None,
            slot_to_grouped=None,
            sorted_tokens=None,
            expert_ends=None,
            slot_experts=slot_experts,
        )
    sorted_experts, sorted_slots = expert_ids.flatten().sort(stable=True)
    expert_range = torch.arange(num_experts, device=router_logits.device, dtype=sorted_experts.dtype)
    expert_ends = torch.searchsorted(sorted_experts, expert_range, right=True).to(torch.int32)
    return RoutingPlan(
        router_logits=router_logits,
        expert_ids=expert_ids,
        gates=gates,
        sorted_slots=sorted_slots,
        slot_to_grouped=torch.empty_like(sorted_slots).scatter_(
            0, sorted_slots, torch.arange(sorted_slots.numel(), device=sorted_slots.device)
        ),
        sorted_tokens=sorted_slots // top_k,
        expert_ends=expert_ends,
    )


def tokens_to_grouped(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Token rows [N, H] -> each token's k slots in the plan's grouped order [N*k, H]."""
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


def experts_per_token(module: nn.Module) -> int:
    """Top-k as the routers in `module` hold it (set from config.num_experts_per_tok when they were built): the one
    run-time source, for the model, the balancing loss and training's statistics alike."""
    router = next((m for m in module.modules() if isinstance(m, TopKRouter)), None)
    if router is None:
        raise ValueError(f"{type(module).__name__} holds no router, so it has no experts per token")
    return router.top_k


class TopKRouter(nn.Module):
    """Linear scores over experts (computed in the activation dtype, then upcast), top-k, softmax gates."""

    def __init__(self, input_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.layer = Linear(input_size, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> RoutingPlan:
        """x [N, H] -> plan."""
        return make_plan(self.layer(x).float(), self.top_k, x.dtype, use_few_token_plan(x, self.top_k))


def _row_weights(attention_mask: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor | None:
    """Per-row weights for router rows from a [B, S] padding mask; the rows are the last T of S positions.

    During cached decoding the mask covers past and new tokens ([B, past + T]) while the routers only saw the
    T new ones, so only the mask's last T columns apply.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"the balancing loss needs a 2-D [batch, seq] attention_mask, got shape {tuple(attention_mask.shape)}")
    batch = attention_mask.shape[0]
    if rows % batch:
        raise ValueError(f"router logits have {rows} rows, not a multiple of the attention_mask batch {batch}")
    return attention_mask[:, -(rows // batch) :].reshape(-1).to(device=device, dtype=torch.float32)


def reference_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' formulation: E * sum_e f_e * P_e, statistics pooled over all routers and tokens.

    f_e is the share of (token, choice) assignments that went to expert e, P_e the mean full-softmax
    probability of e; padded tokens (mask 0) do not count.
    """
    assigned, prob_sum, total = reference_balancing_statistics(router_logits, num_experts, top_k, attention_mask)
    return num_experts * torch.sum((assigned / total) * (prob_sum / total))


def reference_balancing_statistics(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    start: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pooled sums the reference loss is made of: (assignments per expert, probability mass per expert,
    counted rows), added to `start` (the sums of earlier routers, e.g. a previous pipeline stage's)."""
    device = router_logits[0].device
    weights = _row_weights(attention_mask, router_logits[0].shape[0], device)
    if start is None:
        start = (torch.zeros(num_experts, device=device), torch.zeros(num_experts, device=device),
                 torch.zeros((), device=device))
    assigned, prob_sum, total = start
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices
        row_w = torch.ones(logits.shape[0], device=device) if weights is None else weights
        assigned = assigned.scatter_add(0, chosen.reshape(-1), row_w.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * row_w[:, None]).sum(0)
        total = total + row_w.sum()
    return assigned, prob_sum, total


def switch_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    z_loss_coef: float = 0.1,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """The original JetMoE objective: per router, a switch balance loss plus the router z-loss, summed (onto
    `start`, the sum of earlier routers, e.g. a previous pipeline stage's).

    balance = E * sum_e normalize(sum_n p_ne) * normalize(count_e); z = mean_n logsumexp(logits_n)^2.
    """
    device = router_logits[0].device
    weights = _row_weights(attention_mask, router_logits[0].shape[0], device)
    total = torch.zeros((), device=device) if start is None else start
    for logits in router_logits:
        logits = logits.float()
        row_w = torch.ones(logits.shape[0], device=device) if weights is None else weights
        probs = torch.softmax(logits, dim=-1)
        chosen = logits.topk(top_k, dim=-1).indices
        counts = torch.zeros(num_experts, device=device).scatter_add(0, chosen.reshape(-1), row_w.repeat_interleave(top_k))
        prob_sum = (probs * row_w[:, None]).sum(0)
        balance = num_experts * torch.sum(prob_sum / prob_sum.sum() * counts / counts.sum())
        z_loss = (torch.logsumexp(logits, dim=-1).square() * row_w).sum() / row_w.sum()
        total = total + balance + z_loss_coef * z_loss
    return total
