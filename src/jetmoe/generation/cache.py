"""A preallocated K/V cache with one row ("slot") per running sequence, each at its own length.

The engine keeps its running sequences in slots 0..n-1 (it compacts the batch when one finishes), so a
decode step reads the first n rows of every layer's buffer as a view: nothing is copied or grown per token.
Every row writes its new K/V at its own position; the engine passes the matching per-row position ids and
a 4-D "may attend" mask, so rows of different lengths share one batched forward without any padding tokens.

The model only calls `update(key, value, layer_idx)` and `get_seq_length()`; the engine sets what a call
means (prefill one slot, or one decode step for rows 0..n-1) with `begin_prefill` / `begin_decode`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .. import cpu_memory


class SlotKVCache(Cache):
    def __init__(self, config, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__(layers=[])
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        shape = (num_slots, config.num_key_value_heads, max_len, config.kv_channels)
        # Zeros, not empty: masked positions still enter the attention matmul, and must never hold NaN. On CPU
        # on huge pages (decoding streams the rows it attends over), only touched as rows fill.
        self.keys = [cpu_memory.zeros(shape, dtype, device) for _ in range(config.num_hidden_layers)]
        self.values = [cpu_memory.zeros(shape, dtype, device) for _ in range(config.num_hidden_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        self._mode = None
        self._slot = 0
        self._view_len = 0  # prefill length
        self._positions: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def begin_prefill(self, slot: int, length: int) -> None:
        """The next forward writes `length` tokens into `slot` at positions 0..length-1."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} outside 0..{self.num_slots - 1}")
        if not 1 <= length <= self.max_len:
            raise ValueError(f"prefill length {length} outside 1..{self.max_len}")
        self._mode, self._slot, self._view_len = "prefill", slot, length

    def begin_decode(self, positions: torch.Tensor, mask: torch.Tensor) -> None:
        """The next forward writes one token per row 0..n-1 (n = len(positions)), row r at `positions[r]`;
        attention reads the first `mask.shape[-1]` positions of every row (the mask hides the unwritten ones).

        Sizes come from these tensors rather than Python ints, so a compiled decode step sees them as
        dynamic shapes instead of recompiling for every batch size and length."""
        self._mode, self._positions, self._mask = "decode", positions, mask
        self._decode_rows = None  # made by the first `update` of the step (the C decoder layers write rows themselves)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._mode == "prefill":
            slot, length = self._slot, self._view_len
            keys[slot, :, :length] = key_states[0]
            values[slot, :, :length] = value_states[0]
            return keys[slot : slot + 1, :, :length], values[slot : slot + 1, :, :length]
        if self._mode == "decode":
            rows, view_len, width = self._positions.shape[0], self._mask.shape[-1], keys.shape[-1]
            if self._decode_rows is None:
                # Where row r's new K/V go in each layer's buffer seen as [slots * heads * max_len, D]: one
                # `index_copy_` per buffer and layer (cheaper than an indexed assignment with two index tensors).
                heads = keys.shape[1]
                head_starts = torch.arange(rows * heads, device=keys.device) * self.max_len
                self._decode_rows = head_starts + self._positions.repeat_interleave(heads)
            keys.view(-1, width).index_copy_(0, self._decode_rows, key_states[:, :, 0].reshape(-1, width))
            values.view(-1, width).index_copy_(0, self._decode_rows, value_states[:, :, 0].reshape(-1, width))
            return keys[:rows, :, :view_len], values[:rows, :, :view_len]
        raise RuntimeError("SlotKVCache.update called before begin_prefill/begin_decode")

    def decode_buffers(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """In a decode step: (this layer's key and value buffers [slots, heads, max_len, D], each row's new
        position, the positions attention reads), for a caller that writes the new K/V itself and attends over
        rows 0..n-1 and positions 0..view-1 (modeling/backends/cpu_decode.py's C calls) instead of calling `update`;
        None otherwise."""
        if self._mode != "decode":
            return None
        return self.keys[layer_idx], self.values[layer_idx], self._positions, self._mask.shape[-1]

    def decode_written(self, layer_idx: int) -> None:
        """Nothing to record: `begin_decode` set this step's positions for every layer."""

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into slot `target` (batch compaction)."""
        for buffer in (*self.keys, *self.values):
            buffer[target, :, :length] = buffer[source, :, :length]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        # Only read by the model for its default positions (the engine always passes explicit ones) and for
        # its "longer than max_position_embeddings" warning: the longest row is the honest answer.
        if self._mode == "decode":
            return self._mask.shape[-1] - 1
        return 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    @property
    def is_compileable(self) -> bool:
        return True
