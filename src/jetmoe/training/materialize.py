"""Start-up without the whole model in any process: build on the meta device, shard, then materialise only
what this process owns, initialised or read from an HF checkpoint.

    model = meta_model(JetMoeConfig(...))          # parameters on "meta": no memory; buffers real
    model = shard_model(model, runtime)            # FSDP2 (distributed.py), pipeline stages, expert shards...
    materialize(model, runtime.device, RandomInit(seed, model))          # or CheckpointSlices(folder)

`materialize` takes any layout: each parameter is either a plain tensor (this process owns all of it, e.g. one
process or a pipeline stage's layers) or a DTensor (this process owns its local shard, wherever the placements
put it: FSDP2's Shard(0), expert shards, ...); parameters a layout drops (another stage's layers) are simply
absent. Every parameter is filled through its fully qualified name in the unwrapped model (FSDP2 keeps names;
`canonical_name` strips peft's and torch.compile's prefixes).

Initialisation is per parameter and per block of rows: block b of parameter `name` is drawn from a generator
seeded with (seed, name, b), blocks being fixed runs of dim-0 rows (about 1M elements each). A process draws only
the blocks that overlap its rows, so any layout, a single process included, gets the very same values, and the
extra work per process is at most a block per parameter. Checkpoints are read with safetensors' memory-mapped
slices: each process reads the rows it owns and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os

import torch
from torch import nn

_BLOCK_ELEMENTS = 1 << 20  # elements per initialisation block (whole rows; one row if a row is larger)


class MaterializeError(ValueError):
    """A parameter could not be materialised: the message names it and why (unknown kind, missing or
    mis-shaped in the checkpoint)."""


@contextlib.contextmanager
def parameters_on_meta():
    """Within it, every parameter a module registers moves to the meta device at once (buffers stay real, so
    the rotary tables and other computed buffers need no re-computation). Large `torch.empty` allocations made
    before the move are never touched, so they cost no resident memory."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        param = module._parameters[name]
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def meta_model(config):
    """A JetMoeForCausalLM whose parameters are on the meta device (tied weights stay tied)."""
    from .. import JetMoeForCausalLM

    with parameters_on_meta():
        model = JetMoeForCausalLM(config)
    return model


def canonical_name(name: str) -> str:
    """The parameter's name in the plain HF model (peft's base_model.model. and compile's _orig_mod. removed)."""
    name = name.replace("_orig_mod.", "").removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _local_region(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor, global shape, global offset of the local tensor) of a plain tensor or a DTensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = param.to_local()
        _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return local, tuple(param.shape), tuple(offset)
    return param, tuple(param.shape), (0,) * param.ndim


def materialize(model: nn.Module, device: torch.device, source, name_of=None) -> nn.Module:
    """Allocate this process's part of every meta parameter on `device` and fill it from `source`
    (`RandomInit` or `CheckpointSlices`, or anything with `fill(name, local, global_shape, offset)`).
    `name_of(fqn)` gives a parameter's name in the whole HF model (default `canonical_name`), for layouts
    that rename modules (e.g. a stage that renumbers its layers). Buffers keep their values. Returns the model."""
    name_of = name_of or canonical_name
    real = [name for name, param in model.named_parameters() if param.device.type != "meta"]
    if real:
        raise MaterializeError(f"materialize takes a model whose parameters are all on the meta device; "
                               f"{real[0]} is on {dict(model.named_parameters())[real[0]].device}")
    buffers = {name: buffer for name, buffer in model.named_buffers()}
    owners: dict[int, list] = {}  # tied parameters: to_empty gives each module its own copy, tied again below
    for module in model.modules():
        for param_name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, param_name))
    with torch.no_grad():
        model.to_empty(device=device)  # FSDP2 re-points its sharded parameters here
        for (first, first_name), *others in (group for group in owners.values() if len(group) > 1):
            for module, param_name in others:
                if module._parameters[param_name] is not first._parameters[first_name]:
                    module._parameters[param_name] = first._parameters[first_name]
        for name, buffer in model.named_buffers():
            kept = buffers.get(name)
            if kept is not None and kept.device.type != "meta":
                buffer.copy_(kept.to(buffer.device))
        for name, param in model.named_parameters():  # tied parameters appear once
            local, shape, offset = _local_region(param)
            source.fill(name_of(name), local, shape, offset)
    return model


def _slices(shape: tuple[int, ...], offset: tuple[int, ...], local_shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offset, local_shape))


