"""Processes and sharding: one process, or torchrun (one node or many) with FSDP2 `fully_shard` per decoder layer.

Launch (the same command as a single process, behind torchrun):
    torchrun --nproc_per_node 8 -m jetmoe.cli train --preset jetmoe-8b ...            # one node, 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
             --rdzv_endpoint HOST:29500 --rdzv_id RUN -m jetmoe.cli train ...          # run on every node
    torchrun --nproc_per_node 8 -m jetmoe.cli train ... --ep 8                        # experts split over 8 (expert_parallel.py)
On GPUs the backend is NCCL (one GPU per process, LOCAL_RANK picks it); on CPU it is gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Sum numbers over all processes (in float64, so counts and sums stay exact)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value):
        """Every process's `value` (picklable), on every process."""
        if not self.distributed:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda was asked for but no CUDA GPU is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_runtime(requested_device: str = "auto") -> Runtime:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Runtime(rank=rank, world=world, local_rank=local_rank, device=device)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: torch.nn.Module, runtime: Runtime, ep: int = 1) -> torch.nn.Module:
    """FSDP2: each decoder layer is its own shard group (gathered just in time), the rest goes with the root.
    With `ep` > 1 the experts are sharded over groups of `ep` processes (expert_parallel.py).

    A model on the meta device stays there, sharded (materialize.materialize then allocates each process's part);
    a real one moves to the runtime's device first."""
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    if ep > 1:
        from .expert_parallel import check_layout, shard_expert_parallel

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        check_layout(ep, runtime.world, base.config.num_local_experts)
        return shard_expert_parallel(model, runtime.device, runtime.world, ep, _decoder_layers(model))
    if not runtime.distributed:
        return model if on_meta else model.to(runtime.device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world,))
    if not on_meta:
        model.to(runtime.device)
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers, found by the class name the model declares as not to be split (works through peft)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]
