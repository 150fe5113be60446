"""Direct, loop-by-loop transcriptions of the balancing-loss formulas (reference-semantics.md sections 4 and 7).

Written independently of the library (explicit one-hot counts, per-row weights), to test it against.
Each takes the model's `router_logits` tuple ([N, E] per router) and an optional 0/1 row weight [N].
"""

from __future__ import annotations

import torch


def _chosen_one_hot(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[N, E] count of how many of each token's top-k choices are expert e (0 or 1)."""
    chosen = torch.softmax(logits.double(), dim=-1).topk(top_k, dim=-1).indices
    return torch.nn.functional.one_hot(chosen, logits.shape[-1]).sum(1).double()


def reference_aux_loss(router_logits, num_experts: int, top_k: int, row_weights=None) -> torch.Tensor:
    """Section 4: f_e and P_e pooled over all routers and (weighted) tokens; aux = E * sum_e f_e * P_e."""
    count = torch.zeros(num_experts, dtype=torch.float64)
    prob = torch.zeros(num_experts, dtype=torch.float64)
    total = 0.0
    for logits in router_logits:
        w = torch.ones(logits.shape[0], dtype=torch.float64) if row_weights is None else row_weights.double()
        count += (_chosen_one_hot(logits.detach(), top_k) * w[:, None]).sum(0)  # f has no gradient
        prob += (torch.softmax(logits.double(), dim=-1) * w[:, None]).sum(0)
        total += w.sum()
    return num_experts * ((count / total) * (prob / total)).sum()


def switch_aux_loss(router_logits, num_experts: int, top_k: int, z_loss_coef: float = 0.1, row_weights=None):
    """Section 7 (original JetMoE): per router,
    E * sum_e normalize1(sum_n p_ne) * normalize1(count_e) + z_loss_coef * mean_n(logsumexp(logits_n)^2),
    summed over every router (MoA and MoE of every layer)."""
    total = torch.zeros((), dtype=torch.float64)
    for logits in router_logits:
        logits = logits.double()
        w = torch.ones(logits.shape[0], dtype=torch.float64) if row_weights is None else row_weights.double()
        prob_sum = (torch.softmax(logits, dim=-1) * w[:, None]).sum(0)
        count = (_chosen_one_hot(logits.detach(), top_k) * w[:, None]).sum(0)
        balance = num_experts * ((prob_sum / prob_sum.sum()) * (count / count.sum())).sum()
        z_loss = (torch.logsumexp(logits, dim=-1) ** 2 * w).sum() / w.sum()
        total = total + balance + z_loss_coef * z_loss
    return total
