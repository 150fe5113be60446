"""The JetMoE model, one module per concept; `model.py` assembles them into the public classes."""

from .model import (
    JetMoeDecoderLayer,
    JetMoeForCausalLM,
    JetMoeForSequenceClassification,
    JetMoeModel,
    JetMoePreTrainedModel,
)
from .routing import RoutingPlan, TopKRouter, make_plan, reference_balancing_loss, switch_balancing_loss

__all__ = [
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
