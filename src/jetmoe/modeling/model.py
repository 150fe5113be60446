"""JetMoeModel, JetMoeForCausalLM, JetMoeForSequenceClassification: the seed's classes on transformers' framework."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.utils import logging

from ..configuration import JetMoeConfig
from ..ops.attention import additive_inference_mask
from ..ops.cross_entropy import summed_cross_entropy
from ..ops import tied_embedding
from ..ops.dense import Linear
from .attention import JetMoeAttention, JetMoeMoA
from .cache import JetMoeCache
from .experts import ParallelExperts
from . import loading
from .backends import backend_for
from .mlp import JetMoeMoE
from .norm_rotary import JetMoeRMSNorm, JetMoeRotaryEmbedding
from .routing import experts_per_token, reference_balancing_loss, switch_balancing_loss

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the outputs' `past_key_values` field to `cache`; write whichever this version has.
_CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


_MASK_PARAMETERS = inspect.signature(create_causal_mask).parameters


def causal_mask(config, inputs_embeds, attention_mask, cache, position_ids, cache_position):
    """transformers' mask builder for the configured attention backend (its signature changed within 5.x)."""
    kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids)
    kwargs["cache" if "cache" in _MASK_PARAMETERS else "past_key_values"] = cache
    if "cache_position" in _MASK_PARAMETERS:
        kwargs["cache_position"] = cache_position
    return create_causal_mask(**kwargs)


def _has_hooks(module: nn.Module) -> bool:
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    global_hooks = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks,
                    nn.modules.module._global_backward_hooks, nn.modules.module._global_backward_pre_hooks)
    return any(map(len, hooks + global_hooks))


