"""Attention of several query groups over one shared set of K/V heads, without tiling K/V.

In JetMoE every token's k selected experts each bring Nkv query heads, and all of them attend over the same
Nkv K/V heads. Queries here are laid out kv-head-major, [B, Nkv, k, T, D]: query (h, j) reads kv head h.
That is the grouped-query layout SDPA's `enable_gqa` expects once flattened to [B, Nkv*k, T, D], so K/V are
never copied k times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_bf16
from .fused import chain_gradients
from .native import decode
from .native import elementwise as native


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def shared_kv_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention, returning the probabilities too.

    query [B, Nkv, k, T, D]; key, value [B, Nkv, S, D]; attention_mask None or [B, 1, T, S] (additive float
    or boolean "may attend"); None means plain causal attention, the queries being the last T of S positions.
    Softmax in fp32, cast back to the query dtype.
    Returns output [B, Nkv, k, T, D] and probabilities [B, k*Nkv, T, S], heads choice-major (head j*Nkv + h:
    choice j, kv head h, the reference's order). The output is computed from that very tensor, so a gradient
    reaches it (`retain_grad()` on returned attentions works).
    """
    batch, kv_heads, groups, q_len, _ = query.shape
    if attention_mask is None and q_len > 1:
        attention_mask = _causal_mask(q_len, key.shape[2], query.device)[None, None]
    scores = torch.matmul(query.transpose(1, 2), key.unsqueeze(1).transpose(-1, -2)) * scale  # [B, k, Nkv, T, S]
    if attention_mask is not None:
        scores = scores + _as_additive(attention_mask, scores.dtype).unsqueeze(1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout_p, training=training).reshape(batch, groups * kv_heads, q_len, -1)
    out = torch.matmul(probs.view(batch, groups, kv_heads, q_len, -1), value.unsqueeze(1))
    return out.transpose(1, 2), probs


def _causal_mask(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [T, S] mask for queries that are the last T of S positions."""
    query_pos = torch.arange(key_len - query_len, key_len, device=device)[:, None]
    return query_pos >= torch.arange(key_len, device=device)[None, :]


def additive_inference_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean "may attend" mask in SDPA's own additive form (0 / -inf in `dtype`), made once for all layers.

    SDPA turns a boolean mask into that form in every call (two `where`s and two scalar tensors), a measurable
    part of a decoding attention call; the output is the same bit for bit. Only for CPU inference, and only
    where every query may attend to some key:
    SDPA gives a row that sees nothing 0 from a boolean mask, NaN from an additive one; and not under
    torch.compile (that check would break the graph; inductor fuses the conversion anyway). Otherwise the mask
    is returned as is.
    """
    if mask is None or mask.dtype != torch.bool or mask.device.type != "cpu" or torch.is_grad_enabled():
        return mask
    if torch.compiler.is_compiling():
        return mask
    if not bool(mask.any(dim=-1).all()):
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))


# Decoding on the CPU in bf16 or fp32 (a few queries over a short cache) runs jetmoe's C kernel
# (ops/native/decode.c) in place of SDPA; the C decoder layers (modeling/backends/cpu_decode.py) call the same kernel,
# so the two paths agree.
DECODE_MAX_QUERIES = 8


def shared_kv_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """SDPA over shared K/V. Same shapes as `shared_kv_attention_reference`, output only.

    With no mask the attention is causal (queries are the last T positions); SDPA then runs `is_causal`
    without building a mask when T equals S, and T == 1 needs no mask at all. Decoding in bf16 or fp32 on the CPU
    (`decode.attention_takes`: few queries and products, no autograd) runs jetmoe's C kernel instead.
    """
    batch, kv_heads, groups, q_len, head_dim = query.shape
    key_len = key.shape[2]
    if dropout_p == 0.0 and q_len <= DECODE_MAX_QUERIES and decode.attention_takes(query, key, value, attention_mask):
        mask = attention_mask  # decoding on the CPU: jetmoe's C kernel
        if mask is None and q_len > 1:
            mask = _causal_mask(q_len, key_len, query.device)[None, None]
        return decode.attention(query, key, value, mask, scale)
    is_causal = False
    if attention_mask is None and q_len > 1:
        if q_len == key_len:
            is_causal = True
        else:
            attention_mask = _causal_mask(q_len, key_len, query.device)
    sees_nothing = None
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if is_causal and needs_grad and dropout_p == 0.0 and _recomputed_backward_takes(query, key, value):
        return _CausalAttention.apply(query, key, value, scale)
    if attention_mask is not None and attention_mask.dtype == torch.bool and (needs_grad or query.is_cuda):
        # A query that may attend to no key (a left-padding position) gets output 0, as SDPA's CPU kernel
        # gives; but SDPA's CUDA backward turns such rows into NaN gradients for the whole model (the
        # reference's bug in bf16). So such rows attend to every key instead and their output is zeroed.
        # CPU inference needs none of this (4 ops a layer of a decode step).
        sees_nothing = ~attention_mask.any(dim=-1, keepdim=True)
        attention_mask = attention_mask | sees_nothing
    dtype = query.dtype
    if not needs_grad and cpu_bf16.upcast(query, q_len):  # a bf16 prompt where bf16 arithmetic is emulated
        query, key, value = query.float(), key.float(), value.float()
        if attention_mask is not None and attention_mask.dtype == torch.bfloat16:
            attention_mask = attention_mask.float()
    out = F.scaled_dot_product_attention(
        query.reshape(batch, kv_heads * groups, q_len, head_dim),
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=True,
    ).to(dtype)
    if sees_nothing is not None:
        out = out.masked_fill(sees_nothing, 0.0)
    return out.view(batch, kv_heads, groups, q_len, head_dim)


