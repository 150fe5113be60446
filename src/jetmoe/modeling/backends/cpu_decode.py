"""The CPU backend's decoder steps: a decoder layer while decoding on the CPU (bf16 or fp32, weights alike or int8) in C: two calls around attention.

The operator path of a decoding layer is ~45 PyTorch calls around its 7 weight products, whose overhead costs
about as much as the products themselves (docs/performance.md). `layer_forward` runs the same steps through
ops/native/decode.c: one call from the layer's input to the rotated queries and keys; the cache update and
attention (one C call for the engine's cache, which lets its caller write the new rows; `cache.update` and
the attention implementation otherwise); one call from the attention output to the layer's output. The
results are the operator path's bit for bit (each step is the kernel that path runs, the decoding attention
kernel included; tests/modeling/test_native_decode.py checks the whole model). Where a router's choice would
hang on a tie or a non-finite logit, that part of the layer runs the operator path.

For a decoding step with one new token a row and a cache the C calls can write into (`decode_buffers`: the
engine's, and the model's own JetMoeCache), `layers_forward` runs all the layers in one C call: the same steps,
without returning to Python between layers (docs/performance.md).

It runs for CPU inference in bf16 or fp32 outside torch.compile, up to MAX_TOKENS tokens (a decoding batch) and
MAX_SLOTS slots, where the operator path runs all of a layer's products through the same C kernels, for layers whose
modules are the model's own with weights in the activations' dtype, or int8 projections from
generation/quantize.py (not other replacements), SiLU experts and widths the kernels take. The slots are
grouped by expert as the sorted plan groups them, so each expert's weights are read once.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

from ...ops import dense, grouped_matmul, native
from ...ops.dense import Linear
from ...ops.native import decode as kernels
from ..experts import ParallelExperts
from ..int8 import Int8Linear, Int8ParallelExperts
from ..norm_rotary import JetMoeRMSNorm


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


_INT8_TYPES = {_DENSE: Int8Linear, _EXPERTS: Int8ParallelExperts}


def _operand(module, role: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, None) for a float module, (int8 weight, scale) for an int8 projection, None for anything else."""
    kind = type(module)
    if (role == _NORM and kind is JetMoeRMSNorm) or (role == _EXPERTS and kind is ParallelExperts):
        return module._parameters["weight"], None
    if role in (_ROUTER, _DENSE) and kind is Linear:
        return (module._parameters["weight"], None) if module.bias is None else None
    if kind is _INT8_TYPES.get(role) and getattr(module, "bias", None) is None:
        return module._buffers["weight_int8"], module._buffers["scale"]
    return None


class _Layer(NamedTuple):
    """What the two C calls need from a layer: (weight, scale or None) per module in _PARTS order, the MoA and
    MoE biases, and a few sizes."""

    operands: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]
    tensors: tuple[torch.Tensor, ...]  # every tensor the C calls read, operands and biases
    dtype: torch.dtype  # of the activations, the norms, routers and biases (bf16 or fp32)
    moa_bias: torch.Tensor
    mlp_bias: torch.Tensor
    input_eps: float
    post_eps: float
    top_k: int
    kv_heads: int
    head_dim: int


class _Cache:
    """A module's cached C-call inputs, left out of its copies and pickles (a copy starts without one): they hold
    addresses (ctypes structs cannot be pickled) and guards on the original's objects."""

    __slots__ = ("value",)

    def __init__(self, value=None):
        self.value = value

    def __reduce__(self):
        return _Cache, ()

    def __deepcopy__(self, memo):
        return _Cache()


def _cache_get(module, key: str):
    holder = module.__dict__.get(key)
    return None if holder is None else holder.value


def _cache_set(module, key: str, value) -> None:
    module.__dict__[key] = _Cache(value)