class RandomInit:
    """The model's initialisation (as JetMoePreTrainedModel._init_weights: normal(0, initializer_range) for
    projections, experts and the embedding, whose padding row is 0; zeros for biases; ones for norms), drawn
    per (seed, parameter name, block of rows) so that every layout gets the same values."""

    def __init__(self, seed: int, model: nn.Module):
        self.seed = int(seed)
        self.std = float(model.config.initializer_range)
        self.kinds = _kinds(model)

    def kind(self, name: str) -> str:
        if name in self.kinds:
            return self.kinds[name][0]
        if name.endswith(".bias"):
            return "zeros"
        if name.endswith("norm.weight"):
            return "ones"
        if name.endswith(".weight"):
            return "normal"
        raise MaterializeError(f"no initialisation is known for parameter {name!r}")

    def fill(self, name: str, local: torch.Tensor, shape: tuple[int, ...], offset: tuple[int, ...]) -> None:
        kind = self.kind(name)
        if kind == "zeros":
            local.zero_()
            return
        if kind == "ones":
            local.fill_(1.0)
            return
        rows = shape[0] if shape else 1
        row_elements = math.prod(shape[1:]) if len(shape) > 1 else 1
        block_rows = max(1, _BLOCK_ELEMENTS // max(1, row_elements))
        start = offset[0] if shape else 0
        stop = start + (local.shape[0] if shape else 1)
        rest = _slices(shape[1:], offset[1:], tuple(local.shape[1:]))
        for block in range(start // block_rows, math.ceil(stop / block_rows) if stop > start else 0):
            first, last = block * block_rows, min(rows, (block + 1) * block_rows)
            values = torch.empty((last - first, *shape[1:]), dtype=torch.float32)
            values.normal_(0.0, self.std, generator=_generator(self.seed, name, block))
            lo, hi = max(first, start), min(last, stop)
            piece = values[(slice(lo - first, hi - first), *rest)]
            local[lo - start : hi - start].copy_(piece.to(local.dtype))
        padding = self.kinds.get(name, (None, None))[1]
        if kind == "embedding" and padding is not None and start <= padding < stop:
            local[padding - start].zero_()


def _kinds(model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """Each parameter's initialisation by its module's type, where the name alone does not say it (with the
    embedding's padding row)."""
    kinds = {}
    for module_name, module in model.named_modules():
        prefix = canonical_name(module_name + ".") if module_name else ""
        for param_name in module._parameters:
            name = prefix + param_name
            if "RMSNorm" in type(module).__name__ or "LayerNorm" in type(module).__name__:
                kinds[name] = ("ones" if param_name == "weight" else "zeros", None)
            elif isinstance(module, nn.Embedding) and param_name == "weight":
                kinds[name] = ("embedding", module.padding_idx)
    return kinds


def _generator(seed: int, name: str, block: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


class CheckpointSlices:
    """Fill parameters from an HF-format folder (model.safetensors, or shards with model.safetensors.index.json),
    reading only each process's slices through safetensors' memory-mapped `get_slice`. A tied output head
    missing from the files is the embedding (it is the same parameter in the model). Errors name the key."""

    def __init__(self, folder: str, error=MaterializeError):
        self.folder = folder
        self.error = error
        self._open: dict[str, object] = {}
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as handle:
                    self.files = dict(json.load(handle)["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as problem:
                raise error(f"{index} is not a safetensors index ({type(problem).__name__}: {problem})") from None
        else:
            single = os.path.join(folder, "model.safetensors")
            if not os.path.exists(single):
                raise error(f"{folder} holds no model.safetensors (nor model.safetensors.index.json)")
            self.files = {key: "model.safetensors" for key in self._keys("model.safetensors")}

    def _handle(self, file: str):
        from safetensors import safe_open

        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.folder, file), framework="pt")
        return self._open[file]

    def _keys(self, file: str) -> list[str]:
        try:
            return list(self._handle(file).keys())
        except Exception as error:  # safetensors' own errors for an unreadable file
            raise self.error(f"{file} in {self.folder} does not read ({type(error).__name__}: {error})") from None

    def fill(self, name: str, local: torch.Tensor, shape: tuple[int, ...], offset: tuple[int, ...]) -> None:
        file = self.files.get(name)
        if file is None:
            raise self.error(f"the checkpoint {self.folder} has no tensor {name!r} (model shape {shape})")
        try:
            stored = self._handle(file).get_slice(name)
            saved = tuple(stored.get_shape())
        except Exception as error:  # safetensors' own errors for an unreadable file
            raise self.error(f"{file} in {self.folder} does not read ({type(error).__name__}: {error})") from None
        if saved != shape:
            raise self.error(f"{name}: checkpoint shape {saved} != model shape {shape} (in {self.folder}); "
                             "the model config does not match the checkpoint's")
        part = stored[_slices(shape, offset, tuple(local.shape))] if shape else stored[:]
        local.copy_(part.reshape(local.shape).to(local.dtype))

    def close(self) -> None:
        self._open.clear()


def peak_host_memory_bytes() -> int:
    """This process's peak resident memory so far (VmHWM; ru_maxrss where /proc is not there)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
