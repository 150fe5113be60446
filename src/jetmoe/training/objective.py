"""The training objective: next-token cross-entropy plus the router balancing loss, each term kept for logging.

The balancing loss is the model's own (`output.aux_loss`, computed by JetMoeForCausalLM from its router logits
with the formulation the config's `router_aux_loss_type` selects: the reference's averaged loss, or the
original JetMoE switch loss + `router_z_loss_coef` x z-loss). For logging, the z-loss part is also measured
on its own here.

Cross-entropy is returned as a *sum* over the micro-batch's target tokens: the trainer divides by the number of
target tokens in the whole global batch (all micro-batches, all processes), so gradient accumulation and data
parallelism give the same gradient as one big batch even when masking makes the counts uneven.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossTerms:
    ce_sum: torch.Tensor  # summed cross-entropy over target tokens (fp32, scalar)
    targets: int  # number of target tokens
    aux: torch.Tensor  # the balancing loss (as the model computes it; 0 without router logits)
    z_loss: torch.Tensor  # router z-loss, mean over routers (logged; inside `aux` only for the switch objective)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts labels[t + 1]; the last position has nothing to predict."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def router_z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """mean_n logsumexp(logits_n)^2, averaged over routers: how large the router logits grow."""
    values = [torch.logsumexp(logits.float(), dim=-1).square().mean() for logits in router_logits]
    return torch.stack(values).mean()


def compute_terms(output, labels: torch.Tensor) -> LossTerms:
    """Loss terms from a JetMoeForCausalLM output (run with output_router_logits=True, without labels)."""
    logits = output.logits.float()
    targets = shifted_targets(labels)
    ce_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    zero = logits.new_zeros(())
    aux = output.aux_loss if output.aux_loss is not None else zero
    with torch.no_grad():
        z = router_z_loss(output.router_logits) if output.router_logits else zero
    return LossTerms(ce_sum=ce_sum, targets=count_targets(labels), aux=aux.float(), z_loss=z)


def micro_batch_loss(terms: LossTerms, global_targets: int, aux_coef: float, micro_batches: int, world: int) -> torch.Tensor:
    """The loss to backpropagate on one micro-batch of one process.

    Global objective = sum(CE) / global_targets + aux_coef * mean over micro-batches of aux. Gradients are
    summed over micro-batches and averaged over the `world` processes (FSDP), hence the factor `world` on CE
    and 1 / micro_batches on aux (the aux mean over all micro-batches of all processes).
    """
    return terms.ce_sum * (world / max(1, global_targets)) + aux_coef * terms.aux / micro_batches
