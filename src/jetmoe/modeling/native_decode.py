"""A decoder layer while decoding on the CPU (bf16 activations, bf16 or int8 weights) in C: two calls around attention.

The operator path of a decoding layer is ~45 PyTorch calls around its 7 weight products; on the 2-core CPU
their overhead cost about as much as the products themselves. `layer_forward` runs the same steps through
ops/native/decode.c: one call from the layer's input to the rotated queries and keys; the cache update and
attention (one C call for the engine's cache, which lets its caller write the new rows; `cache.update` and
the attention implementation otherwise); one call from the attention output to the layer's output. The
results are the operator path's bit for bit (each step is the kernel that path runs, the decoding attention
kernel included; tests/modeling/test_native_decode.py checks the whole model). Where a router's choice would
hang on a tie or a non-finite logit, that part of the layer runs the operator path.

It runs for CPU inference in bf16 outside torch.compile, up to 8 tokens (a decoding batch) and 16 slots,
where the operator path runs all of a layer's products through the same C kernels, for layers whose modules
are the model's own with bf16 weights, or int8 projections from generation/quantize.py (not other
replacements), SiLU experts and widths the kernels take. The slots are grouped by expert as the sorted plan
groups them, so each expert's weights are read once.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..ops import dense, grouped_matmul, native
from ..ops.dense import Linear
from ..ops.native import decode as kernels
from .experts import ParallelExperts
from .norm_rotary import JetMoeRMSNorm


# The modules whose weights the C calls read, in this order, and what each may be: the model's own modules, or
# for the projections the int8 ones of generation/quantize.py (other replacements, such as adapters, compute
# something else, and the operator path knows them).
_NORM, _ROUTER, _EXPERTS, _DENSE = "norm", "router", "experts", "dense"
_PARTS = (
    (("input_layernorm",), _NORM),
    (("self_attention", "experts", "router", "layer"), _ROUTER),
    (("self_attention", "experts", "input_linear"), _EXPERTS),
    (("self_attention", "kv_proj"), _DENSE),
    (("self_attention", "experts", "output_linear"), _EXPERTS),
    (("post_attention_layernorm",), _NORM),
    (("mlp", "router", "layer"), _ROUTER),
    (("mlp", "input_linear"), _EXPERTS),
    (("mlp", "output_linear"), _EXPERTS),
)


@functools.cache
def _int8_types() -> dict[str, type]:
    from ..generation.quantize import Int8Linear, Int8ParallelExperts  # generation builds on modeling: import late

    return {_DENSE: Int8Linear, _EXPERTS: Int8ParallelExperts}


def _operand(module, role: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, None) for a float module, (int8 weight, scale) for an int8 projection, None for anything else."""
    kind = type(module)
    if (role == _NORM and kind is JetMoeRMSNorm) or (role == _EXPERTS and kind is ParallelExperts):
        return module._parameters["weight"], None
    if role in (_ROUTER, _DENSE) and kind is Linear:
        return (module._parameters["weight"], None) if module.bias is None else None
    if kind is _int8_types().get(role) and getattr(module, "bias", None) is None:
        return module._buffers["weight_int8"], module._buffers["scale"]
    return None


class _Layer(NamedTuple):
    """What the two C calls need from a layer: (weight, scale or None) per module in _PARTS order, the MoA and
    MoE biases, and a few sizes."""

    operands: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]
    moa_bias: torch.Tensor
    mlp_bias: torch.Tensor
    input_eps: float
    post_eps: float
    top_k: int
    kv_heads: int
    head_dim: int


def _prepare(layer) -> _Layer | None:
    """The layer's C-call inputs, or None where the C calls do not take this layer. Cached on the layer and
    rebuilt when a module or tensor is replaced or changes dtype (`.to()` keeps the Parameter objects)."""
    modules, operands = [], []
    for path, role in _PARTS:
        module = layer
        for name in path:  # nn.Module's attribute lookup costs ~1 us a name; this runs in every layer and step
            module = module._modules[name]
        operand = _operand(module, role)
        if operand is None:
            return None
        modules.append(module)
        operands.append(operand)
    attention, mlp = layer._modules["self_attention"], layer._modules["mlp"]
    biases = (attention._modules["experts"]._parameters["bias"], mlp._parameters["bias"])
    tensors = [t for operand in operands for t in operand if t is not None] + list(biases)
    key = (*modules, *tensors, *(t.dtype for t in tensors))
    cached = layer.__dict__.get("_native_decode")  # (key, prepared): the key's objects compared by identity
    if cached is not None and len(cached[0]) == len(key) and all(a is b for a, b in zip(cached[0], key)):
        return cached[1]
    moa = attention.experts
    ok = (
        all(t.is_cpu and t.is_contiguous() for t in tensors)
        and all(
            weight.dtype == (torch.bfloat16 if scale is None else torch.int8)
            and (scale is None or scale.dtype == torch.bfloat16)
            for weight, scale in operands
        )
        and all(b.dtype == torch.bfloat16 for b in biases)
        and mlp.silu
        and moa.router.top_k == mlp.router.top_k
        and attention.config.hidden_size % 32 == 0
        and attention.head_dim % 32 == 0
        and mlp.input_linear.output_size % 64 == 0
        and max(moa.router.num_experts, mlp.router.num_experts) <= 64
    )
    prepared = None
    if ok:
        prepared = _Layer(
            tuple(operands), *biases, modules[0].variance_epsilon, modules[5].variance_epsilon, attention.top_k,
            attention.num_key_value_heads, attention.head_dim,
        )  # fmt: skip
    layer.__dict__["_native_decode"] = (key, prepared)
    return prepared


