"""The model's default K/V cache: a DynamicCache whose layers append into preallocated buffers.

transformers' DynamicLayer grows by `torch.cat` at every token, copying the whole cache each time. Here each
layer keeps key and value buffers [B, Nkv, capacity, D] and its `keys` / `values` are views of their first
`length` positions, so a token costs one row write. `generate()` hints its `max_length`
(JetMoeForCausalLM._prepare_cache_for_generation): up to PREALLOCATE positions beyond the prompt come up front,
then the buffers grow by doubling, as they do for a plain forward.

It is a DynamicCache in every other respect (same class hierarchy, same `keys` / `values` attributes, same
crop / reorder / select behaviour): anything that replaces a layer's `keys` or `values` (beam search, assisted
decoding's crop, a user) is picked up at the next update, which copies that content into fresh buffers.

While decoding on the CPU, `decode_buffers` / `decode_written` let the C decoder layers
(modeling/backends/cpu_decode.py) write the new row and attend in one call, as they do for the engine's cache.
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


# Positions a layer allocates at most beyond what it needs at once, whatever its capacity hint: generate() hints
# its max_length, which can be far more than a run that stops at an end-of-sequence token uses (each position
# costs K and V rows in every layer).
PREALLOCATE = 4096


class AppendingLayer(DynamicLayer):
    """A DynamicLayer over preallocated buffers: `keys` / `values` are views of their first `length` positions."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity  # positions expected in all (a hint: see PREALLOCATE), 0 for unknown
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _owns_views(self) -> bool:
        """Whether `keys` / `values` are still the views this layer set (not replaced from outside)."""
        return all(
            buffer is not None
            and view is not None
            and view._base is buffer
            and view.data_ptr() == buffer.data_ptr()  # a prefix (as `crop` leaves it), not some other slice
            and view.stride() == buffer.stride()
            and view.shape[:2] == buffer.shape[:2]
            for view, buffer in ((self.keys, self._key_buffer), (self.values, self._value_buffer))
        )

    def _set_length(self, length: int) -> None:
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]

    def _reserve(self, needed: int, key_like: torch.Tensor, value_like: torch.Tensor) -> int:
        """Make room for `needed` positions; the current content stays. Returns the current length."""
        length = self.get_seq_length()
        owned = self._owns_views()
        buffer = self._key_buffer
        if (
            owned
            and buffer.shape[2] >= needed
            and buffer.shape[:2] == key_like.shape[:2]
            and buffer.shape[3] == key_like.shape[3]
            and buffer.dtype == key_like.dtype
            and self._value_buffer.shape[3] == value_like.shape[3]
        ):
            return length
        if owned:  # doubling (amortised: each position copied about once), up to the hint while it suffices
            capacity = max(needed, 2 * buffer.shape[2])
            if self.capacity >= needed:
                capacity = min(capacity, self.capacity)
        else:  # the hint, but no more than PREALLOCATE beyond what is needed now (generation may stop early)
            capacity = max(needed, min(self.capacity, needed + PREALLOCATE))
        batch, heads = key_like.shape[:2]
        new_keys = key_like.new_empty((batch, heads, capacity, key_like.shape[3]))
        new_values = value_like.new_empty((batch, heads, capacity, value_like.shape[3]))
        if length:  # the current content, from our buffers or from tensors set from outside
            new_keys[:, :, :length] = self.keys
            new_values[:, :, :length] = self.values
        self._key_buffer, self._value_buffer = new_keys, new_values
        self._set_length(length)
        return length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if torch.compiler.is_compiling():  # a traced graph grows it as DynamicLayer does; eager takes it over
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[2]
        length = self._reserve(self.get_seq_length() + new, key_states, value_states)
        self._key_buffer[:, :, length : length + new] = key_states
        self._value_buffer[:, :, length : length + new] = value_states
        self._set_length(length + new)
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class JetMoeCache(DynamicCache):
    """DynamicCache with appending layers (see the module docstring). `capacity`: the positions each layer is
    expected to hold in all, allocated up front up to PREALLOCATE beyond the first update's; 0 for unknown.
    Beyond what is allocated, buffers grow by doubling."""

    def __init__(self, config=None, capacity: int = 0, **kwargs):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an integer >= 0 (positions per layer), got {capacity!r}")
        super().__init__(config=config, **kwargs)
        if config is not None:
            self.layers = [AppendingLayer(capacity) for _ in self.layers]
        else:
            self.layer_class_to_replicate = functools.partial(AppendingLayer, capacity)
        self._positions: tuple[int, int, torch.Tensor] | None = None  # (length, batch, int64 [batch] of length)

    def decode_buffers(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """For a caller that writes one new K/V row per sequence itself and then attends (the C decoder layers):
        (key buffer, value buffer [B, Nkv, capacity, D], each row's new position int64 [B], positions to attend
        over), with room for the new row; the caller calls `decode_written(layer_idx)` once it wrote it. None
        where this layer holds nothing yet (a prompt goes through `update`)."""
        if layer_idx >= len(self.layers):
            return None
        layer = self.layers[layer_idx]
        if not isinstance(layer, AppendingLayer) or not layer.is_initialized or layer.get_seq_length() == 0:
            return None
        length = layer._reserve(layer.get_seq_length() + 1, layer.keys, layer.values)
        batch = layer.keys.shape[0]
        cached = self._positions
        if cached is None or cached[0] != length or cached[1] != batch:
            positions = torch.full((batch,), length, dtype=torch.int64, device=layer.keys.device)
            cached = self._positions = (length, batch, positions)
        return layer._key_buffer, layer._value_buffer, cached[2], length + 1

    def decode_written(self, layer_idx: int) -> None:
        """The new row `decode_buffers` made room for is written: the layer now holds it."""
        layer = self.layers[layer_idx]
        layer._set_length(layer.get_seq_length() + 1)
