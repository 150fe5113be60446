"""Python side of decode.c: a JetMoE layer's steps for a few tokens (bf16 or fp32), in one C call before attention
and one after it; the attention while decoding; and a whole stack of layers for one new token a row in one
call. Bit for bit the operator path (the same kernels on the same inputs); see decode.c. The projections (not
the routers) may be int8 with per-row scales, as generation/quantize.py makes them.

The caller (modeling/backends/cpu_decode.py) decides which layers and calls these take; the functions here check
the shapes they rely on and raise ValueError naming the problem. No autograd, no torch.compile.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from .. import native as _kernels
from .gemv import _int64_array

_CODES = {torch.float32: 0, torch.bfloat16: 1}  # the activations' dtypes decode.c takes
_MAX_EXPERTS = 64
MAX_SLOTS = 16  # tokens x top-k per call (decode.c's stack buffers)


# The width of ATen's fp32 vectors by its CPU capability: it decides the order of the sums in torch.softmax,
# which the C router reproduces (decode.c, aten_sum); elsewhere the router leaves gates of more than 3 experts
# to the operator path.
_ATEN_FLOAT_LANES = {"AVX512": 16, "AVX2": 8}


def _library() -> ctypes.CDLL:
    """The loaded kernels, told ATen's vector width once (per library: load() may be reloaded at another level)."""
    library = _kernels.load()
    if not getattr(library, "_aten_lanes_set", False):
        library.jetmoe_set_aten_lanes(_ATEN_FLOAT_LANES.get(torch.backends.cpu.get_cpu_capability(), 0))
        library._aten_lanes_set = True
    return library


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check(name: str, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def _contiguous(dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """Whether every tensor is of `dtype` (one decode.c takes), on the CPU, contiguous."""
    return dtype in _CODES and all(t.dtype == dtype and t.is_cpu and t.is_contiguous() for t in tensors)


# (weight, None) with the weight in the activations' dtype, or (int8 weight, scale per row in that dtype)
Projection = tuple[torch.Tensor, torch.Tensor | None]


def _projection_ok(projection: Projection, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    weight, scale = projection
    if tuple(weight.shape) != shape or not (weight.is_cpu and weight.is_contiguous()):
        return False
    if scale is None:
        return weight.dtype == dtype
    return weight.dtype == torch.int8 and _contiguous(dtype, scale) and tuple(scale.shape) == shape[:-1]


def _pointers(projection: Projection) -> tuple[int, int | None]:
    weight, scale = projection
    return weight.data_ptr(), None if scale is None else scale.data_ptr()


def softmax_sorted(values: torch.Tensor) -> torch.Tensor:
    """The routers' gates before rounding: softmax over each row of fp32 values [N, k] sorted best first, as
    `torch.softmax(values, dim=-1)` computes it on the CPU (the kernel the C router runs)."""
    _check("softmax_sorted", values.dtype == torch.float32 and values.dim() == 2 and values.is_cpu, "fp32 [N, k]")
    values = values.contiguous()
    out = torch.empty_like(values)
    if _library().jetmoe_softmax_sorted(_ptr(values), values.shape[0], values.shape[1], _ptr(out)):
        raise ValueError(f"softmax_sorted: PyTorch's order of summing {values.shape[1]} values is not known on this CPU")
    return out


def route(logits: torch.Tensor, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The C steps' routing of fp32 logits [N, E]: (experts int64 [N, k] best first, gates [N, k] in `dtype`),
    the values of modeling/routing.make_plan; None where a tie or a non-finite logit leaves the choice to
    PyTorch's topk (the C steps then hand the layer to the operator path)."""
    ok = logits.dtype == torch.float32 and logits.dim() == 2 and logits.is_cpu and dtype in _CODES
    _check("route", ok and 1 <= top_k <= min(logits.shape[1], MAX_SLOTS), "fp32 CPU logits [N, E], 1 <= k <= E")
    logits = logits.contiguous()
    chosen = torch.empty(logits.shape[0], top_k, dtype=torch.int64)
    gates = torch.empty(logits.shape[0], top_k, dtype=dtype)
    status = _library().jetmoe_route_logits(
        _ptr(logits), logits.shape[0], logits.shape[1], top_k, _ptr(chosen), _ptr(gates), _CODES[dtype]
    )
    return None if status else (chosen, gates)


def attention_in(
    x: torch.Tensor,
    norm_w: torch.Tensor,
    eps: float,
    router_w: torch.Tensor,
    top_k: int,
    query: Projection,
    kv: Projection,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, ...] | None:
    """x [B, T, H] (bf16 or fp32, and every other tensor alike) -> (router logits fp32 [N, E], experts int64
    [N, k], gates [N, k], rotated queries [B, T, k * Nkv, D], kv [B, T, 2 * Nkv * D], rotated keys [B, T, Nkv,
    D]); None where the routing is not decided by distinct finite logits (run the operator path). query: the MoA
    experts' input projections [E, A, H], kv: [2A, H]."""
    batch, length, hidden = x.shape
    experts, width = query[0].shape[0], query[0].shape[1]
    head_dim = cos.shape[-1]
    tokens, dtype = batch * length, x.dtype
    _check(
        "decode attention_in",
        _contiguous(dtype, x, norm_w, router_w, cos, sin)
        and tuple(norm_w.shape) == (hidden,)
        and tuple(router_w.shape) == (experts, hidden)
        and _projection_ok(query, (experts, width, hidden), dtype)
        and _projection_ok(kv, (2 * width, hidden), dtype)
        and cos.shape == sin.shape
        and cos.dim() == 3
        and cos.shape[0] in (1, batch)
        and cos.shape[1] == length
        and hidden % 32 == 0
        and head_dim % 32 == 0
        and width % head_dim == 0
        and experts <= _MAX_EXPERTS
        and 1 <= top_k <= experts
        and tokens * top_k <= MAX_SLOTS,
        f"x {tuple(x.shape)}, norm {tuple(norm_w.shape)}, router {tuple(router_w.shape)}, query "
        f"{tuple(query[0].shape)} {query[0].dtype}, kv {tuple(kv[0].shape)} {kv[0].dtype}, cos {tuple(cos.shape)}, "
        f"top_k {top_k}: contiguous on the CPU, all bf16 or all fp32 (projections int8 with scales [..., out] also), "
        f"H and D multiples of 32, at most {MAX_SLOTS} slots",
    )
    kv_heads = width // head_dim
    logits = torch.empty(tokens, experts, dtype=torch.float32)
    chosen = torch.empty(tokens, top_k, dtype=torch.int64)
    gates = torch.empty(tokens, top_k, dtype=dtype)
    queries = torch.empty(batch, length, top_k * kv_heads, head_dim, dtype=dtype)
    kv_out = torch.empty(batch, length, 2 * width, dtype=dtype)
    keys = torch.empty(batch, length, kv_heads, head_dim, dtype=dtype)
    status = _library().jetmoe_decode_attention_in(
        _ptr(x), batch, length, hidden, _ptr(norm_w), eps, _ptr(router_w), experts, top_k, *_pointers(query),
        *_pointers(kv), kv_heads, head_dim, _ptr(cos), _ptr(sin), length * head_dim if cos.shape[0] > 1 else 0,
        _ptr(logits), _ptr(chosen), _ptr(gates), _ptr(queries), _ptr(kv_out), _ptr(keys), _CODES[dtype],
        torch.get_num_threads(),
    )  # fmt: skip
    if status < 0:
        raise MemoryError("decode attention_in: out of memory")
    return None if status else (logits, chosen, gates, queries, kv_out, keys)


def attention_out(
    x: torch.Tensor,
    attended: torch.Tensor,
    output: Projection,
    chosen: torch.Tensor,
    gates: torch.Tensor,
    attn_bias: torch.Tensor,
    norm_w: torch.Tensor,
    eps: float,
    router_w: torch.Tensor,
    w1: Projection,
    w2: Projection,
    mlp_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [N, H] (the layer's input), attended [N * k, A] (slot order) -> (h = x + attention output [N, H], MoE
    router logits fp32 [N, E], the layer's output [N, H]; None where the MoE's routing is not decided by
    distinct finite logits: run the MoE on h). output: the MoA experts' output projections [E, H, A]; w1
    [E, 2I, H] and w2 [E, H, I]: the MoE experts'."""
    tokens, hidden = x.shape
    top_k = gates.shape[-1]
    experts, inner2 = w1[0].shape[0], w1[0].shape[1]
    width, dtype = output[0].shape[-1], x.dtype
    _check(
        "decode attention_out",
        _contiguous(dtype, x, attended, gates, attn_bias, norm_w, router_w, mlp_bias)
        and chosen.dtype == torch.int64
        and chosen.is_contiguous()
        and tuple(chosen.shape) == tuple(gates.shape) == (tokens, top_k)
        and tuple(attended.shape) == (tokens * top_k, width)
        and _projection_ok(output, (experts, hidden, width), dtype)
        and tuple(attn_bias.shape) == tuple(mlp_bias.shape) == tuple(norm_w.shape) == (hidden,)
        and tuple(router_w.shape) == (experts, hidden)
        and _projection_ok(w1, (experts, inner2, hidden), dtype)
        and _projection_ok(w2, (experts, hidden, inner2 // 2), dtype)
        and hidden % 32 == 0
        and width % 32 == 0
        and inner2 % 64 == 0
        and experts <= _MAX_EXPERTS
        and tokens * top_k <= MAX_SLOTS,
        f"x {tuple(x.shape)}, attended {tuple(attended.shape)}, output {tuple(output[0].shape)}, gates "
        f"{tuple(gates.shape)}, w1 {tuple(w1[0].shape)}, w2 {tuple(w2[0].shape)}: contiguous on the CPU, all bf16 "
        f"or all fp32 (projections int8 with scales [..., out] also), H and A multiples of 32, 2I of 64, at most "
        f"{MAX_SLOTS} slots",
    )
    h = torch.empty_like(x)
    logits = torch.empty(tokens, experts, dtype=torch.float32)
    out = torch.empty_like(x)
    status = _library().jetmoe_decode_attention_out(
        _ptr(x), tokens, hidden, top_k, _ptr(attended), width, *_pointers(output), _ptr(chosen), _ptr(gates),
        _ptr(attn_bias), _ptr(norm_w), eps, _ptr(router_w), experts, *_pointers(w1), inner2 // 2, *_pointers(w2),
        _ptr(mlp_bias), _ptr(h), _ptr(logits), _ptr(out), _CODES[dtype], torch.get_num_threads(),
    )  # fmt: skip
    if status == -2:
        raise ValueError(f"decode attention_out: chosen experts {chosen.tolist()} outside 0..{experts - 1}")
    if status < 0:
        raise MemoryError("decode attention_out: out of memory")
    return h, logits, None if status else out


# ---- attention while decoding ---------------------------------------------------------------------------------

_MASK_KINDS = {torch.bool: 1, torch.bfloat16: 2, torch.float32: 3}
# Up to this many query-key products per call (batch x kv heads x query groups x queries x positions) the C
# kernel runs, beyond it SDPA. Warm and alone SDPA's flash kernel wins on long rows, but while decoding (caches
# just evicted by the projections, the cache update in the same call) the C kernel won (docs/performance.md).
MAX_ATTENTION_PRODUCTS = 1 << 18


def mask_ok(mask: torch.Tensor | None) -> bool:
    """Whether the attention kernel reads this mask: None, or [B or 1, 1, T, S] of a kind it knows."""
    if mask is None:
        return True
    return mask.dtype in _MASK_KINDS and mask.dim() == 4 and mask.shape[1] == 1 and mask.stride(-1) == 1


def attention_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `attention` takes these (bf16 or fp32 on the CPU, no autograd, outside torch.compile, a few
    products)."""
    batch, kv_heads, groups, length, dim = query.shape
    return (
        query.dtype == key.dtype == value.dtype
        and query.dtype in _CODES
        and query.is_cpu
        and batch * kv_heads * groups * length * key.shape[2] <= MAX_ATTENTION_PRODUCTS
        and dim % 32 == 0
        and query.stride(-1) == key.stride(-1) == 1
        and key.stride() == value.stride()
        and mask_ok(mask)
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and _kernels.available()
    )


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    out: torch.Tensor | None = None,
    new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Softmax attention for decoding (see decode.c): query [B, Nkv, G, T, D] (G query heads per kv head; any
    strides, contiguous rows), key and value [B, Nkv, S, D] (views alike, such as a cache's), mask None or
    [B or 1, 1, T, S] ("may attend" booleans, or additive bf16/fp32) -> out [B, Nkv, G, T, D] (a new tensor, or
    `out`, any strides with contiguous rows). A query that may attend to nothing gets 0. `new` = (keys,
    values [B, Nkv, D] with contiguous rows of D per head, positions int64 [B]): written into key and value at
    those positions first (key and value must then be views of the buffers to update)."""
    batch, kv_heads, groups, length, dim = query.shape
    positions = key.shape[2]
    _check(
        "decode attention",
        attention_takes(query, key, value, mask)
        and tuple(key.shape) == tuple(value.shape) == (batch, kv_heads, positions, dim)
        and positions > 0
        and (mask is None or (mask.shape[0] in (1, batch) and tuple(mask.shape[2:]) == (length, positions)))
        and (out is None or (out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1)),
        f"query {tuple(query.shape)} {query.dtype}, key {tuple(key.shape)} {key.dtype}, value {tuple(value.shape)}, "
        f"mask {None if mask is None else (tuple(mask.shape), mask.dtype)}: bf16 or fp32 alike on the CPU, key and "
        "value [B, Nkv, S, D] alike, D a multiple of 32, mask [B or 1, 1, T, S], few enough products, no autograd",
    )
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype)
    new_rows = None
    if new is not None:
        keys, values, where = new
        _check(
            "decode attention",
            length == 1
            and tuple(keys.shape) == tuple(values.shape) == (batch, kv_heads, dim)
            and keys.dtype == values.dtype == query.dtype
            and keys.stride()[1:] == values.stride()[1:] == (dim, 1)
            and where.dtype == torch.int64
            and tuple(where.shape) == (batch,)
            and where.is_contiguous(),
            f"new keys {tuple(keys.shape)}, values {tuple(values.shape)}, positions {tuple(where.shape)} "
            f"{where.dtype}: one int64 position per row, rows of [Nkv, D] with contiguous heads",
        )
        new_rows = (_ptr(keys), keys.stride(0), _ptr(values), values.stride(0), where)
    run_attention(
        _ptr(query), query.stride()[:4], _ptr(key), _ptr(value), key.stride()[:3], mask, scale, _ptr(out),
        out.stride()[:4], (batch, kv_heads, groups, length, positions, dim), new_rows, query.dtype,
    )  # fmt: skip
    return out


def run_attention(query, query_strides, key, value, kv_strides, mask, scale, out, out_strides, sizes, new_rows, dtype):
    """The kernel call behind `attention`, on data pointers and element strides, for callers that checked their
    arguments (the C decoder layers: the engine's cache and their own buffers). sizes: (B, Nkv, G, T, S, D);
    new_rows: None or (keys pointer, its batch stride, values pointer, its batch stride, positions int64 [B]);
    dtype: the tensors' (bf16 or fp32)."""
    new_keys = new_values = new_positions = None
    new_keys_sb = new_values_sb = 0
    if new_rows is not None:
        new_keys, new_keys_sb, new_values, new_values_sb, where = new_rows
        new_positions = _ptr(where)
    mask_ptr, kind, mb, mt = None, 0, 0, 0
    if mask is not None:
        mask_ptr, kind = _ptr(mask), _MASK_KINDS[mask.dtype]
        mb, mt = (mask.stride(0) if mask.shape[0] > 1 else 0), mask.stride(2)
    strides = _int64_array(4)
    status = _library().jetmoe_decode_attention(
        query, strides(*query_strides), key, value, *kv_strides, mask_ptr, kind, mb, mt, out, strides(*out_strides),
        *sizes, scale, new_keys, new_keys_sb, new_values, new_values_sb, new_positions, _CODES[dtype],
        torch.get_num_threads(),
    )  # fmt: skip
    if status == -2:
        raise ValueError(f"decode attention: new positions {new_rows[4].tolist()} outside 0..{sizes[4] - 1}")
    if status < 0:
        raise MemoryError("decode attention: out of memory")


# ---- decoder layers one after another --------------------------------------------------------------------------
_POINTER_FIELDS = (
    "input_norm", "moa_router", "moa_bias", "post_norm", "mlp_router", "mlp_bias", "query_w", "kv_w", "output_w", "w1",
    "w2", "query_scale", "kv_scale", "output_scale", "w1_scale", "w2_scale", "keys", "values",
)  # fmt: skip


class LayerOperands(ctypes.Structure):
    """decode.c's jetmoe_layer: a decoder layer's weights and its cache's key/value buffers, by address."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in _POINTER_FIELDS),
        ("cache_sb", ctypes.c_int64), ("cache_sh", ctypes.c_int64), ("cache_ss", ctypes.c_int64),
        ("input_eps", ctypes.c_float), ("post_eps", ctypes.c_float), ("scale", ctypes.c_float),
    ]  # fmt: skip


class Sizes(NamedTuple):
    """What every layer of a stack shares: H, E (both routers), k, Nkv, D, I."""

    hidden: int
    experts: int
    top_k: int
    kv_heads: int
    head_dim: int
    inner: int


def layer_operands(
    weights: dict[str, torch.Tensor | Projection],
    eps: tuple[float, float],
    scale: float,
    keys: torch.Tensor,
    values: torch.Tensor,
    sizes: Sizes,
) -> LayerOperands:
    """A layer's LayerOperands, its shapes checked against `sizes`. weights: "input_norm", "moa_router",
    "moa_bias", "post_norm", "mlp_router", "mlp_bias" (bf16 or fp32 tensors, all alike) and "query" [E, A, H],
    "kv" [2A, H], "output" [E, H, A], "w1" [E, 2I, H], "w2" [E, H, I] (projections); keys and values: the
    layer's cache buffers [B, Nkv, S, D], views alike in that dtype. The caller keeps the tensors alive while
    the result is used."""
    hidden, experts, top_k, kv_heads, head_dim, inner = sizes
    width = kv_heads * head_dim
    vectors = [weights[name] for name in ("input_norm", "moa_bias", "post_norm", "mlp_bias")]
    routers = [weights[name] for name in ("moa_router", "mlp_router")]
    dtype = vectors[0].dtype
    _check(
        "decode layers",
        _contiguous(dtype, *vectors, *routers)
        and all(tuple(v.shape) == (hidden,) for v in vectors)
        and all(tuple(r.shape) == (experts, hidden) for r in routers)
        and _projection_ok(weights["query"], (experts, width, hidden), dtype)
        and _projection_ok(weights["kv"], (2 * width, hidden), dtype)
        and _projection_ok(weights["output"], (experts, hidden, width), dtype)
        and _projection_ok(weights["w1"], (experts, 2 * inner, hidden), dtype)
        and _projection_ok(weights["w2"], (experts, hidden, inner), dtype)
        and keys.dtype == values.dtype == dtype
        and keys.is_cpu
        and keys.dim() == 4
        and tuple(keys.shape) == tuple(values.shape)
        and keys.shape[1] == kv_heads
        and keys.shape[3] == head_dim
        and keys.stride() == values.stride()
        and keys.stride(3) == 1
        and hidden % 32 == 0
        and head_dim % 32 == 0
        and inner % 32 == 0
        and 1 <= top_k <= experts <= _MAX_EXPERTS,
        f"sizes {sizes}: norms, biases [H], routers [E, H], query [E, A, H], kv [2A, H], output [E, H, A], w1 "
        f"[E, 2I, H], w2 [E, H, I] (all bf16 or all fp32, projections also int8 with scales), caches [B, Nkv, S, D] "
        f"alike; got {dtype}, query "
        f"{tuple(weights['query'][0].shape)}, w1 {tuple(weights['w1'][0].shape)}, cache {tuple(keys.shape)}",
    )
    operands = LayerOperands(input_eps=eps[0], post_eps=eps[1], scale=scale)
    for name in ("input_norm", "moa_router", "moa_bias", "post_norm", "mlp_router", "mlp_bias"):
        setattr(operands, name, weights[name].data_ptr())
    for name in ("query", "kv", "output", "w1", "w2"):
        weight, row_scale = _pointers(weights[name])
        setattr(operands, f"{name}_w" if name in ("query", "kv", "output") else name, weight)
        setattr(operands, f"{name}_scale", row_scale)
    operands.keys, operands.values = keys.data_ptr(), values.data_ptr()
    operands.cache_sb, operands.cache_sh, operands.cache_ss = keys.stride()[:3]
    return operands


class HeadOperands(ctypes.Structure):
    """decode.c's jetmoe_head: the final norm and the output head that follow the last layer, by address."""

    _fields_ = [
        ("norm", ctypes.c_void_p), ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("vocab", ctypes.c_int64),
        ("eps", ctypes.c_float), ("dtype", ctypes.c_int),
    ]  # fmt: skip


def head_ok(norm: torch.Tensor, head: Projection | None, hidden: int) -> bool:
    """Whether run_layers takes this final norm weight [H] and output head [V, H] (or None): both in one of its
    dtypes (the head also int8 with a scale per row), on the CPU, contiguous."""
    return (
        _contiguous(norm.dtype, norm)
        and tuple(norm.shape) == (hidden,)
        and (head is None or (head[0].dim() == 2 and _projection_ok(head, (head[0].shape[0], hidden), norm.dtype)))
    )


def head_operands(norm: torch.Tensor, eps: float, head: Projection | None, hidden: int) -> HeadOperands:
    """The final norm's weight [H] and, unless None, the output head [V, H] (in the norm's dtype, or int8 with a
    scale per row) as run_layers takes them. The caller keeps the tensors alive while the result is used."""
    _check(
        "decode head",
        head_ok(norm, head, hidden),
        f"final norm [H] and head [V, H] (int8 with a scale [V]) alike, H = {hidden}; got norm "
        f"{tuple(norm.shape)} {norm.dtype}, head "
        f"{None if head is None else (tuple(head[0].shape), head[0].dtype)}",
    )
    weight, scale = _pointers(head) if head is not None else (None, None)
    vocab = 0 if head is None else head[0].shape[0]
    return HeadOperands(norm.data_ptr(), weight, scale, vocab, eps, _CODES[norm.dtype])


def run_layers(
    operands: ctypes.Array,
    first: int,
    sizes: Sizes,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    positions: int,
    new_positions: torch.Tensor,
    moa_logits: torch.Tensor,
    moe_logits: torch.Tensor,
    out: torch.Tensor,
    head: HeadOperands | None = None,
    logits: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Layers first.. of `operands` (LayerOperands whose caches hold `positions` positions or more, each with room
    at new_positions[b] for row b) on x [B, H], one new token a row: see decode.c `jetmoe_decode_layers`.
    cos, sin [B or 1, 1, D]; mask None or [B or 1, 1, 1, positions]; moa_logits, moe_logits fp32 [L, B, E]
    (written per layer); out [B, H]; x, cos, sin, out in the layers' dtype. Returns (status, layer): (0, L) done,
    `out` the last layer's output; (1, l) layer l's MoA routing is the caller's (`out` = its input); (2, l) its
    MoE routing is (`out` = h, attention and cache write done). With `head` (HeadOperands), a call that reaches
    the last layer leaves its final norm in `out` and, where the head has weights, out @ head^T in `logits` [B, V]
    (in the dtype)."""
    batch, hidden = x.shape
    count, dtype = len(operands), x.dtype
    _check(
        "decode layers",
        _contiguous(dtype, x, cos, sin, out)
        and hidden == sizes.hidden
        and tuple(out.shape) == (batch, hidden)
        and cos.shape == sin.shape
        and cos.dim() == 3
        and cos.shape[0] in (1, batch)
        and tuple(cos.shape[1:]) == (1, sizes.head_dim)
        and mask_ok(mask)
        and (mask is None or (mask.shape[0] in (1, batch) and tuple(mask.shape[2:]) == (1, positions)))
        and new_positions.dtype == torch.int64
        and tuple(new_positions.shape) == (batch,)
        and new_positions.is_contiguous()
        and all(t.dtype == torch.float32 and t.is_contiguous() for t in (moa_logits, moe_logits))
        and tuple(moa_logits.shape) == tuple(moe_logits.shape) == (count, batch, sizes.experts)
        and batch * sizes.top_k <= MAX_SLOTS
        and 0 <= first < count
        and (head is None or head.dtype == _CODES[dtype])
        and (head is None or not head.w or (logits is not None and _contiguous(dtype, logits)
                                            and tuple(logits.shape) == (batch, head.vocab))),
        f"x {tuple(x.shape)}, cos {tuple(cos.shape)}, mask {None if mask is None else tuple(mask.shape)}, "
        f"positions {positions}, new positions {tuple(new_positions.shape)} {new_positions.dtype}, logits "
        f"{tuple(moa_logits.shape)}, first layer {first} of {count}: bf16 or fp32 [B, H], [B or 1, 1, D], "
        f"[B or 1, 1, 1, positions], int64 [B], fp32 [L, B, E], at most {MAX_SLOTS} slots, logits [B, V] for a head",
    )
    mask_ptr, kind, mb = None, 0, 0
    if mask is not None:
        mask_ptr, kind, mb = _ptr(mask), _MASK_KINDS[mask.dtype], (mask.stride(0) if mask.shape[0] > 1 else 0)
    stopped = ctypes.c_int64(count)
    status = _library().jetmoe_decode_layers(
        ctypes.addressof(operands), first, count, _ptr(x), batch, hidden, sizes.experts, sizes.top_k, sizes.kv_heads,
        sizes.head_dim, sizes.inner, _ptr(cos), _ptr(sin), sizes.head_dim if cos.shape[0] > 1 else 0, mask_ptr, kind,
        mb, positions, _ptr(new_positions), _ptr(moa_logits), _ptr(moe_logits), _ptr(out),
        None if head is None else ctypes.addressof(head), None if logits is None else _ptr(logits),
        ctypes.addressof(stopped), _CODES[dtype], torch.get_num_threads(),
    )  # fmt: skip
    if status == -3:
        raise ValueError(f"decode layers: new positions {new_positions.tolist()} outside 0..{positions - 1}")
    if status == -2:
        raise ValueError(f"decode layers: layer {stopped.value}'s chosen experts outside 0..{sizes.experts - 1}")
    if status < 0:
        raise MemoryError("decode layers: out of memory")
    return status, stopped.value
