"""JetMoE as a vLLM model: `JetMoeForCausalLM` for vLLM's engine, registered by `jetmoe.integrations.vllm_plugin`.

Imported by vLLM only (it imports vLLM). Layout of one decoder layer:

- Mixture of attention (MoA): the MoA router picks top-k experts per token; each chosen expert's query
  projection ("map") runs as a grouped product over rows sorted by expert (jetmoe's `grouped_linear`, a custom
  op torch.compile traces through); vLLM's `Attention` then sees `num_key_value_heads * top_k` query heads in
  (kv head, slot) order over the `num_key_value_heads` real K/V heads, so the paged cache holds only those and
  vLLM's GQA does the sharing (the reference tiles K/V instead). The chosen experts' output projections
  ("reduce") run grouped again, are weighted by the gates, summed per token, and the MoA bias is added once.
- Mixture of MLP experts: vLLM's `FusedMoE` (softmax over the top-k router logits = renormalised top-k;
  w13 = `input_linear`'s gate half then up half; w2 = `output_linear`), then the MLP bias.

Tensor parallelism: K/V (`MergedColumnParallelLinear`), the expert query projections and the MoA output
projections are split by K/V head across ranks (each rank holds `num_key_value_heads / tp` K/V heads and their
`top_k` query heads per token); the MoA output is all-reduced before its bias; FusedMoE splits the MLP experts'
intermediate dimension; embeddings and head are vocab-parallel; routers and norms are replicated.
"""

# No `from __future__ import annotations`: vLLM reads the forward signatures' types at run time.

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.utils import set_weight_attrs
from vllm.sequence import IntermediateTensors

from ..configuration import JetMoeConfig
from ..ops.grouped_matmul import grouped_linear

logger = init_logger(__name__)

# The reference builds its per-layer norms without eps (so always 1e-6); only the final norm reads the config.
_LAYER_NORM_EPS = 1e-6


def jetmoe_config(config) -> JetMoeConfig:
    """The checkpoint's config as jetmoe reads it (original JetMoE key names mapped), whatever class vLLM built."""
    if isinstance(config, JetMoeConfig):
        return config
    fields = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "num_attention_heads"):
        fields.pop(key, None)
    return JetMoeConfig(**fields)