def _prepare(layer) -> _Layer | None:
    """The layer's C-call inputs, or None where the C calls do not take this layer. Cached on the layer with
    guards: every module and tensor on the way, by identity where it is stored (`_modules`, `_parameters`,
    `_buffers`), and the tensors' dtypes and addresses (`.to()` there and back keeps the Parameter objects but
    moves their storage); rebuilt, as a new object, when any guard fails. Checking the guards costs about half
    of walking the modules again."""
    cached = _cache_get(layer, "_native_decode")  # (stores, names, held, tensors, dtypes, addresses, prepared)
    if cached is not None:
        stores, names, held, tensors, dtypes, addresses, prepared = cached
        if (  # map() over C functions: much cheaper than generator expressions, in every layer and step
            all(map(operator.is_, map(dict.get, stores, names), held))
            and all(map(operator.is_, map(_dtype_of, tensors), dtypes))
            and list(map(_data_ptr, tensors)) == addresses
        ):
            return prepared
    modules, operands, guards = [], [], {}
    for path, role in _PARTS:
        module = layer
        for name in path:  # `_modules[name]`, not nn.Module's slower attribute lookup: runs in every layer and step
            guards[id(module._modules), name] = (module._modules, name, module._modules[name])
            module = module._modules[name]
        operand = _operand(module, role)
        if operand is None:
            return None
        for store, name in _stored(module, operand):
            guards[id(store), name] = (store, name, store.get(name))
        modules.append(module)
        operands.append(operand)
    attention, mlp = layer._modules["self_attention"], layer._modules["mlp"]
    for owner in (attention._modules["experts"], mlp):
        guards[id(owner._parameters), "bias"] = (owner._parameters, "bias", owner._parameters["bias"])
    biases = (attention._modules["experts"]._parameters["bias"], mlp._parameters["bias"])
    tensors = [t for operand in operands for t in operand if t is not None] + list(biases)
    moa = attention.experts
    dtype = operands[0][0].dtype  # the input norm's
    ok = (
        dtype in _DTYPES
        and all(t.is_cpu and t.is_contiguous() for t in tensors)
        and all(
            weight.dtype == (dtype if scale is None else torch.int8) and (scale is None or scale.dtype == dtype)
            for weight, scale in operands
        )
        and all(b.dtype == dtype for b in biases)
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
            tuple(operands), tuple(tensors), dtype, *biases, modules[0].variance_epsilon, modules[5].variance_epsilon,
            attention.top_k, attention.num_key_value_heads, attention.head_dim,
        )  # fmt: skip
    stores, names, held = zip(*guards.values())
    dtypes, addresses = tuple(t.dtype for t in tensors), [t.data_ptr() for t in tensors]
    _cache_set(layer, "_native_decode", (stores, names, held, tuple(tensors), dtypes, addresses, prepared))
    return prepared


_dtype_of = operator.attrgetter("dtype")
_DTYPES = (torch.bfloat16, torch.float32)
_data_ptr = torch.Tensor.data_ptr


def _stored(module, operand) -> list[tuple[dict, str]]:
    """Where `_operand` found the module's tensors (and that a dense layer has no bias)."""
    if operand[1] is not None:  # an int8 projection
        return [(module._buffers, "weight_int8"), (module._buffers, "scale")]
    stored = [(module._parameters, "weight")]
    if "bias" in module._parameters:
        stored.append((module._parameters, "bias"))
    return stored


# Up to this many tokens and slots the operator path runs every product of a layer through the C kernel the
# C calls use (dense layers: ops/dense.py; expert products: ops/grouped_matmul.py), so the two agree bit for
# bit; beyond, it takes other kernels (oneDNN), and so does a prompt.
MAX_TOKENS = dense.DENSE_GEMV_MAX_ROWS
MAX_SLOTS = min(grouped_matmul.EXPERT_GEMV_MAX_ROWS, kernels.MAX_SLOTS)


def _tokens_taken(hidden_states: torch.Tensor, output_attentions: bool) -> int:
    """The number of tokens where the C calls may take these hidden states (CPU inference in bf16 or fp32,
    outside torch.compile, 1..MAX_TOKENS tokens), else 0."""
    if (
        output_attentions
        or hidden_states.dtype not in _DTYPES
        or not hidden_states.is_cpu
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
    ):
        return 0
    tokens = hidden_states.numel() // max(hidden_states.shape[-1], 1)
    return tokens if 0 < tokens <= MAX_TOKENS and native.available() else 0


def applicable(layer, hidden_states: torch.Tensor, output_attentions: bool) -> _Layer | None:
    """The layer's C-call inputs where `layer_forward` takes this call (CPU inference in bf16 or fp32 with
    weights alike, outside torch.compile, at most MAX_TOKENS tokens and MAX_SLOTS slots), else None."""
    tokens = _tokens_taken(hidden_states, output_attentions)
    prepared = _prepare(layer) if tokens else None
    if prepared is None or tokens * prepared.top_k > MAX_SLOTS or prepared.dtype != hidden_states.dtype:
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
        key_buffer.dtype != queries.dtype
        or value_buffer.dtype != queries.dtype
        or value_buffer.stride() != key_buffer.stride()
        or batch * heads_k * view > kernels.MAX_ATTENTION_PRODUCTS
        or not kernels.mask_ok(mask)
        or (mask is not None and (mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != (1, view)))
    ):
        return None  # the operator path takes SDPA for these too
    attended = torch.empty(batch * k, width, dtype=queries.dtype)
    # query (b, h, j) is queries[b, 0, j * Nkv + h]; its output goes to attended[b * k + j, h * D:]
    slot_strides = (heads_k * head_dim, head_dim, width, heads_k * head_dim)
    values = projected_kv.data_ptr() + width * projected_kv.element_size()  # the second half of each row
    new_rows = (keys.data_ptr(), width, values, 2 * width, positions)
    kernels.run_attention(
        queries.data_ptr(), slot_strides, key_buffer.data_ptr(), value_buffer.data_ptr(), key_buffer.stride()[:3],
        mask, attention.scaling, attended.data_ptr(), slot_strides, (batch, kv_heads, k, 1, view, head_dim), new_rows,
        queries.dtype,
    )  # fmt: skip
    cache.decode_written(attention.layer_idx)
    return attended