# Training on the CPU in bf16: SDPA's flash-attention backward is slow there. _CausalAttention keeps SDPA's
# forward (the same kernel, so the same output) and computes the backward from the probabilities recomputed
# with the forward's log-sum-exp: five bmm (oneDNN, AMX) and two C passes (ops/native/elementwise.c). The bmm
# compute the masked half of the causal scores too, so the gain shrinks with length, and in fp32 SDPA's
# backward wins: hence bf16 and at most RECOMPUTED_BACKWARD_MAX_KEYS keys (docs/performance.md). Precision: the
# scores are recomputed in bf16 and the score gradients rounded to bf16 before their two products; against
# float64 gradients the error is of SDPA's order.
RECOMPUTED_BACKWARD_MAX_KEYS = 1024
_RECOMPUTED_CHUNK_ELEMENTS = 1 << 23  # scores per chunk of K/V heads (three such bf16 buffers live at once)


def _recomputed_backward_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    return (
        query.dtype == torch.bfloat16
        and key.shape[2] <= RECOMPUTED_BACKWARD_MAX_KEYS
        and native.fused_ok(query, key, value)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


class _CausalAttention(torch.autograd.Function):
    """Causal attention of queries [B, Nkv, k, T, D] over key, value [B, Nkv, T, D]: SDPA's CPU flash kernel
    forward, the backward recomputed (see above); under create_graph, the explicit formula's gradients."""

    @staticmethod
    def forward(ctx, query, key, value, scale):
        batch, kv_heads, groups, length, head_dim = query.shape
        out, log_norm = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query.reshape(batch, kv_heads * groups, length, head_dim), key, value, 0.0, True, scale=scale
        )[:2]
        ctx.save_for_backward(query, key, value, out, log_norm)
        ctx.scale = scale
        return out.view(batch, kv_heads, groups, length, head_dim)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, log_norm = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph (second derivatives): see ops/fused.py
            reference = lambda q, k, v: shared_kv_attention_reference(q, k, v, None, ctx.scale)[0]  # noqa: E731
            return (*chain_gradients(reference, (query, key, value), ctx.needs_input_grad[:3], grad_out), None)
        batch, kv_heads, groups, length, head_dim = query.shape
        blocks, rows = batch * kv_heads, groups * length  # a block: one K/V head and its queries, group-major
        q = query.reshape(blocks, rows, head_dim)
        k, v = key.reshape(blocks, length, head_dim), value.reshape(blocks, length, head_dim)
        grad = grad_out.reshape(blocks, rows, head_dim)
        delta = (grad.float() * out.reshape(blocks, rows, head_dim).float()).sum(-1)
        log_norm = log_norm.reshape(blocks, rows)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        step = max(1, _RECOMPUTED_CHUNK_ELEMENTS // (rows * length))
        for start in range(0, blocks, step):
            part = slice(start, min(start + step, blocks))
            scores = torch.bmm(q[part], k[part].transpose(1, 2))
            probs = native.causal_attention_probs(scores, log_norm[part], length, ctx.scale)
            torch.bmm(probs.transpose(1, 2), grad[part], out=grad_v[part])
            del probs
            grad_scores = torch.bmm(grad[part], v[part].transpose(1, 2))
            native.causal_attention_score_grad(
                scores, grad_scores, log_norm[part], delta[part].contiguous(), length, ctx.scale
            )
            torch.bmm(grad_scores, k[part], out=grad_q[part])
            torch.bmm(grad_scores.transpose(1, 2), q[part], out=grad_k[part])
        return grad_q.view(query.shape), grad_k.view(key.shape), grad_v.view(value.shape), None
