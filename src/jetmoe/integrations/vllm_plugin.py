"""vLLM's `vllm.general_plugins` entry point: registers JetMoE with vLLM without importing vLLM's model code.

vLLM calls `register()` in every process it starts (API server, engine core, workers) before it reads a config.
"""

from __future__ import annotations

ARCHITECTURE = "JetMoeForCausalLM"
MODEL_CLASS = "jetmoe.integrations.vllm:JetMoeForCausalLM"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ..configuration import JetMoeConfig

    # jetmoe's config reads the original JetMoE key names (ffn_hidden_size, moe_num_experts, ...) that
    # transformers' own JetMoeConfig ignores, so vLLM sizes the model and its cache from the real values.
    AutoConfig.register("jetmoe", JetMoeConfig, exist_ok=True)
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