def layers_forward(
    layers, hidden_states, position_embeddings, attention_mask, cache, router_logits: bool = True, norm=None, head=None
):
    """JetMoeModel's loop over its layers for a decoding step of one new token a row, as one C call for all the
    layers (ops/native/decode.py `run_layers`): the per-layer calls above, without returning to Python between
    layers. For a cache with `decode_buffers` (the engine's, the model's own) where every layer takes
    `layer_forward`'s one-call attention. A layer whose routing is not decided in C runs its own forward (or
    its MoE) and the call resumes after it. Returns (output [B, 1, H], router logits: MoA and MoE per layer, or
    [] unless `router_logits`), or None where this does not apply (the caller runs the layers one by one). The
    values are the layers' own, bit for bit. A boolean mask is read as is (the C kernel takes it as SDPA's
    additive form, with the same scores).
    With `norm` (the model's final norm) the output is norm(last layer's output); with `head` as well (the output
    head), head(norm(...)) [B, 1, V]: in the same C call where it takes the two modules (the model's own, or an
    int8 head), else through the modules, with the same values."""
    if hidden_states.dim() != 3 or hidden_states.shape[1] != 1 or not _tokens_taken(hidden_states, False):
        return None
    batch, _, hidden = hidden_states.shape
    if (
        len(layers) == 0
        or getattr(cache, "decode_buffers", None) is None
        or (layers[0]._modules["self_attention"].config._attn_implementation or "sdpa") != "sdpa"
        or _hooked(layers)
    ):
        return None
    prepared, buffers = [], []
    for index, layer in enumerate(layers):
        operands = _prepare(layer)
        if operands is None or batch * operands.top_k > MAX_SLOTS or operands.dtype != hidden_states.dtype:
            return None
        layer_buffers = cache.decode_buffers(index)
        if layer_buffers is None:
            return None
        prepared.append(operands)
        buffers.append(layer_buffers)
    stack = _stack(layers, prepared, buffers)
    _, _, positions, view = buffers[0]
    if (
        stack is None
        or any(b[2] is not positions or b[3] != view for b in buffers)
        or batch * stack.sizes.top_k * stack.sizes.kv_heads * view > kernels.MAX_ATTENTION_PRODUCTS
        or not kernels.mask_ok(attention_mask)
        or (attention_mask is not None and attention_mask.shape[0] not in (1, batch))
        or (attention_mask is not None and tuple(attention_mask.shape[2:]) != (1, view))
    ):
        return None  # the layers one by one: their own checks send these to the operator path
    cos, sin = (t.contiguous() for t in position_embeddings)
    count, experts = len(layers), stack.sizes.experts
    moa_logits = torch.empty(count, batch, experts, dtype=torch.float32)
    moe_logits = torch.empty(count, batch, experts, dtype=torch.float32)
    logits_out: list[torch.Tensor] = []
    x, out = hidden_states.reshape(batch, hidden).contiguous(), torch.empty(batch, hidden, dtype=hidden_states.dtype)
    final = _final(norm, head, hidden_states.dtype, hidden) if norm is not None else None
    head_logits = torch.empty(batch, final.vocab, dtype=hidden_states.dtype) if final is not None and final.w else None
    first, status = 0, -1
    while first < count:
        status, stopped = kernels.run_layers(
            stack.operands, first, stack.sizes, x, cos, sin, attention_mask, view, positions, moa_logits, moe_logits,
            out, final, head_logits,
        )  # fmt: skip
        for index in range(first, stopped + (status == 2)):  # the layers whose new K/V rows are written
            cache.decode_written(index)
        for index in range(first, stopped) if router_logits else ():
            logits_out += [moa_logits[index], moe_logits[index]]
        if status == 0:
            x = out
            break
        layer, h = layers[stopped], out.view(batch, 1, hidden).clone()
        if status == 1:  # the MoA's routing: the layer's own forward decides
            h, _, logits = layer(h, position_embeddings, attention_mask=attention_mask, cache=cache)
        else:  # the MoE's routing: the operator path's MoE on h
            mlp_out, moe = layer.mlp(layer.post_attention_layernorm(h))
            h, logits = h + mlp_out, (moa_logits[stopped], moe)
        logits_out += list(logits) if router_logits else []
        x, first = h.reshape(batch, hidden).contiguous(), stopped + 1
    x = x.view(batch, 1, hidden)
    if final is None or status != 0:  # what the C call did not apply (the last layer ran in Python, or no C head)
        x = norm(x) if norm is not None else x
        return (head(x) if head is not None else x), logits_out
    return (head_logits.view(batch, 1, -1) if head is not None else x), logits_out


