"""int8 weight-only quantisation for CPU inference: experts and dense layers, one scale per output channel.

W [out, in] is stored as int8 Q = round(W / s) with s = max|W[row]| / 127 per output row; y = (x @ Q.T) * s.
Activations stay in the model dtype. Decoding is bound by reading weights, and int8 weights are read as they
are, half the bytes of bf16. The modules are `jetmoe.modeling.int8`'s, their products `jetmoe.ops.int8`'s: a few
rows on CPU go through jetmoe's own kernel where it builds (`jetmoe.ops.native`), else through aten's int8 kernel;
more rows, and other devices, dequantise the weight on the fly.

What is quantised: every nn.Linear except the routers (their few weights decide which experts run, so they
stay exact), and every ParallelExperts (the MoA and MoE experts). The embedding stays in float; with tied
embeddings the LM head becomes its own int8 copy.

Checkpoint format (a directory): config.json, generation_config.json, tokenizer files, `quantization.json`
(method and the quantised module names) and `model-int8.safetensors` (int8 weights, fp32 scales, the
float tensors). `JetMoeForCausalLM.from_pretrained` refuses such a directory (no model.safetensors);
`load_quantized` (and `jetmoe generate --model`) reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from jetmoe import JetMoeConfig, JetMoeForCausalLM, cpu_memory
from jetmoe.modeling.experts import ParallelExperts
from jetmoe.modeling.int8 import Int8Linear, Int8ParallelExperts, quantize_tensor
from jetmoe.modeling.routing import TopKRouter

METHOD = "int8-weight-only-per-channel"
SPEC_FILE = "quantization.json"
WEIGHTS_FILE = "model-int8.safetensors"

__all__ = ["Int8Linear", "Int8ParallelExperts", "is_quantized_checkpoint", "load_quantized", "quantize_model",
           "quantize_tensor", "save_quantized"]  # fmt: skip


def _quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    routers = {id(m.layer) for m in model.modules() if isinstance(m, TopKRouter)}
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, ParallelExperts) or (isinstance(module, nn.Linear) and id(module) not in routers)
    ]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def quantize_model(model: JetMoeForCausalLM) -> list[str]:
    """Replace, in place, the dense and expert layers of `model` by int8 ones; returns their names.

    Layer by layer, so peak memory is the float model plus one layer's int8 copy (a tied LM head's float
    weight stays alive as the embedding)."""
    names = [name for name, _ in _quantizable(model)]
    for name in names:
        # One layer at a time, holding no reference to the float layer once it is replaced, so its weight is
        # freed before the next one is quantised (an 8B model never holds bf16 and int8 copies at once).
        module = model.get_submodule(name)
        int8 = Int8ParallelExperts.from_float(module) if isinstance(module, ParallelExperts) else Int8Linear.from_float(module)
        _set_module(model, name, int8)
        del module, int8
    if not names:
        raise ValueError("nothing to quantise: the model has no nn.Linear or ParallelExperts layers (already int8?)")
    model.config.tie_word_embeddings = False  # the LM head is its own int8 tensor now
    model.jetmoe_int8_modules = names
    return names


def is_quantized_checkpoint(path: str | Path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


def save_quantized(model: JetMoeForCausalLM, path: str | Path, tokenizer=None) -> Path:
    """Write an int8 checkpoint directory (see the module docstring)."""
    names = getattr(model, "jetmoe_int8_modules", None)
    if not names:
        raise ValueError("the model is not quantised: call quantize_model(model) first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    state = {}
    for key, tensor in model.state_dict().items():
        if key.endswith(".scale"):
            tensor = tensor.float()  # scales are saved in full precision whatever the activation dtype
        state[key] = tensor.detach().contiguous()
    save_file(state, path / WEIGHTS_FILE, metadata={"format": "pt", "method": METHOD})
    (path / SPEC_FILE).write_text(json.dumps({"method": METHOD, "modules": names}, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def load_quantized(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> JetMoeForCausalLM:
    """Build the model without allocating float weights, put the int8 modules in place, load the tensors."""
    path = Path(path)
    spec = json.loads((path / SPEC_FILE).read_text())
    if spec.get("method") != METHOD:
        raise ValueError(
            f"{path / SPEC_FILE}: unknown quantisation method {spec.get('method')!r} (expected {METHOD!r})"
        )
    config = JetMoeConfig.from_pretrained(path)
    with torch.device("meta"):
        model = JetMoeForCausalLM(config)
        for name in spec["modules"]:
            module = model.get_submodule(name)
            if isinstance(module, ParallelExperts):
                replacement = Int8ParallelExperts(module.num_experts, module.input_size, module.output_size)
            elif isinstance(module, nn.Linear):
                replacement = Int8Linear(module.in_features, module.out_features, module.bias is not None)
            else:
                raise ValueError(f"{path / SPEC_FILE}: {name} is a {type(module).__name__}, not a quantisable layer")
            _set_module(model, name, replacement)
    state = {}
    with safe_open(path / WEIGHTS_FILE, framework="pt", device=device) as weights:
        for key in weights.keys():
            tensor = weights.get_tensor(key)
            # A private copy, one tensor at a time: the int8 CPU kernel crashes on the file-backed memory
            # safetensors hands out, and the peak stays at the model plus one tensor. Large ones go onto
            # huge-page memory (jetmoe/cpu_memory.py: scattered heap pages slowed decoding).
            state[key] = cpu_memory.private_copy(tensor, dtype if tensor.is_floating_point() else None)
    # Strict: a missing or extra tensor is an error naming it. assign=True adopts the loaded tensors as they
    # are (no second copy).
    model.load_state_dict(state, strict=True, assign=True)
    # What the checkpoint does not hold (non-persistent buffers such as RoPE's inv_freq) is still on meta:
    # materialise it and let the model's own initialiser compute it.
    for module in model.modules():
        if any(t.is_meta for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))):
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"int8 checkpoint {path} left tensors uninitialised: {leftover[:5]}")
    model.config.tie_word_embeddings = False
    model.jetmoe_int8_modules = list(spec["modules"])
    return model.eval()
