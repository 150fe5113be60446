"""Expert parallelism (`--ep N`): the MoA and MoE experts sharded over groups of N processes.

Layout (ep inside data parallelism, as torchtitan does): the W processes form a 2-D mesh
(`dp_mod_ep` = W/N, `ep` = N); rank r holds experts [j*E/N, (j+1)*E/N) of every expert module, j = r % N.
Every process still trains on its own data (global batch = batch_size x grad_accum x W); the dense parameters
are FSDP2-sharded over all W processes, each expert weight is a DTensor sharded over `ep` and FSDP2-sharded
over `dp_mod_ep` (the processes holding the same experts), whose reduce-scatter sums their gradients.

Routing stays on the token's home process (router statistics and the balancing loss are unchanged). An expert
product sends each grouped row to the process holding its expert (`all_to_all_single`, counts exchanged
first), runs the local grouped product there and sends the results back in the original grouped order, so
the model code only sees a module with `ParallelExperts`' forward(grouped_inputs, plan).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from ..modeling.experts import ParallelExperts
from ..ops import grouped_linear
from ..modeling.routing import RoutingPlan


def check_layout(ep: int, world: int, num_experts: int) -> None:
    """A clear error for an expert-parallel layout that cannot be built."""
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ValueError(f"ep must be a positive integer, got {ep!r}")
    if ep == 1:
        return
    if num_experts % ep:
        raise ValueError(f"ep {ep} does not divide num_local_experts {num_experts}: each process must hold the "
                         "same number of experts")
    if world % ep:
        raise ValueError(f"ep {ep} does not divide the number of processes {world}: launch a multiple of {ep} "
                         "processes with torchrun, or pick an ep that divides it")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with explicit split sizes; its backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = rows.new_empty((sum(out_splits), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def _expert_major(counts: torch.Tensor) -> torch.Tensor:
    """Received rows come source-major ([ep, L] blocks of `counts` rows): the row order that groups them by
    local expert instead (expert l's rows from every source, sources in order)."""
    flat = counts.flatten()
    starts = (flat.cumsum(0) - flat).view_as(counts).t().flatten()  # each block's start, in expert-major order
    lengths = counts.t().flatten()
    total = int(lengths.sum())
    block_start_out = lengths.cumsum(0) - lengths
    return torch.repeat_interleave(starts - block_start_out, lengths, output_size=total) + torch.arange(total)


class ExpertParallelExperts(nn.Module):
    """`ParallelExperts` with its experts sharded over the `ep` processes of a mesh dimension.

    `weight` keeps its name and full shape [E, out, in] as a DTensor (Shard(0) over ep), so state dicts,
    checkpoints and exports hold every expert under the usual key."""

    def __init__(self, experts: ParallelExperts, ep_mesh):
        from torch.distributed.tensor import Shard, distribute_tensor

        super().__init__()
        self.num_experts, self.input_size = experts.num_experts, experts.input_size
        self.output_size = experts.output_size
        self.ep = ep_mesh.size()
        self.group = ep_mesh.get_group()
        # Every process holds the same full weight (or a meta one): each keeps its slice, nothing is sent.
        local = distribute_tensor(experts.weight.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
        self.weight = nn.Parameter(local, requires_grad=experts.weight.requires_grad)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in={self.input_size}, out={self.output_size}, ep={self.ep}"

    def forward(self, grouped_inputs: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Rows in the plan's grouped order [N*k, in] -> [N*k, out], each through its expert wherever it lives."""
        if plan.in_slot_order:  # a few-token plan (CPU inference): group its rows here
            experts = torch.tensor(plan.slot_experts, device=grouped_inputs.device)
            sorted_experts, order = experts.sort(stable=True)
            ends = torch.searchsorted(sorted_experts, torch.arange(self.num_experts, device=experts.device), right=True)
            out = self._dispatch(grouped_inputs[order], ends)
            return torch.empty_like(out).index_copy(0, order, out)
        return self._dispatch(grouped_inputs, plan.expert_ends)

    def _dispatch(self, rows: torch.Tensor, expert_ends: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        local_weight = weight.to_local() if hasattr(weight, "to_local") else weight
        local = self.num_experts // self.ep
        ends = expert_ends.to(torch.int64)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))  # rows per expert, [E]
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)  # [ep sources, L local experts]
        received_counts = received_counts.view(self.ep, local)
        send = counts.view(self.ep, local).sum(1).tolist()
        receive = received_counts.sum(1).tolist()
        received = _AllToAll.apply(rows, receive, send, self.group)
        order = _expert_major(received_counts.cpu()).to(rows.device)
        local_ends = received_counts.sum(0).cumsum(0).to(torch.int32)
        products = grouped_linear(received[order], local_weight, local_ends)
        products = torch.empty_like(products).index_copy(0, order, products)  # back to source-major
        return _AllToAll.apply(products, send, receive, self.group)


def expert_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every ParallelExperts in the model (MoA and MoE input/output projections)."""
    return [(parent, name) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is ParallelExperts]


def build_meshes(device_type: str, world: int, ep: int):
    """(the whole world's 1-D mesh for the dense parameters, the 2-D (dp_mod_ep, ep) mesh for the experts)."""
    from torch.distributed.device_mesh import init_device_mesh

    expert_mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("dp_mod_ep", "ep"))
    return init_device_mesh(device_type, (world,)), expert_mesh


def shard_expert_parallel(model: nn.Module, device: torch.device, world: int, ep: int,
                          decoder_layers: list[nn.Module]) -> nn.Module:
    """Swap every ParallelExperts for its ep-sharded sibling, FSDP2 the experts over dp_mod_ep, the rest over all."""
    from torch.distributed.fsdp import fully_shard

    dense_mesh, expert_mesh = build_meshes(device.type, world, ep)
    # Gathering the experts whole for a checkpoint takes two all-gathers (strided shards), which torch warns
    # about once per process; it is the expected cost of a save, not a misconfiguration.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    if not any(p.device.type == "meta" for p in model.parameters()):  # a meta model is materialised afterwards
        model.to(device)
    swapped = []
    for parent, name in expert_modules(model):
        module = ExpertParallelExperts(getattr(parent, name), expert_mesh["ep"])
        setattr(parent, name, module)
        swapped.append(module)
    for module in swapped:
        fully_shard(module, mesh=expert_mesh["dp_mod_ep"])
        # Each process's loss carries a factor W (objective.micro_batch_loss, for FSDP's mean over W): the
        # expert gradients summed over the W/ep processes holding the same experts are divided by W too.
        module.set_gradient_divide_factor(float(world))
        if device.type != "cuda" and world > ep:
            # gloo has no pre-multiplied sum: sum, then divide. Not with one holder per expert set (world == ep),
            # where torch 2.13's FSDP2 would divide twice (its copy for a group of one divides, then the post-divide).
            module.set_force_sum_reduction_for_comms(True)
    for layer in decoder_layers:
        fully_shard(layer, mesh=dense_mesh)
    fully_shard(model, mesh=dense_mesh)
    return model