def _final(norm, head, dtype: torch.dtype, hidden: int) -> kernels.HeadOperands | None:
    """The final norm and (unless None) the output head as the C call takes them, or None where it does not take
    them: modules other than the model's own (or an int8 head), another dtype. Cached on the norm module while
    the same tensors, at the same addresses, are its and the head's."""
    norm_operand = _operand(norm, _NORM)
    head_operand = _operand(head, _DENSE) if head is not None else (None, None)
    if norm_operand is None or head_operand is None:
        return None
    tensors = [t for t in (norm_operand[0], *head_operand) if t is not None]
    addresses = [t.data_ptr() for t in tensors]
    cached = _cache_get(norm, "_native_decode_head")  # (tensors, addresses, dtype, eps, operands)
    if (
        cached is not None
        and len(cached[0]) == len(tensors)
        and all(map(operator.is_, cached[0], tensors))
        and cached[1:4] == (addresses, dtype, norm.variance_epsilon)
    ):
        return cached[4]
    projection = head_operand if head is not None else None
    operands = None
    if norm_operand[0].dtype == dtype and kernels.head_ok(norm_operand[0], projection, hidden):
        operands = kernels.head_operands(norm_operand[0], norm.variance_epsilon, projection, hidden)
    _cache_set(norm, "_native_decode_head", (tensors, addresses, dtype, norm.variance_epsilon, operands))
    return operands


def _hooked(layers) -> bool:
    """Whether calling the layers runs hooks (theirs or global ones): then they must be called one by one."""
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks) or any(
        layer._forward_hooks or layer._forward_pre_hooks for layer in layers
    )


class _Stack(NamedTuple):
    operands: object  # ctypes array of kernels.LayerOperands
    sizes: kernels.Sizes


def _stack(layers, prepared: list[_Layer], buffers: list[tuple]) -> _Stack | None:
    """The layers' LayerOperands for these prepared inputs and cache buffers, cached on the layer list (rebuilt
    when any of them changes); None where the layers differ in their sizes or the caches' dtype is not theirs."""
    # The structs hold addresses: of the weights (`_prepare` returns a new object when any of them moved) and of
    # the cache buffers.
    buffer_key = tuple((b[0].data_ptr(), b[1].data_ptr(), b[0].shape, b[0].stride(), b[1].stride()) for b in buffers)
    cached = _cache_get(layers, "_native_decode_stack")  # ((prepared, buffer_key), stack)
    if (
        cached is not None
        and len(cached[0][0]) == len(prepared)
        and all(a is b for a, b in zip(cached[0][0], prepared))
        and cached[0][1] == buffer_key
    ):
        return cached[1]
    key = (tuple(prepared), buffer_key)
    stack = None
    sizes = {_sizes(p) for p in prepared}
    scales = {layer._modules["self_attention"].scaling for layer in layers}
    dtype = prepared[0].dtype
    if len(sizes) == 1 and len(scales) == 1 and all(b[0].dtype == b[1].dtype == dtype for b in buffers):
        (sizes,), (scale,) = sizes, scales
        structs = [
            kernels.layer_operands(_weights(p), (p.input_eps, p.post_eps), scale, b[0], b[1], sizes)
            for p, b in zip(prepared, buffers)
        ]
        stack = _Stack((kernels.LayerOperands * len(structs))(*structs), sizes)
    _cache_set(layers, "_native_decode_stack", (key, stack))
    return stack


def _sizes(p: _Layer) -> kernels.Sizes:
    input_norm, moa_router, _, _, _, _, _, _, w2 = p.operands
    return kernels.Sizes(
        input_norm[0].shape[0], moa_router[0].shape[0], p.top_k, p.kv_heads, p.head_dim, w2[0].shape[-1]
    )


def _weights(p: _Layer) -> dict:
    input_norm, moa_router, query, kv, output, post_norm, mlp_router, w1, w2 = p.operands
    return dict(
        input_norm=input_norm[0], moa_router=moa_router[0], query=query, kv=kv, output=output, post_norm=post_norm[0],
        mlp_router=mlp_router[0], w1=w1, w2=w2, moa_bias=p.moa_bias, mlp_bias=p.mlp_bias,
    )  # fmt: skip