def checkpoint_shapes(config: JetMoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF-format JetMoE checkpoint and its full (unsharded) shape."""
    H, E, I = config.hidden_size, config.num_local_experts, config.intermediate_size
    kv = config.num_key_value_heads * config.kv_channels
    shapes = {"model.embed_tokens.weight": (config.vocab_size, H), "model.norm.weight": (H,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, H)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (H,),
                p + "post_attention_layernorm.weight": (H,),
                p + "self_attention.kv_proj.weight": (2 * kv, H),
                p + "self_attention.experts.router.layer.weight": (E, H),
                p + "self_attention.experts.input_linear.weight": (E, kv, H),
                p + "self_attention.experts.output_linear.weight": (E, H, kv),
                p + "self_attention.experts.bias": (H,),
                p + "mlp.router.layer.weight": (E, H),
                p + "mlp.input_linear.weight": (E, 2 * I, H),
                p + "mlp.output_linear.weight": (E, H, I),
                p + "mlp.bias": (H,),
            }
        )
    return shapes


def _sharded_loader(dim: int):
    """Weight loader of an expert projection split by K/V head along `dim` across tensor-parallel ranks."""

    def load(param: torch.Tensor, loaded: torch.Tensor) -> None:
        size = param.shape[dim]
        param.data.copy_(loaded.narrow(dim, get_tensor_model_parallel_rank() * size, size))

    return load


class _Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, prefix: str):
        super().__init__()
        self.layer = ReplicatedLinear(hidden_size, num_experts, bias=False, prefix=f"{prefix}.layer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0]


def _route(logits: torch.Tensor, top_k: int, num_experts: int, dtype: torch.dtype):
    """The reference's gating (softmax over the top-k fp32 logits, gates in the model dtype), with the
    (token, slot) pairs sorted by expert: (order, token of each sorted row, sorted gates, int32 group ends)."""
    top_logits, experts = logits.float().topk(top_k, dim=1)
    gates = torch.softmax(top_logits, dim=1).to(dtype).flatten()
    experts = experts.flatten()
    order = torch.argsort(experts, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=logits.device)
    counts.index_add_(0, experts, torch.ones_like(experts))
    return order, order // top_k, gates[order], counts.cumsum(0).to(torch.int32)


class JetMoeAttentionExperts(nn.Module):
    """The MoA's router, per-expert query ("map") and output ("reduce") projections, and its bias."""

    def __init__(self, config: JetMoeConfig, local_kv: int, prefix: str):
        super().__init__()
        H, E = config.hidden_size, config.num_local_experts
        self.top_k, self.num_experts = config.num_experts_per_tok, E
        self.router = _Router(H, E, f"{prefix}.router")
        dtype = torch.get_default_dtype()
        self.input_linear = nn.Module()
        self.input_linear.weight = nn.Parameter(torch.empty(E, local_kv, H, dtype=dtype), requires_grad=False)
        set_weight_attrs(self.input_linear.weight, {"weight_loader": _sharded_loader(1)})
        self.output_linear = nn.Module()
        self.output_linear.weight = nn.Parameter(torch.empty(E, H, local_kv, dtype=dtype), requires_grad=False)
        set_weight_attrs(self.output_linear.weight, {"weight_loader": _sharded_loader(2)})
        self.bias = nn.Parameter(torch.empty(H, dtype=dtype), requires_grad=False)

    def map(self, x: torch.Tensor):
        """Queries [N, top_k, local_kv] in slot order, and the routing that `reduce` reuses."""
        routing = _route(self.router(x), self.top_k, self.num_experts, x.dtype)
        order, tokens, _, ends = routing
        sorted_q = grouped_linear(x[tokens], self.input_linear.weight, ends)
        q = torch.empty_like(sorted_q)
        q[order] = sorted_q
        return q.view(x.shape[0], self.top_k, -1), routing

    def reduce(self, o: torch.Tensor, routing) -> torch.Tensor:
        """o [N, top_k, local_kv] in slot order -> the gated sum of the chosen experts' outputs [N, H] (no bias)."""
        order, tokens, gates, ends = routing
        rows = grouped_linear(o.reshape(-1, o.shape[-1])[order], self.output_linear.weight, ends)
        rows = rows * gates[:, None]
        out = rows.new_zeros(o.shape[0], rows.shape[1])
        return out.index_add_(0, tokens, rows)


class JetMoeAttention(nn.Module):
    def __init__(self, config: JetMoeConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        if config.num_key_value_heads % tp:
            raise ValueError(
                f"JetMoE on vLLM: num_key_value_heads ({config.num_key_value_heads}) must be divisible by the "
                f"tensor-parallel size ({tp})"
            )
        self.head_dim, self.top_k = config.kv_channels, config.num_experts_per_tok
        self.local_heads = config.num_key_value_heads // tp
        local_kv = self.local_heads * self.head_dim
        self.tp = tp
        self.kv_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.num_key_value_heads * self.head_dim] * 2,
            bias=False,
            prefix=f"{prefix}.kv_proj",
        )
        self.experts = JetMoeAttentionExperts(config, local_kv, f"{prefix}.experts")
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            is_neox_style=True,
            rope_parameters=config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
        )
        self.attn = Attention(
            self.local_heads * self.top_k,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.local_heads,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n, heads, k = x.shape[0], self.local_heads, self.top_k
        q, routing = self.experts.map(x)  # [N, k, heads * D]: head h of slot j
        # vLLM's GQA gives query head i the K/V head i // k: order the query heads (kv head, slot).
        q = q.view(n, k, heads, self.head_dim).transpose(1, 2).reshape(n, -1)
        key, value = self.kv_proj(x)[0].chunk(2, dim=-1)
        q, key = self.rotary_emb(positions, q, key)
        o = self.attn(q, key, value)
        o = o.view(n, heads, k, self.head_dim).transpose(1, 2).reshape(n, k, -1)
        y = self.experts.reduce(o, routing)
        if self.tp > 1:
            y = tensor_model_parallel_all_reduce(y)
        return y + self.experts.bias


class JetMoeMoE(nn.Module):
    """Mixture of GLU MLP experts through vLLM's FusedMoE, then the (ungated) output bias."""

    def __init__(self, config: JetMoeConfig, prefix: str):
        super().__init__()
        self.router = _Router(config.hidden_size, config.num_local_experts, f"{prefix}.router")
        self.experts = FusedMoEFactory(
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            renormalize=True,
            activation=config.activation_function,
            reduce_results=True,
            prefix=f"{prefix}.experts",
        )
        self.bias = nn.Parameter(torch.empty(config.hidden_size, dtype=torch.get_default_dtype()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states=x, router_logits=self.router(x)) + self.bias


class JetMoeDecoderLayer(nn.Module):
    def __init__(self, config: JetMoeConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=_LAYER_NORM_EPS)
        self.self_attention = JetMoeAttention(config, vllm_config, f"{prefix}.self_attention")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=_LAYER_NORM_EPS)
        self.mlp = JetMoeMoE(config, f"{prefix}.mlp")

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attention(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile
class JetMoeModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = jetmoe_config(vllm_config.model_config.hf_config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            JetMoeDecoderLayer(config, vllm_config, f"{prefix}.layers.{i}") for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class JetMoeForCausalLM(nn.Module):
    """vLLM's JetMoE causal LM over HF-format checkpoints (architecture `JetMoeForCausalLM`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = config = jetmoe_config(vllm_config.model_config.hf_config)
        self.model = JetMoeModel(vllm_config=vllm_config, prefix=_join(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=_join(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF checkpoint tensors -> this model's (sharded) parameters. A tensor the model expects that is
        missing, or one of the wrong shape, is a ValueError naming it; tensors the model lacks are skipped."""
        expected = checkpoint_shapes(self.config)
        params = dict(self.named_parameters())
        seen, problems, loaded = set(), [], set()
        for name, tensor in weights:
            if name not in expected:
                if name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
                    continue  # a tied head written anyway; rotary tables are recomputed
                logger.warning("JetMoE checkpoint tensor %s is not part of the model; skipped", name)
                continue
            seen.add(name)
            if tuple(tensor.shape) != expected[name]:
                problems.append(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {expected[name]}")
                continue
            loaded.update(self._load_one(name, tensor, params))
        problems += [f"{name}: missing from the checkpoint (expected shape {expected[name]})"
                     for name in sorted(expected.keys() - seen)]
        if problems:
            raise ValueError("JetMoE checkpoint does not match the model:\n  " + "\n  ".join(problems))
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        return loaded

    def _load_one(self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]) -> list[str]:
        if name.endswith(("mlp.input_linear.weight", "mlp.output_linear.weight")):
            return self._load_mlp_experts(name, tensor, params)
        param = params[name]
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        return [name]

    def _load_mlp_experts(self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]) -> list[str]:
        prefix = name.rsplit(".", 2)[0]  # model.layers.{i}.mlp
        size = self.config.intermediate_size
        if name.endswith("input_linear.weight"):  # [E, 2I, H]: rows [0, I) gate (w1), [I, 2I) up (w3)
            target = "w13_weight"
            shards = [("w1", lambda e: tensor[e, :size]), ("w3", lambda e: tensor[e, size:])]
        else:  # [E, H, I]
            target = "w2_weight"
            shards = [("w2", lambda e: tensor[e])]
        # FusedMoE's parameters sit below its runner (e.g. `mlp.experts.routed_experts.w13_weight`).
        (target,) = [key for key in params if key.startswith(f"{prefix}.experts.") and key.endswith("." + target)]
        param = params[target]
        for expert in range(tensor.shape[0]):
            for shard_id, piece in shards:
                param.weight_loader(param, piece(expert), target, shard_id=shard_id, expert_id=expert)
        return [target]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
