"""A decoder layer for a few bf16 tokens on the CPU (decoding) in two C calls around attention.

The operator path of a decoding layer is ~45 PyTorch calls around its 7 weight products; on the 2-core CPU
their overhead cost about as much as the products themselves. `layer_forward` runs the same steps through
ops/native/decode.c: one call from the layer's input to the rotated queries and keys, PyTorch's cache update
and attention, one call from the attention output to the layer's output. The results are the operator
path's bit for bit (each step is the kernel that path runs; tests/modeling/test_native_decode.py checks the
whole model). Where a router's choice would hang on a tie or a non-finite logit, that part of the layer
runs the operator path.

It runs where the operator path would take its few-token plan in bf16 with the C kernels (CPU, no autograd,
at most FEW_SLOTS slots, outside torch.compile), for layers whose modules are the model's own (not int8 or
other replacements) with bf16 weights, SiLU experts and widths the kernels take.
"""

from __future__ import annotations

import torch

from ..ops import native
from ..ops.dense import Linear
from ..ops.native import decode as kernels
from .experts import ParallelExperts
from .routing import use_few_token_plan


def _layer_ok(layer) -> bool:
    attention, mlp = layer.self_attention, layer.mlp
    moa = attention.experts
    linears = (moa.router.layer, mlp.router.layer, attention.kv_proj)
    experts = (moa.input_linear, moa.output_linear, mlp.input_linear, mlp.output_linear)
    if not (all(type(m) is Linear and m.bias is None for m in linears) and all(type(m) is ParallelExperts for m in experts)):
        return False  # replaced modules (int8, adapters): the operator path knows them
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    tensors = [m.weight for m in (*linears, *experts, *norms)] + [moa.bias, mlp.bias]
    return (
        all(t.dtype == torch.bfloat16 and t.is_cpu and t.is_contiguous() for t in tensors)
        and mlp.silu
        and moa.router.top_k == mlp.router.top_k
        and attention.config.hidden_size % 32 == 0
        and attention.head_dim % 32 == 0
        and mlp.input_linear.output_size % 64 == 0
        and max(moa.router.num_experts, mlp.router.num_experts) <= 64
    )


def applies(layer, hidden_states: torch.Tensor, output_attentions: bool) -> bool:
    """Whether `layer_forward` takes this call."""
    return (
        not output_attentions
        and hidden_states.dtype == torch.bfloat16
        and not torch.compiler.is_compiling()
        and use_few_token_plan(hidden_states.reshape(-1, hidden_states.shape[-1]), layer.mlp.router.top_k)
        and native.available()
        and _layer_ok(layer)
    )


def layer_forward(layer, hidden_states, position_embeddings, attention_mask, cache, **kwargs):
    """JetMoeDecoderLayer.forward for `applies` calls: (output [B, T, H], None, (MoA logits, MoE logits)); None
    where the MoA router's choice is not decided here (the caller runs the operator path)."""
    attention, mlp = layer.self_attention, layer.mlp
    moa = attention.experts
    batch, length, hidden = hidden_states.shape
    k, kv_heads, head_dim = attention.top_k, attention.num_key_value_heads, attention.head_dim
    x = hidden_states.contiguous()
    cos, sin = position_embeddings
    routed = kernels.attention_in(
        x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, moa.router.layer.weight, k,
        moa.input_linear.weight, attention.kv_proj.weight, cos.contiguous(), sin.contiguous(),
    )  # fmt: skip
    if routed is None:
        return None
    moa_logits, chosen, gates, queries, kv, keys = routed

    query = queries.view(batch, length, k, kv_heads, head_dim).permute(0, 3, 2, 1, 4)  # [B, Nkv, k, T, D]
    key = keys.transpose(1, 2)
    value = kv.view(batch, length, 2, kv_heads, head_dim)[:, :, 1].transpose(1, 2)
    if cache is not None:
        key, value = cache.update(key, value, attention.layer_idx)
    out, _ = attention._attend(query, key, value, attention_mask, False, **kwargs)
    attended = out.permute(0, 3, 2, 1, 4).reshape(batch * length * k, kv_heads * head_dim)

    norm = layer.post_attention_layernorm
    h, moe_logits, output = kernels.attention_out(
        x.view(-1, hidden), attended, moa.output_linear.weight, chosen, gates, moa.bias, norm.weight,
        norm.variance_epsilon, mlp.router.layer.weight, mlp.input_linear.weight, mlp.output_linear.weight, mlp.bias,
    )  # fmt: skip
    if output is None:  # the MoE router's choice is the operator path's to make
        mlp_out, moe_logits = mlp(norm(h.view(batch, length, hidden)))
        return h.view(batch, length, hidden) + mlp_out, None, (moa_logits, moe_logits)
    return output.view(batch, length, hidden), None, (moa_logits, moe_logits)
