"""int8 weight-only quantisation for CPU inference: experts and dense layers, one scale per output channel.

W [out, in] is stored as int8 Q = round(W / s) with s = max|W[row]| / 127 per output row; y = (x @ Q.T) * s.
Activations stay in the model dtype. Decoding is bound by reading weights, and int8 weights are read as they
are, half the bytes of bf16. A few rows on CPU go through jetmoe's own kernel where it builds
(`jetmoe.ops.native`: AVX-512 VNNI, the weights read at memory speed, faster than `aten._weight_int8pack_mm`),
else through that aten kernel; more rows, and other devices, dequantise the weight on the fly.

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
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from jetmoe import JetMoeConfig, JetMoeForCausalLM, cpu_memory
from jetmoe.modeling.experts import ParallelExperts
from jetmoe.modeling.routing import TopKRouter
from jetmoe.ops import native, slot_products

METHOD = "int8-weight-only-per-channel"
SPEC_FILE = "quantization.json"
WEIGHTS_FILE = "model-int8.safetensors"


_QUANTIZE_CHUNK_ELEMENTS = 2**23  # fp32 temporaries of at most 32 MiB


def _int8_buffer(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Where a quantised weight goes: large ones on the CPU straight onto huge-page memory, where decoding
    reads them fastest (jetmoe/cpu_memory.py). Made on the heap and moved there afterwards, their heap copies
    would stay in the process, which keeps freed memory (jetmoe.cpu_runtime), about doubling its own memory
    (docs/performance.md)."""
    if (
        device.type == "cpu"
        and cpu_memory.huge_pages_supported()
        and shape.numel() >= cpu_memory.MIN_TENSOR_BYTES  # one byte per element
    ):
        return cpu_memory.huge_page_empty(shape, torch.int8)
    return torch.empty(shape, dtype=torch.int8, device=device)


def quantize_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] float -> (int8 of the same shape, fp32 scales [..., out]).

    Works through the rows in chunks, so the fp32 temporaries stay small: converting a whole expert weight at
    once makes temporaries as large as the weight in fp32, and a process that keeps its freed memory
    (jetmoe.cpu_runtime) would carry that fragmentation on (docs/performance.md).
    """
    rows = weight.detach().reshape(-1, weight.shape[-1])
    q = _int8_buffer(rows.shape, weight.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=weight.device)
    step = max(1, _QUANTIZE_CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        w = rows[start : start + step].to(torch.float32, copy=True)  # never a view: it is divided in place
        chunk_scale = w.abs().amax(dim=-1).clamp_(min=1e-12).div_(127.0)
        q[start : start + step] = w.div_(chunk_scale[:, None]).round_().clamp_(-127, 127)
        scale[start : start + step] = chunk_scale
    return q.view(weight.shape), scale.view(weight.shape[:-1])


# aten's int8 kernel is a matrix-vector design: fast for a few rows, but by a few dozen rows slower than converting
# the int8 weights to bf16 for the bf16 matmul (docs/performance.md). Prompts (prefill) take the second way.
INT8_ATEN_MAX_ROWS = 24


# jetmoe's kernel reads the weights once for all rows and takes them four at a time against each block of
# weights: up to this many rows a weight it beats converting the weights to bf16 for a matmul
# (docs/performance.md).
INT8_GEMV_MAX_ROWS = 64
_CPU_KERNEL_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


def _int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, in] @ dequant(q [out, in], scale [out]).T -> [M, out] in x's dtype."""
    if x.shape[0] <= INT8_GEMV_MAX_ROWS and native.int8_ok(x, q, scale):
        return native.int8_gemv(x, q, scale)
    if (
        x.device.type == "cpu"
        and x.dtype in _CPU_KERNEL_DTYPES
        and q.shape[1] % 16 == 0
        and x.shape[0] <= INT8_ATEN_MAX_ROWS
    ):
        # The CPU kernel wants the scales in the activation dtype and needs `in` a multiple of 16 (it
        # crashes on other widths in bf16).
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scale.to(x.dtype))
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        q, scale = quantize_tensor(linear.weight)
        module.register_buffer("weight_int8", q)
        module.register_buffer("scale", scale.to(linear.weight.dtype))
        module.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _int8_matmul(x.reshape(-1, self.in_features), self.weight_int8, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


def _int8_grouped_linear_impl(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """Rows of x grouped by expert (group e ends at ends[e]) times expert e's int8 weight q[e] [out, in]."""
    # Group sizes on the host: on CPU that read is cheap, and only experts with rows cost anything.
    ends = ends.tolist()
    if max(b - a for a, b in zip([0, *ends], ends)) <= INT8_GEMV_MAX_ROWS and native.int8_ok(x, q, scale):
        return native.int8_gemv(x, q, scale, native.ends_groups(ends))  # batched decoding: one call
    outputs, start = [], 0
    for expert, end in enumerate(ends):
        if end > start:
            outputs.append(_int8_matmul(x[start:end], q[expert], scale[expert]))
        start = end
    if not outputs:
        return x.new_zeros(0, q.shape[1])
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


@torch.library.custom_op("jetmoe::int8_grouped_linear", mutates_args=())
def _int8_grouped_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """For torch.compile: an op whose shape function is all the compiler sees (no host read in the graph)."""
    return _int8_grouped_linear_impl(x, q, scale, ends)


@_int8_grouped_linear.register_fake
def _(x, q, scale, ends):
    return x.new_empty((x.shape[0], q.shape[1]))


class Int8ParallelExperts(nn.Module):
    """ParallelExperts with int8 weights [E, out, in]: same forward(grouped_inputs, plan)."""

    def __init__(self, num_experts: int, input_size: int, output_size: int, dtype=torch.float32):
        super().__init__()
        self.num_experts, self.input_size, self.output_size = num_experts, input_size, output_size
        self.register_buffer("weight_int8", torch.zeros(num_experts, output_size, input_size, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_experts, output_size, dtype=dtype))

    @classmethod
    def from_float(cls, experts: ParallelExperts) -> Int8ParallelExperts:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.num_experts, module.input_size, module.output_size = (
            experts.num_experts,
            experts.input_size,
            experts.output_size,
        )
        q, scale = quantize_tensor(experts.weight)
        module.register_buffer("weight_int8", q)
        module.register_buffer("scale", scale.to(experts.weight.dtype))
        return module

    def forward(self, grouped_inputs: torch.Tensor, plan) -> torch.Tensor:
        if plan.in_slot_order:  # a few-token plan (decoding): rows in slot order, experts known on the host
            if native.int8_ok(grouped_inputs, self.weight_int8, self.scale):
                groups = native.slot_groups(plan.slot_experts)
                return native.int8_gemv(grouped_inputs, self.weight_int8, self.scale, groups)
            return slot_products(
                grouped_inputs,
                plan.slot_experts,
                self.output_size,
                lambda rows, e: _int8_matmul(rows, self.weight_int8[e], self.scale[e]),
            )
        if torch.compiler.is_compiling():  # the group sizes are read inside the op, out of the compiler's sight
            return _int8_grouped_linear(grouped_inputs, self.weight_int8, self.scale, plan.expert_ends)
        return _int8_grouped_linear_impl(grouped_inputs, self.weight_int8, self.scale, plan.expert_ends)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in={self.input_size}, out={self.output_size}, int8 per-channel"


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
