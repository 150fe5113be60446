"""JetMoeConfig: the seed's fields and defaults (JetMoE-4B), validation, and the original repo's key names."""

from __future__ import annotations

import inspect

from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

# Checkpoints written by the original myshell-ai/JetMoE code use these names. The reference silently
# ignores them and falls back to its defaults; we read them whenever the standard key is absent.
ORIGINAL_KEY_NAMES = {
    "num_layers": "num_hidden_layers",
    "ffn_hidden_size": "intermediate_size",
    "moe_num_experts": "num_local_experts",
    "moe_top_k": "num_experts_per_tok",
}

_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_key_value_heads",
    "kv_channels",
    "intermediate_size",
    "max_position_embeddings",
    "num_local_experts",
    "num_experts_per_tok",
)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class JetMoeConfig(PreTrainedConfig):
    r"""Configuration of a JetMoE model. The defaults describe JetMoE-4B; jetmoe-8b uses 24 layers.

    Every layer holds a mixture of attention heads (each of `num_local_experts` experts owns a query and an
    output projection for `num_key_value_heads` heads of size `kv_channels`, over K/V shared by all experts)
    and a mixture of `num_local_experts` GLU MLP experts of width `intermediate_size`. Each token is routed
    to `num_experts_per_tok` experts in both. `num_attention_heads` is derived: `num_key_value_heads *
    num_experts_per_tok`.

    Options beyond the reference (off by default so that defaults reproduce it exactly):
        router_aux_loss_type (`str`, defaults to `"reference"`): `"reference"` is the transformers balancing
            loss (averaged over routers, opt-in through `output_router_logits`); `"switch"` is the original
            JetMoE objective: a switch balance loss plus `router_z_loss_coef` times the router z-loss, computed
            per router and summed over all MoA and MoE routers.
        router_z_loss_coef (`float`, defaults to 0.1): weight of the z-loss inside the `"switch"` objective.
    """

    model_type = "jetmoe"
    attribute_map = {"head_dim": "kv_channels"}
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        num_hidden_layers: int = 12,
        num_key_value_heads: int = 16,
        kv_channels: int = 128,
        intermediate_size: int = 5632,
        max_position_embeddings: int = 4096,
        activation_function: str = "silu",
        num_local_experts: int = 8,
        num_experts_per_tok: int = 2,
        output_router_logits: bool = False,
        aux_loss_coef: float = 0.01,
        use_cache: bool = True,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        rope_parameters: RopeParameters | dict | None = None,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.01,
        attention_dropout: float = 0.0,
        router_aux_loss_type: str = "reference",
        router_z_loss_coef: float = 0.1,
        **kwargs,
    ):
        # A plain __init__ (not the dataclass fields transformers >= 5.20 declares) works with every
        # transformers 5.x: the framework keeps supporting this form for remote-code configs.
        fields = {name: value for name, value in locals().items() if name in _FIELD_DEFAULTS}
        # An original-style key is used when its standard twin still holds the default: either the twin was
        # absent, or the file was re-saved by the reference, which had silently written the default beside it.
        # The original key is then dropped: the standard one is what gets saved.
        for original, standard in ORIGINAL_KEY_NAMES.items():
            if original in kwargs:
                value = kwargs.pop(original)
                if fields[standard] == _FIELD_DEFAULTS[standard]:
                    fields[standard] = value
        for name, value in fields.items():
            setattr(self, name, value)
        # Always derived (the real head count); an explicit value in a file is ignored.
        kwargs.pop("num_attention_heads", None)
        self.num_attention_heads = self.num_key_value_heads * self.num_experts_per_tok
        # Our checks run before the framework's, so that every bad value is a ValueError naming the field
        # (the framework's own validators raise StrictDataclassError or KeyError).
        self.validate_architecture()
        self._check_rope_parameters(kwargs.get("rope_theta"))
        try:
            super().__init__(**kwargs)
        except (KeyError, StrictDataclassError) as error:
            raise ValueError(f"JetMoeConfig is invalid: {error}") from None


    def validate_architecture(self):
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"JetMoeConfig.{name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"JetMoeConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.kv_channels % 2:
            raise ValueError(f"JetMoeConfig.kv_channels must be even for rotary embeddings, got {self.kv_channels}")
        if not isinstance(self.activation_function, str) or self.activation_function not in ACT2FN:
            raise ValueError(
                f"JetMoeConfig.activation_function {self.activation_function!r} is unknown; "
                f"choose one of {sorted(ACT2FN)}"
            )
        for name in ("rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise ValueError(f"JetMoeConfig.{name} must be > 0, got {value!r}")
        if not _is_real(self.attention_dropout) or not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"JetMoeConfig.attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        for name in ("aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise ValueError(f"JetMoeConfig.{name} must be >= 0, got {value!r}")
        if self.router_aux_loss_type not in ("reference", "switch"):
            raise ValueError(
                f"JetMoeConfig.router_aux_loss_type must be 'reference' or 'switch', got {self.router_aux_loss_type!r}"
            )

    def _check_rope_parameters(self, legacy_theta=None):
        """`legacy_theta`: a `rope_theta` given outside rope_parameters (older config files)."""
        rope = self.rope_parameters
        if rope is not None and not isinstance(rope, dict):
            raise ValueError(f"JetMoeConfig.rope_parameters must be a dict or None, got {rope!r}")
        rope = dict(rope or {})
        if legacy_theta is not None:
            rope.setdefault("rope_theta", legacy_theta)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"JetMoeConfig.rope_parameters['rope_type'] {rope_type!r} is unknown; "
                f"choose one of {['default', *sorted(ROPE_INIT_FUNCTIONS)]}"
            )
        theta = rope.get("rope_theta")
        if theta is not None and (not _is_real(theta) or not theta > 0):
            raise ValueError(f"JetMoeConfig.rope_parameters['rope_theta'] must be > 0, got {theta!r}")
        # The framework only logs a warning for a scaling factor below 1; such a config is a mistake.
        factor = rope.get("factor")
        if factor is not None and (not _is_real(factor) or factor < 1):
            raise ValueError(f"JetMoeConfig.rope_parameters['factor'] must be a number >= 1, got {factor!r}")


_FIELD_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(JetMoeConfig.__init__).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}
