"""jetmoe: JetMoE mixture-of-experts language models, exact to the transformers reference and faster."""

from .configuration import JetMoeConfig
from .modeling import JetMoeForCausalLM, JetMoeForSequenceClassification, JetMoeModel, JetMoePreTrainedModel
from .modeling.cache import JetMoeCache

__version__ = "0.1.0"


def register_with_transformers() -> None:
    """Make transformers' Auto classes build our classes for `model_type == "jetmoe"` checkpoints.

    After this, `AutoModelForCausalLM.from_pretrained(path)` returns a `jetmoe.JetMoeForCausalLM`.
    """
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    AutoConfig.register("jetmoe", JetMoeConfig, exist_ok=True)
    AutoModel.register(JetMoeConfig, JetMoeModel, exist_ok=True)
    AutoModelForCausalLM.register(JetMoeConfig, JetMoeForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(JetMoeConfig, JetMoeForSequenceClassification, exist_ok=True)


__all__ = [
    "JetMoeCache",
    "JetMoeConfig",
    "JetMoeForCausalLM",
    "JetMoeForSequenceClassification",
    "JetMoeModel",
    "JetMoePreTrainedModel",
    "register_with_transformers",
]