# Up to this many tokens and slots the operator path runs every product of a layer through the C kernel the
# C calls use (dense layers: ops/dense.py; expert products: ops/grouped_matmul.py), so the two agree bit for
# bit; beyond, it takes other kernels (oneDNN), and so does a prompt.
MAX_TOKENS = dense._NATIVE_MAX_ROWS
MAX_SLOTS = min(grouped_matmul._NATIVE_MAX_ROWS, kernels.MAX_SLOTS)


def applicable(layer, hidden_states: torch.Tensor, output_attentions: bool) -> _Layer | None:
    """The layer's C-call inputs where `layer_forward` takes this call (CPU inference in bf16, outside
    torch.compile, at most MAX_TOKENS tokens and MAX_SLOTS slots), else None."""
    if (
        output_attentions
        or hidden_states.dtype != torch.bfloat16
        or not hidden_states.is_cpu
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
    ):
        return None
    tokens = hidden_states.numel() // max(hidden_states.shape[-1], 1)
    if not 0 < tokens <= MAX_TOKENS or not native.available():
        return None
    prepared = _prepare(layer)
    if prepared is None or tokens * prepared.top_k > MAX_SLOTS:
        return None
    return prepared


def layer_forward(layer, prepared: _Layer, hidden_states, position_embeddings, attention_mask, cache, **kwargs):
    """JetMoeDecoderLayer.forward for a call `applicable` prepared: (output [B, T, H], None, (MoA logits, MoE
    logits)); None where the MoA router's choice is not decided here (the caller runs the operator path)."""
    input_norm, moa_router, query_proj, kv_proj, output_proj, post_norm, mlp_router, w1, w2 = prepared.operands
    k, kv_heads, head_dim = prepared.top_k, prepared.kv_heads, prepared.head_dim
    batch, length, hidden = hidden_states.shape
    x = hidden_states.contiguous()
    cos, sin = position_embeddings
    routed = kernels.attention_in(
        x, input_norm[0], prepared.input_eps, moa_router[0], k, query_proj, kv_proj, cos.contiguous(), sin.contiguous()
    )
    if routed is None:
        return None
    moa_logits, chosen, gates, queries, projected_kv, keys = routed

    attention = layer._modules["self_attention"]
    attended = _cached_attention(attention, cache, queries, keys, projected_kv, attention_mask)
    if attended is None:
        query = queries.view(batch, length, k, kv_heads, head_dim).permute(0, 3, 2, 1, 4)  # [B, Nkv, k, T, D]
        key = keys.transpose(1, 2)
        value = projected_kv.view(batch, length, 2, kv_heads, head_dim)[:, :, 1].transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, attention.layer_idx)
        out, _ = attention._attend(query, key, value, attention_mask, False, **kwargs)
        attended = out.permute(0, 3, 2, 1, 4).reshape(batch * length * k, kv_heads * head_dim)

    h, moe_logits, layer_out = kernels.attention_out(
        x.view(-1, hidden), attended, output_proj, chosen, gates, prepared.moa_bias, post_norm[0], prepared.post_eps,
        mlp_router[0], w1, w2, prepared.mlp_bias,
    )  # fmt: skip
    if layer_out is None:  # the MoE router's choice is the operator path's to make
        h = h.view(batch, length, hidden)
        mlp_out, moe_logits = layer.mlp(layer.post_attention_layernorm(h))
        return h + mlp_out, None, (moa_logits, moe_logits)
    return layer_out.view(batch, length, hidden), None, (moa_logits, moe_logits)


def _cached_attention(attention, cache, queries, keys, projected_kv, mask) -> torch.Tensor | None:
    """The cache update and attention in one C call, for a cache that lets its caller write the new K/V rows
    (`decode_buffers` / `decode_written`: the engine's, generation/cache.py, and the model's own while decoding,
    modeling/cache.py) under the sdpa implementation, where the operator path
    runs the same kernel on the same values (ops/attention.py): attention output per slot [N * k, Nkv * D].
    None elsewhere. queries [B, 1, k * Nkv, D] (slot j's heads together), keys [B, 1, Nkv, D], projected_kv
    [B, 1, 2 * Nkv * D] (the values in its second half). Strides instead of views: a decoding step calls this
    in every layer."""
    buffers = getattr(cache, "decode_buffers", None)
    buffers = buffers(attention.layer_idx) if buffers is not None else None
    if buffers is None or queries.shape[1] != 1 or (attention.config._attn_implementation or "sdpa") != "sdpa":
        return None
    key_buffer, value_buffer, positions, view = buffers
    batch, _, heads_k, head_dim = queries.shape
    kv_heads = keys.shape[2]
    k, width = heads_k // kv_heads, kv_heads * head_dim
    if (
        key_buffer.dtype != torch.bfloat16
        or value_buffer.stride() != key_buffer.stride()
        or batch * heads_k * view > kernels.MAX_ATTENTION_PRODUCTS
        or not kernels.mask_ok(mask)
        or (mask is not None and (mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != (1, view)))
    ):
        return None  # the operator path takes SDPA for these too
    attended = torch.empty(batch * k, width, dtype=torch.bfloat16)
    # query (b, h, j) is queries[b, 0, j * Nkv + h]; its output goes to attended[b * k + j, h * D:]
    slot_strides = (heads_k * head_dim, head_dim, width, heads_k * head_dim)
    values = projected_kv.data_ptr() + width * projected_kv.element_size()  # the second half of each row
    new_rows = (keys.data_ptr(), width, values, 2 * width, positions)
    kernels.run_attention(
        queries.data_ptr(), slot_strides, key_buffer.data_ptr(), value_buffer.data_ptr(), key_buffer.stride()[:3],
        mask, attention.scaling, attended.data_ptr(), slot_strides, (batch, kv_heads, k, 1, view, head_dim), new_rows,
    )  # fmt: skip
    cache.decode_written(attention.layer_idx)
    return attended
