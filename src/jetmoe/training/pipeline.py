"""Pipeline parallelism (`--pp N`): decoder layers split into stages over torch.distributed.pipelining, composed
with FSDP2 data parallelism on a 2-D (dp, pp) device mesh.

Layout: processes = dp x pp; process r is pipeline rank r % pp of data-parallel replica r // pp, so a pipeline's
stages are neighbouring ranks (one node when pp <= processes per node) and FSDP2 shards each stage's weights
over the dp processes that hold that stage. With `1f1b` and `gpipe` a process holds one stage; with
`interleaved1f1b` two (stage k on pipeline rank k % pp). Stages are contiguous slices of whole decoder layers,
as even as the count allows; the first also holds the embedding, the last the final norm and the head.

Each process builds the whole model, keeps the parts its stages own and drops the rest (peak host memory is the
whole model per process until then).

Objective. Every stage passes on, next to its hidden states, the router statistics of all layers so far:
the reference loss's pooled sums (assignments and probability mass per expert, rows), the switch objective's
running sum and the z-loss sum (logged). The last stage's loss function turns them into the balancing loss
exactly as the single-process model does over all of its routers, and autograd carries that loss's gradient
back through the probability sums into every stage. The balancing loss is a function of its micro-batch, like
any gradient-accumulation micro-batch (trainer.py averages it over micro-batches), so a pipeline step with
`microbatches` M and batch_size B equals a one-process step with batch_size B / M and grad_accum
grad_accum x M x dp: the same sequences in the same micro-batches (data.step_positions).

Tied embeddings (tie_word_embeddings): the first stage owns the embedding, the last a copy as its head; after
backward their gradients are summed between the two, so both copies take the same AdamW step and stay equal.
The gradient norm counts the tied weight once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..modeling.model import causal_mask
from ..modeling.routing import experts_per_token, reference_balancing_statistics, switch_balancing_loss
from ..ops.attention import additive_inference_mask
from .materialize import canonical_name
from .objective import IGNORE_INDEX, LossTerms, count_targets, micro_batch_loss, shifted_targets

STAGES_PER_RANK = {"1f1b": 1, "gpipe": 1, "interleaved1f1b": 2}


@dataclass(frozen=True)
class Layout:
    pp: int  # pipeline ranks per replica
    dp: int  # data-parallel replicas
    pp_rank: int
    dp_rank: int
    stages_per_rank: int

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    def stages(self) -> list[int]:
        """The stage indices this process holds."""
        return list(range(self.pp_rank, self.num_stages, self.pp))

    def global_rank(self, pp_rank: int, dp_rank: int | None = None) -> int:
        return (self.dp_rank if dp_rank is None else dp_rank) * self.pp + pp_rank


def make_layout(config, world: int, rank: int) -> Layout:
    """The (dp, pp) layout of `world` processes; a clear error for a pp that does not fit."""
    pp = config.pp
    if world % pp:
        raise ValueError(f"pp {pp} does not divide the {world} processes: the process count must be a multiple of "
                         f"pp (processes = pp x data-parallel replicas; e.g. torchrun --nproc_per_node {pp})")
    return Layout(pp=pp, dp=world // pp, pp_rank=rank % pp, dp_rank=rank // pp,
                  stages_per_rank=STAGES_PER_RANK[config.pp_schedule] if pp > 1 else 1)


def data_parallel(config, runtime) -> tuple[int, int]:
    """(replicas, this process's replica): who reads which data. Without pp, every process is a replica."""
    if config.pp == 1:
        return runtime.world, runtime.rank
    layout = make_layout(config, runtime.world, runtime.rank)
    return layout.dp, layout.dp_rank


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer slices, sizes differing by at most one (earlier stages get the extra layers)."""
    if num_stages > num_layers:
        raise ValueError(f"{num_stages} pipeline stages need at least {num_stages} decoder layers, the model has "
                         f"{num_layers}: lower pp (interleaved1f1b puts 2 stages on each pipeline rank)")
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for stage in range(num_stages):
        bounds.append(bounds[-1] + base + (stage < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


class _Stage(nn.Module):
    """One pipeline stage: (embedding,) its decoder layers (, final norm and head). Input: token ids (first
    stage) or (hidden states, router statistics); output: (hidden states or logits, router statistics)."""

    def __init__(self, owner: "PipelineModel", index: int, num_stages: int, layer_ids: range):
        super().__init__()
        self.index, self.first, self.last = index, index == 0, index == num_stages - 1
        self.config = owner.config
        if self.first:
            self.embed_tokens = owner.model.embed_tokens
        self.layers = nn.ModuleList(owner.model.layers[str(i)] for i in layer_ids)
        if self.last:
            self.norm = owner.model.norm
            self.lm_head = owner.lm_head
        self.rotary_emb = owner.model.rotary_emb
        self.first_router = 2 * layer_ids[0]  # routers are numbered layer 0 MoA, layer 0 MoE, layer 1 MoA, ...
        object.__setattr__(self, "owner", owner)  # a back reference, not a submodule

    def forward(self, x: torch.Tensor, stats: torch.Tensor | None = None):
        config = self.config
        if self.first:
            hidden = self.embed_tokens(x)
            stats = torch.zeros(statistics_size(config), device=hidden.device)
        else:
            hidden = x
        cache_position = torch.arange(hidden.shape[1], device=hidden.device)
        position_ids = cache_position.unsqueeze(0)
        mask = causal_mask(config, hidden, None, None, position_ids, cache_position)  # as JetMoeModel.forward
        if (config._attn_implementation or "sdpa") == "sdpa":
            mask = additive_inference_mask(mask, hidden.dtype)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        router_logits = []
        for layer in self.layers:
            hidden, _, logits = layer(hidden, position_embeddings, attention_mask=mask, cache=None,
                                      output_attentions=False, position_ids=position_ids)
            router_logits.extend(logits)
        stats = _add_statistics(config, self.owner.top_k, stats, router_logits)
        if torch.is_grad_enabled():
            self.owner._count_routes(self.first_router, router_logits)
        if self.last:
            return self.lm_head(self.norm(hidden)), stats
        return hidden, stats


def statistics_size(config) -> int:
    """[assignments per expert, probability mass per expert, rows, switch objective sum, z-loss sum]."""
    return 2 * config.num_local_experts + 3


def _add_statistics(config, top_k: int, stats: torch.Tensor, router_logits: list[torch.Tensor]) -> torch.Tensor:
    experts = config.num_local_experts
    assigned, prob_sum, rows = stats[:experts], stats[experts:2 * experts], stats[2 * experts]
    switch = stats[2 * experts + 1]
    if config.router_aux_loss_type == "switch":
        switch = switch_balancing_loss(router_logits, experts, top_k, None, z_loss_coef=config.router_z_loss_coef,
                                       start=switch)
    else:  # the counts have no gradient (as in the single-process loss); the probability mass carries it
        assigned, prob_sum, rows = reference_balancing_statistics(
            router_logits, experts, top_k, None, start=(assigned.detach(), prob_sum, rows.detach()))
    with torch.no_grad():
        z = stats[2 * experts + 2].detach()
        for logits in router_logits:
            z = z + torch.logsumexp(logits.float(), dim=-1).square().mean()
    return torch.cat([assigned.detach(), prob_sum, rows.detach()[None], switch.reshape(1), z[None]])


def balancing_loss(config, stats: torch.Tensor) -> torch.Tensor:
    """The balancing loss of all routers from the last stage's statistics (JetMoeForCausalLM.balancing_loss)."""
    experts = config.num_local_experts
    if config.router_aux_loss_type == "switch":
        return stats[2 * experts + 1]
    assigned, prob_sum, rows = stats[:experts].detach(), stats[experts:2 * experts], stats[2 * experts].detach()
    return experts * torch.sum((assigned / rows) * (prob_sum / rows))


class PipelineModel(nn.Module):
    """This process's part of the model, under the Hugging Face parameter names (`model.layers.5...`), plus the
    schedule that trains it. What the trainer calls: train_step, clip_gradients, validate; the checkpoint code:
    full_state_dict, save_pretrained."""

    def __init__(self, full, config, runtime):
        super().__init__()
        self.config = full.config
        self.layout = layout = make_layout(config, runtime.world, runtime.rank)
        self.device = runtime.device
        self.train_config = config
        num_layers = full.config.num_hidden_layers
        slices = split_layers(num_layers, layout.num_stages)
        mine = layout.stages()
        self.owns_first, self.owns_last = 0 in mine, layout.num_stages - 1 in mine
        self.tied = bool(getattr(full.config, "tie_word_embeddings", False))

        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(i): full.model.layers[i] for s in mine for i in slices[s]})
        self.model.rotary_emb = full.model.rotary_emb
        self.top_k = experts_per_token(self.model.layers)
        if self.owns_first:
            self.model.embed_tokens = full.model.embed_tokens
        if self.owns_last:
            self.model.norm = full.model.norm
            self.lm_head = full.lm_head
            if self.tied:  # the first stage's embedding lives on another process: the head gets its own copy
                self.lm_head.weight = nn.Parameter(full.lm_head.weight.detach().clone())
        del full  # the layers this process does not own go once the caller drops the whole model too
        if not any(p.device.type == "meta" for p in self.parameters()):  # a meta model is materialised afterwards
            self.to(self.device)
        self.router_counts = torch.zeros(2 * num_layers, self.config.num_local_experts, dtype=torch.float64)

        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (layout.dp, layout.pp), mesh_dim_names=("dp", "pp"))
        self.pp_group = self.mesh["pp"].get_group()
        stages = [_Stage(self, s, layout.num_stages, slices[s]) for s in mine]
        if layout.dp > 1:
            from torch.distributed.fsdp import fully_shard

            for stage in stages:
                for layer in stage.layers:
                    fully_shard(layer, mesh=self.mesh["dp"])
                fully_shard(stage, mesh=self.mesh["dp"])
        object.__setattr__(self, "stages", stages)  # views over the modules above, not submodules
        self.tied_group = None
        if self.tied:  # every process creates every group, in the same order
            for replica in range(layout.dp):
                group = dist.new_group([layout.global_rank(0, replica), layout.global_rank(layout.pp - 1, replica)])
                if replica == layout.dp_rank:
                    self.tied_group = group
        self._schedule = self._make_schedule(stages, config)
        self._terms: list[tuple[float, float, float]] = []

    def _make_schedule(self, stages, config):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        # The shapes each stage takes and gives, so that the schedule needs no trial forward to learn them.
        rows, length, hidden = config.batch_size // config.microbatches, config.seq_len, self.config.hidden_size
        logits_dtype = torch.bfloat16 if config.bf16 else torch.float32

        def example(*shape, dtype=torch.float32, grad=True):
            return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

        stats = example(statistics_size(self.config))
        activations = (example(rows, length, hidden), stats)
        pipeline_stages = [
            PipelineStage(
                stage, stage.index, self.layout.num_stages, self.device, group=self.pp_group,
                input_args=(example(rows, length, dtype=torch.long, grad=False),) if stage.first else activations,
                output_args=(example(rows, length, self.config.vocab_size, dtype=logits_dtype), stats)
                if stage.last else activations,
            )
            for stage in stages
        ]
        common = dict(n_microbatches=config.microbatches, loss_fn=self._loss, scale_grads=False)
        if config.pp_schedule == "interleaved1f1b":
            return ScheduleInterleaved1F1B(pipeline_stages, **common)
        schedule = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[config.pp_schedule]
        return schedule(pipeline_stages[0], **common)

    @torch.no_grad()
    def _count_routes(self, first_router: int, router_logits: list[torch.Tensor]) -> None:
        top_k = self.top_k
        counts = torch.stack([torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=logits.shape[-1])
                              for logits in router_logits])
        self.router_counts[first_router:first_router + len(router_logits)] += counts.to("cpu", torch.float64)

    def take_router_counts(self) -> torch.Tensor:
        """(token, choice) counts per router and expert since the last call: this process's routers' rows filled,
        the others 0, so summing over all processes gives every router's counts."""
        counts, self.router_counts = self.router_counts, torch.zeros_like(self.router_counts)
        return counts

    def _loss(self, output, labels: torch.Tensor) -> torch.Tensor:
        logits, stats = output
        logits = logits.float()
        targets = shifted_targets(labels)
        ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                 reduction="sum")
        aux = balancing_loss(self.config, stats).float()
        z = stats[-1].detach() / (2 * self.config.num_hidden_layers)
        terms = LossTerms(ce_sum=ce_sum, targets=count_targets(labels), aux=aux, z_loss=z)
        self._terms.append((float(ce_sum.detach()), float(aux.detach()), float(z)))
        micro_batches = self.train_config.grad_accum * self.train_config.microbatches
        return micro_batch_loss(terms, self._global_targets, self._aux_coef, micro_batches, self.layout.dp)

    def train_step(self, micro: list, global_targets: int, aux_coef: float, autocast) -> tuple[float, float, float]:
        """Forward and backward of this replica's micro-batches through the schedule; (CE sum, balancing loss
        sum, z-loss sum) over the pipeline micro-batches (non-zero on the last stage only)."""
        self._global_targets, self._aux_coef, self._terms = global_targets, aux_coef, []
        for ids, labels in micro:
            args = (ids.to(self.device),) if self.owns_first else ()
            target = labels.to(self.device) if self.owns_last else None
            with autocast:
                self._schedule.step(*args, target=target, return_outputs=False)
        expected = len(micro) * self.train_config.microbatches if self.owns_last else 0
        if len(self._terms) != expected:
            raise RuntimeError(f"the pipeline computed {len(self._terms)} micro-batch losses, expected {expected}")
        self._sync_tied_gradients()
        return tuple(math.fsum(t[i] for t in self._terms) for i in range(3))

    def _sync_tied_gradients(self) -> None:
        if self.tied_group is None:
            return
        weight = self.model.embed_tokens.weight if self.owns_first else self.lm_head.weight
        grad = weight.grad
        dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=self.tied_group)

    def clip_gradients(self, max_norm: float) -> float:
        """Clip the gradient norm over the whole model (all stages, all shards; the tied weight once)."""
        params = [p for p in self.parameters() if p.grad is not None]
        head = self.lm_head.weight if self.owns_last and self.tied else None
        square = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in params:
            if p is not head:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                square += grad.double().square().sum()
        dist.all_reduce(square)
        norm = float(square.sqrt())
        limit = max_norm if max_norm > 0 else float("inf")
        scale = min(limit / (norm + 1e-6), 1.0)
        for p in params:
            p.grad.mul_(scale)
        return norm

    @torch.no_grad()
    def validate(self, data, config, runtime, autocast) -> dict | None:
        """Validation loss over the same sequences as without pp: each replica's share goes through its
        pipeline's stages in order (forward only, hidden states sent point to point)."""
        from .metrics import perplexity

        if len(data.val_ids) == 0:
            return None
        layout, ce_sum, targets = self.layout, 0.0, 0
        by_index = {stage.index: stage for stage in self.stages}
        hidden_size = self.config.hidden_size
        for ids, labels in data.val_batches(config.batch_size, config.val_batches, layout.dp_rank, layout.dp):
            x = ids.to(self.device)
            for index in range(layout.num_stages):
                if index not in by_index:
                    continue
                if index > 0 and index - 1 not in by_index:
                    x = torch.empty(ids.shape[0], ids.shape[1], hidden_size, device=self.device)
                    dist.recv(x, src=layout.global_rank((index - 1) % layout.pp))
                stats = None if index == 0 else torch.zeros(statistics_size(self.config), device=self.device)
                with autocast:
                    x, _ = by_index[index](x, stats)
                if index == layout.num_stages - 1:
                    logits = x.float()
                    ce_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    shifted_targets(labels.to(self.device)).reshape(-1),
                                                    ignore_index=IGNORE_INDEX, reduction="sum"))
                    targets += count_targets(labels)
                elif index + 1 not in by_index:
                    x = x.float().contiguous()
                    dist.send(x, dst=layout.global_rank((index + 1) % layout.pp))
        ce_total, target_total = runtime.sum([ce_sum, float(targets)])
        if target_total == 0:
            return None
        mean = ce_total / target_total
        return {"val_loss": mean, "val_ppl": perplexity(mean), "val_tokens": int(target_total)}

    def hf_name(self, name: str) -> str:
        """A parameter's name in the whole HF model (for materialize): the last stage's copy of a tied head is the
        embedding."""
        name = canonical_name(name)
        return "model.embed_tokens.weight" if self.tied and name == "lm_head.weight" else name

    def full_state_dict(self) -> dict:
        """The whole model's weights (Hugging Face names) on rank 0, {} elsewhere (a collective call)."""
        if self.layout.dp > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self, options=StateDictOptions(full_state_dict=True))
        else:
            state = self.state_dict()
        if self.layout.dp_rank != 0:
            return {}
        state = {name: tensor.detach().cpu() for name, tensor in state.items()}
        parts = [None] * self.layout.pp if self.layout.pp_rank == 0 else None
        dist.gather_object(state, parts, dst=self.layout.global_rank(0), group=self.pp_group)
        if self.layout.pp_rank != 0:
            return {}
        return {name: tensor for part in parts for name, tensor in part.items()}

    def save_pretrained(self, folder: str, state_dict: dict) -> None:
        """An HF-format checkpoint of the whole model from its gathered weights (a weightless model writes it)."""
        from .. import JetMoeForCausalLM

        with torch.device("meta"):
            skeleton = JetMoeForCausalLM(self.config)
        skeleton.save_pretrained(folder, state_dict=state_dict)


def parallelize(model, config, runtime) -> PipelineModel:
    """This process's stages of `model` (a whole JetMoeForCausalLM), sharded over its data-parallel replicas."""
    if hasattr(model, "get_base_model"):
        raise ValueError("lora is not supported with pipeline parallelism (pp > 1)")
    return PipelineModel(model, config, runtime)
