"""Model-agnostic kernels. Each takes tensors (and a routing plan's tensors), never a config or a module."""

from .attention import shared_kv_attention
from .grouped_matmul import grouped_linear, grouped_linear_reference, slot_linear, slot_products

__all__ = ["grouped_linear", "grouped_linear_reference", "shared_kv_attention", "slot_linear", "slot_products"]
