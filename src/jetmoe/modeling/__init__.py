"""The JetMoE model, one module per concept; `model.py` assembles them into the public classes."""

from .cache import JetMoeCache
from .model import (
    JetMoeDecoderLayer,
    JetMoeForCausalLM,
    JetMoeForSequenceClassification,
    JetMoeModel,
    JetMoePreTrainedModel,
)
from .routing import RoutingPlan, TopKRouter, make_plan, reference_balancing_loss, switch_balancing_loss

__all__ = [
    "JetMoeCache",
    "JetMoeDecoderLayer",
    "JetMoeForCausalLM",
    "JetMoeForSequenceClassification",
    "JetMoeModel",
    "JetMoePreTrainedModel",
    "RoutingPlan",
    "TopKRouter",
    "make_plan",
    "reference_balancing_loss",
    "switch_balancing_loss",
]