def select_positions(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions whose logits are wanted: int n = the last n (0 = all); 1-D tensor = those positions;
    2-D integer tensor = per-sample positions; 2-D bool tensor = the True positions, flattened to [n, H]."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden_states[logits_to_keep]
        return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        logits_to_keep = slice(-logits_to_keep, None)
    return hidden_states[:, logits_to_keep, :]


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy in fp32, as transformers' causal LM loss: position t predicts labels[t + 1]
    (or shift_labels[t]); mean over counted positions, or sum / num_items_in_batch when that is given.

    Computed by ops.summed_cross_entropy, which keeps no fp32 copy of the logits for backward.
    """
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    targets = shift_labels.reshape(-1).to(flat_logits.device)
    total = summed_cross_entropy(flat_logits, targets, ignore_index)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class JetMoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: h += MoA(norm(h)); h += MoE(norm(h))."""

    def __init__(self, config: JetMoeConfig, layer_idx: int):
        super().__init__()
        # The reference builds both per-layer norms with the default eps (1e-6), whatever rms_norm_eps says;
        # checkpoints were trained that way, so we keep it. Only the final norm reads config.rms_norm_eps.
        self.input_layernorm = JetMoeRMSNorm(config.hidden_size)
        self.self_attention = JetMoeAttention(config, layer_idx)
        self.post_attention_layernorm = JetMoeRMSNorm(config.hidden_size)
        self.mlp = JetMoeMoE(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        args = (hidden_states, position_embeddings, attention_mask, cache, output_attentions)
        done = backend_for(hidden_states).decoder_layer(self, *args, **kwargs)
        if done is not None:  # the backend's whole-layer step (the same values as the modules')
            return done
        attn_out, attn_probs, moa_logits = self.self_attention(
            self.input_layernorm(hidden_states),
            position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            output_attentions=output_attentions,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out
        mlp_out, moe_logits = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + mlp_out, attn_probs, (moa_logits, moe_logits)


class JetMoePreTrainedModel(PreTrainedModel):
    config: JetMoeConfig
    config_class = JetMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["JetMoeDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    # Heads that legitimately start fresh when a checkpoint of another head type is loaded.
    _fresh_head_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, checked: a mis-shaped tensor or a missing weight is an error naming the key
        (unless `ignore_mismatched_sizes=True` / `output_loading_info=True` ask for transformers' behaviour),
        and CPU weights get aligned private copies (`align_cpu_weights`, default True). See modeling/loading.py.
        """
        return loading.from_pretrained(super().from_pretrained, cls._fresh_head_prefixes, *args, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ParallelExperts):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (JetMoeMoA, JetMoeMoE)):
            init.zeros_(module.bias)


def _pop_cache(past_key_values: Cache | None, kwargs: dict) -> Cache | None:
    """transformers 5.x renamed `past_key_values` to `cache`; accept either, not both."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache as either `past_key_values` or `cache`, not both")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, Cache):
        raise ValueError(f"past_key_values must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}")
    return cache


class JetMoeModel(JetMoePreTrainedModel):
    # Set by JetMoeForCausalLM for the length of one forward when the embedding and the head share one dense
    # weight gradient (ops/tied_embedding.py); None otherwise.
    _tied_gradient: tied_embedding.TiedGradient | None = None

    def __init__(self, config: JetMoeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(JetMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = JetMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = JetMoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, past_length: int | torch.Tensor) -> None:
        if torch.is_tensor(past_length):  # a static cache counts its length on the device
            # A host read; under torch.compile the checks that need it are skipped (a branch on it breaks the graph).
            past_length = None if torch.compiler.is_compiling() else int(past_length)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("specify exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
            if input_ids.is_floating_point():
                raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
            # A host read; skipped under torch.compile so that compiled graphs stay free of syncs.
            if input_ids.numel() and not torch.compiler.is_compiling():
                low, high = int(input_ids.min()), int(input_ids.max())
                # The embedding table is the bound (resize_token_embeddings changes it, not self.vocab_size).
                vocab = getattr(self.embed_tokens, "num_embeddings", self.config.vocab_size)
                if low < 0 or high >= vocab:
                    bad = low if low < 0 else high
                    raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary of size {vocab}")
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be [batch, seq, {self.config.hidden_size}], got shape {tuple(inputs_embeds.shape)}"
            )
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if attention_mask is not None and attention_mask.dim() == 2:
            expected = (batch, past_length + length) if past_length is not None else None
            if expected is not None and tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"attention_mask must have shape [batch, past + seq] = {list(expected)}, "
                    f"got {list(attention_mask.shape)}"
                )
        elif attention_mask is not None and attention_mask.dim() != 4:
            raise ValueError(
                f"attention_mask must be 2-D [batch, past + seq] (or a prepared 4-D mask), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        elif attention_mask is not None:
            # [batch or 1, 1, seq, keys]; keys may exceed past + seq (a static cache's full length).
            rows, _, queries, keys = attention_mask.shape
            too_few_keys = past_length is not None and keys < past_length + length
            if rows not in (1, batch) or queries != length or too_few_keys:
                needed = past_length + length if past_length is not None else "past + seq"
                raise ValueError(
                    f"a 4-D attention_mask must have shape [{batch}, 1, {length}, >= {needed}], "
                    f"got {list(attention_mask.shape)}"
                )
        if past_length is not None and past_length + length > self.config.max_position_embeddings:
            # warning_once dedupes by message: keep the length out of it, or generation warns at every step.
            logger.warning_once(
                f"Sequence longer than max_position_embeddings ({self.config.max_position_embeddings}); "
                "RoPE extrapolates and quality may degrade."
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast | tuple:
        config = self.config
        cache = _pop_cache(past_key_values, kwargs)
        use_cache = use_cache if use_cache is not None else config.use_cache
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_router_logits = output_router_logits if output_router_logits is not None else config.output_router_logits
        return_dict = return_dict if return_dict is not None else config.return_dict
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # recomputing a layer in backward would append to the cache a second time
        if use_cache and cache is None:
            cache = JetMoeCache(config=config)

        past_length = cache.get_seq_length() if cache is not None else 0
        self._check_inputs(input_ids, inputs_embeds, attention_mask, past_length)
        if inputs_embeds is None and self._tied_gradient is not None:
            weight, padding = self.embed_tokens.weight, self.embed_tokens.padding_idx
            inputs_embeds = tied_embedding.embed(input_ids, weight, padding, self._tied_gradient)
        elif inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if cache_position is None:
            cache_position = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)

        mask = causal_mask(config, inputs_embeds, attention_mask, cache, position_ids, cache_position)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden, all_attentions, all_router_logits = [], [], []
        decoded, final_norm = None, None
        if not (output_hidden_states or output_attentions):  # the backend's step of every layer, if it has one
            final_norm = None if _has_hooks(self.norm) else self.norm  # hooks run only in the module's own call
            decoded = backend_for(hidden_states).decoder_stack(
                self.layers, hidden_states, position_embeddings, mask, cache, output_router_logits, norm=final_norm
            )
        if decoded is not None:
            hidden_states, all_router_logits = decoded
        elif (config._attn_implementation or "sdpa") == "sdpa" and not output_attentions:
            mask = additive_inference_mask(mask, inputs_embeds.dtype)  # made once for the layers' SDPA calls
        for layer in self.layers if decoded is None else ():
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, attn_probs, router_logits = layer(
                hidden_states,
                position_embeddings,
                attention_mask=mask,
                cache=cache,
                output_attentions=output_attentions,
                position_ids=position_ids,
                **kwargs,
            )
            all_attentions.append(attn_probs)
            all_router_logits.extend(router_logits)
        if decoded is None or final_norm is None:  # else the backend's step applied it
            hidden_states = self.norm(hidden_states)
        # As in the reference: the embeddings, each layer's input after that, and the final *normed* state
        # (in place of the last layer's raw output).
        all_hidden.append(hidden_states)

        output = MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{_CACHE_FIELD: cache if use_cache else None},
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            router_logits=tuple(all_router_logits) if output_router_logits else None,
        )
        return output if return_dict else output.to_tuple()


class JetMoeForCausalLM(JetMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: JetMoeConfig):
        super().__init__(config)
        self.model = JetMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)  # nn.Linear, faster decoding
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _tie_gradients(self, input_ids) -> tied_embedding.TiedGradient | None:
        """The record that lets this forward's tied embedding and head share one dense weight gradient
        (ops/tied_embedding.py): where autograd will want that gradient, both take the very same weight tensor
        (no autocast copy), and the two modules are the plain ones, without hooks that going around their
        forward would skip; else None."""
        embedding, head = self.model.embed_tokens, self.lm_head
        if (
            input_ids is None
            or not torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or torch.is_autocast_enabled(head.weight.device.type)  # the head would see a cast copy of the weight
            or type(embedding) is not nn.Embedding
            or type(head) not in (Linear, nn.Linear)
            or head.weight is not embedding.weight
            or not head.weight.requires_grad
            or head.bias is not None
            or embedding.max_norm is not None
            or embedding.scale_grad_by_freq
            or embedding.sparse
            or _has_hooks(embedding)
            or _has_hooks(head)
        ):
            return None
        return tied_embedding.TiedGradient()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate()'s cache: where transformers creates a plain DynamicCache, a JetMoeCache (a DynamicCache
        that appends into buffers) hinted with generate()'s max_length instead. A cache the caller passes is kept."""
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        name = "cache" if "cache" in model_kwargs else "past_key_values"
        cache = model_kwargs.get(name)
        if (
            type(cache) is DynamicCache
            and not getattr(cache, "_is_user_defined", False)
            and not getattr(cache, "offloading", False)
            and cache.get_seq_length() == 0
            and isinstance(generation_config.max_length, int)
        ):
            model_kwargs[name] = JetMoeCache(config=self.config, capacity=generation_config.max_length)
        return result

    def balancing_loss(self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The router balancing loss the config selects (see JetMoeConfig.router_aux_loss_type)."""
        config = self.config
        if attention_mask is not None and attention_mask.dim() != 2:
            attention_mask = None  # a prepared 4-D mask has no per-token padding flags to weight by
        top_k = self.experts_per_token()
        if config.router_aux_loss_type == "switch":
            return switch_balancing_loss(
                router_logits, config.num_local_experts, top_k, attention_mask, z_loss_coef=config.router_z_loss_coef
            )
        return reference_balancing_loss(router_logits, config.num_local_experts, top_k, attention_mask)

    def experts_per_token(self) -> int:
        """Top-k as the routers hold it (from config.num_experts_per_tok when they were built): the one source."""
        return experts_per_token(self)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast | tuple:
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shared = self._tie_gradients(input_ids)
        self.model._tied_gradient = shared
        try:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                cache_position=cache_position,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                output_router_logits=output_router_logits,
                return_dict=True,
                **kwargs,
            )
        finally:
            self.model._tied_gradient = None
        kept = select_positions(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(kept) if shared is None else tied_embedding.project(kept, self.lm_head.weight, shared)

        loss = None
        if labels is not None:
            # A loss function set on the model (transformers' `_loss_function` hook) wins over ours.
            custom_loss = getattr(self, "_loss_function", None)
            if custom_loss is None:
                loss = causal_lm_loss(logits, labels, num_items_in_batch)
            else:
                loss = custom_loss(
                    logits, labels, vocab_size=self.config.vocab_size, num_items_in_batch=num_items_in_batch
                )
        aux_loss = None
        if output_router_logits:
            aux_loss = self.balancing_loss(outputs.router_logits, attention_mask)
            if loss is not None:
                loss = loss + self.config.aux_loss_coef * aux_loss.to(loss.device)

        output = MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )
        return output if return_dict else output.to_tuple()

    def decode_logits(
        self, input_ids: torch.LongTensor, position_ids: torch.LongTensor, attention_mask: torch.Tensor, cache: Cache
    ) -> torch.Tensor | None:
        """The next-token logits [B, V] of one inference decoding step (input_ids [B, 1], the new K/V appended to
        `cache`) through the backend's whole step: every layer, the final norm and the head in one call, without
        forward's outputs, checks and options (the generation engine's step). None where the backend has no such
        step here (nothing was written: run forward). The values are forward's. attention_mask: the 4-D mask
        forward hands its layers."""
        model = self.model
        if (
            torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or self.config.output_hidden_states
            or self.config.output_attentions
            or any(map(_has_hooks, (self, model, model.embed_tokens, model.rotary_emb, model.norm, self.lm_head)))
        ):
            return None
        hidden_states = model.embed_tokens(input_ids)
        position_embeddings = model.rotary_emb(hidden_states, position_ids)
        decoded = backend_for(hidden_states).decoder_stack(
            model.layers, hidden_states, position_embeddings, attention_mask, cache, False, model.norm, self.lm_head
        )
        return None if decoded is None else decoded[0][:, -1]


class JetMoeForSequenceClassification(JetMoePreTrainedModel):
    """Scores every position with a linear head and pools the last non-padding token of each sequence."""

    _fresh_head_prefixes = ("score.",)

    def __init__(self, config: JetMoeConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = JetMoeModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def _pooled_positions(self, input_ids: torch.Tensor | None, batch: int, device) -> torch.Tensor | int:
        pad = self.config.pad_token_id
        if pad is None:
            if batch != 1:
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (config.pad_token_id).")
            return -1
        if input_ids is None:
            logger.warning_once(
                "JetMoeForSequenceClassification cannot detect padding in inputs_embeds; pooling the last position."
            )
            return -1
        # Rightmost non-pad token: right and left padding both work; an all-pad row pools position 0.
        positions = torch.arange(input_ids.shape[-1], device=device, dtype=torch.int32)
        return (positions * (input_ids != pad).to(device, torch.int32)).argmax(-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_router_logits=False,
            return_dict=True,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch = logits.shape[0]
        pooled = logits[torch.arange(batch, device=logits.device), self._pooled_positions(input_ids, batch, logits.device)]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        output = SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()
