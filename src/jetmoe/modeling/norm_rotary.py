"""RMSNorm and the rotary embedding's cos/sin tables (rotate-half, full head dimension).

The norm's arithmetic is the backend's `rms_norm` (modeling/backends); rotary is applied by the attention.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .backends import backend_for


class JetMoeRMSNorm(nn.Module):
    """y = w * (x / rms(x)) with the normalisation in fp32, cast back to the input dtype before the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return backend_for(hidden_states).rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class JetMoeRotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions; other RoPE types come from transformers' RoPE registry."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, **kwargs) -> tuple[torch.Tensor, float]:
        """theta^(-2i/D) for i < D/2, D = kv_channels (the whole head rotates); no extra scaling."""
        dim = config.kv_channels
        base = config.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    # The registry's dynamic types (e.g. "dynamic", "longrope") rescale inv_freq as sequences grow.
    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._tables(x, position_ids)
        if tables is not None:
            return tables[0][position_ids], tables[1][position_ids]
        return self._compute(position_ids, x.device, x.dtype)

    def _compute(self, position_ids: torch.Tensor, device: torch.device, dtype: torch.dtype):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    # Eager CPU calls with the default RoPE read the tables of positions 0..TABLE_POSITIONS-1, computed once by
    # `_compute` itself (so the same values bit for bit: each entry is one fp32 product, then cos/sin): two
    # lookups instead of `_compute`'s five operators per step (docs/performance.md). Rebuilt when inv_freq
    # changes (new storage or an in-place update).
    TABLE_POSITIONS = 8192
    _table_cache: tuple | None = None  # (key, (cos, sin))

    def _tables(self, x: torch.Tensor, position_ids: torch.Tensor):
        if (
            self.rope_type != "default"
            or not x.is_cpu
            or torch.compiler.is_compiling()
            or position_ids.numel() == 0
            or position_ids.is_floating_point()
        ):
            return None
        limit = min(self.TABLE_POSITIONS, self.config.max_position_embeddings)
        if int(position_ids.min()) < 0 or int(position_ids.max()) >= limit:
            return None
        inv_freq = self.inv_freq
        key = (inv_freq.data_ptr(), inv_freq._version, inv_freq.device, x.dtype, self.attention_scaling, limit)
        if self._table_cache is None or self._table_cache[0] != key:
            self._table_cache = (key, self._compute(torch.arange(limit), x.device, x.dtype))
        return self._table_cache[1]
