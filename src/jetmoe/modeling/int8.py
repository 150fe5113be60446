"""int8 weight-only modules, siblings of the float ones: Int8Linear for a dense layer, Int8ParallelExperts for
ParallelExperts (same forward over a routing plan), and quantize_tensor, which makes their weights.
generation/quantize.py puts them into a model and saves and loads such checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from .. import cpu_memory
from ..ops import native, slot_products
from ..ops.int8 import int8_grouped_linear, int8_grouped_linear_impl, int8_matmul
from .experts import ParallelExperts

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
        out = int8_matmul(x.reshape(-1, self.in_features), self.weight_int8, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


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
                lambda rows, e: int8_matmul(rows, self.weight_int8[e], self.scale[e]),
            )
        if torch.compiler.is_compiling():  # the group sizes are read inside the op, out of the compiler's sight
            return int8_grouped_linear(grouped_inputs, self.weight_int8, self.scale, plan.expert_ends)
        return int8_grouped_linear_impl(grouped_inputs, self.weight_int8, self.scale, plan.expert_ends)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in={self.input_size}, out={self.output_size}, int8 per-channel"
