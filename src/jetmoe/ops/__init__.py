"""Model-agnostic kernels. Each takes tensors (and a routing plan's tensors), never a config or a module."""

from .attention import shared_kv_attention
from .grouped_matmul import grouped_linear, grouped_linear_reference

__all__ = ["grouped_linear", "grouped_linear_reference", "shared_kv_attention"]
