"""A DynamicCache whose keys and values are allocated once per request, sized for the prompt and the answer.

Why: transformers' DynamicCache holds every layer's keys and values as tensors of their own and
concatenates them anew at each decode step. A compressed prompt makes them small (about 0.3 MiB each
for an 8-frame Qwen2-VL video at R = 0.25), and PyTorch's caching allocator serves tensors of at most
1 MiB from 2 MiB "small pool" segments it reserves for them, instead of from the large blocks the vision
tower has just freed. The shorter prompt then reserved more GPU memory than the full one (+18 to +26
MiB on Qwen2-VL and Qwen3-VL at 8 frames, with any compressor). Here the keys and values are
allocated once, with room for the tokens still to generate, in groups just large enough for the large
pool; decode steps write into them instead of reallocating.

Attention reads the same numbers as with DynamicCache: each layer returns views of its filled rows
(tests/test_kv_arena.py checks the logits bit for bit, on the CPU and on CUDA's SDPA kernels). Layers of
another kind (sliding window, ...) keep transformers' own implementation.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# PyTorch's caching allocator serves requests up to this size from its small pool (2 MiB segments).
_SMALL_POOL_MAX = 1 << 20


class _Block:
    """Storage for every layer's keys and values: one (B, H, capacity, D) tensor each, made at the first
    layer's first update (when B, H, D, dtype and device are known; capacity = that update's length, the
    prompt, + ``room``). Tensors are allocated in groups of the fewest that together pass the small pool's
    limit, so every allocation is a large-pool one, and one no larger than it needs to be: a tensor that is
    large by itself (a long prompt) gets an allocation of its own, as in DynamicCache, never one huge block
    that no freed memory could hold."""

    def __init__(self, layers: int, room: int) -> None:
        self.tensors = 2 * layers
        self.room = room
        self.shape: tuple[int, ...] | None = None
        self.groups: dict[int, torch.Tensor] = {}

    def rows(self, slot: int, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Slot ``slot``'s keys and values storage, or None if ``keys`` does not fit the block's layout."""
        batch, heads, length, dim = keys.shape
        if self.shape is None:
            self.shape = (batch, heads, length + self.room, dim)
            self.dtype, self.device = keys.dtype, keys.device
            self.per_group = _SMALL_POOL_MAX // (math.prod(self.shape) * keys.element_size()) + 1
        fits = (
            (batch, heads, dim) == (self.shape[0], self.shape[1], self.shape[3])
            and length <= self.shape[2]
            and (keys.dtype, keys.device) == (self.dtype, self.device)
        )
        return (self._tensor(2 * slot), self._tensor(2 * slot + 1)) if fits else None

    def _tensor(self, index: int) -> torch.Tensor:
        groups = max(1, self.tensors // self.per_group)  # the last group takes the remainder
        group = min(index // self.per_group, groups - 1)
        if group not in self.groups:
            count = self.per_group if group < groups - 1 else self.tensors - group * self.per_group
            self.groups[group] = torch.empty((count, *self.shape), dtype=self.dtype, device=self.device)
        return self.groups[group][index - group * self.per_group]


class ArenaLayer(DynamicLayer):
    """A full-attention layer of the cache; its keys and values are views of rows ``[:length]`` of its two
    stores (tensors of the shared block, or of its own once it outgrows the block or is reshaped)."""

    def __init__(self, block: _Block, slot: int) -> None:
        super().__init__()
        self.block = block
        self.slot = slot
        self.store: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.store = self.block.rows(self.slot, key_states)
        if self.store is None:
            self.store = self._own_store(key_states.shape, key_states.shape[-2])
        self.is_initialized = True
        self._expose()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.store[0].shape[-2]:  # more tokens than planned: move to storage of its own
            self._adopt(self.keys, self.values, end)
        self.store[0][:, :, start:end].copy_(key_states)
        self.store[1][:, :, start:end].copy_(value_states)
        self.length = end
        self._expose()
        return self.keys, self.values

    def _own_store(self, shape: torch.Size, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, _, dim = shape
        size = (batch, heads, length + self.block.room, dim)
        return tuple(torch.empty(size, dtype=self.dtype, device=self.device) for _ in range(2))

    def _expose(self) -> None:
        self.keys = self.store[0][:, :, : self.length]
        self.values = self.store[1][:, :, : self.length]

    def _adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int | None = None) -> None:
        """Copy ``keys`` / ``values`` (B, H, n, D) into storage of this layer's own, with room for ``length``
        tokens (default n) plus the block's room."""
        store = self._own_store(keys.shape, max(length or 0, keys.shape[-2]))
        store[0][:, :, : keys.shape[-2]].copy_(keys)
        store[1][:, :, : values.shape[-2]].copy_(values)
        self.store, self.length = store, keys.shape[-2]
        self._expose()

    # DynamicLayer's reshaping methods replace self.keys / self.values; keep the store in step with them.
    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized:
            self.length = self.keys.shape[-2]
            self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.is_initialized:
            self._adopt(self.keys, self.values)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.is_initialized:
            self._adopt(self.keys, self.values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.is_initialized:
            self._adopt(self.keys, self.values)

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._expose()

    def offload(self) -> None:
        raise NotImplementedError("the KV arena cache does not offload; use transformers' DynamicCache for that")


def arena_cache(config: Any, room: int) -> DynamicCache:
    """A DynamicCache for ``config`` (a text config) whose full-attention layers keep their keys and values
    in the block (:class:`_Block`), with room for ``room`` tokens after the prompt (the tokens to generate).
    More tokens still work: a layer that outgrows its rows moves to storage of its own, as DynamicCache
    would reallocate."""
    if isinstance(room, bool) or not isinstance(room, int) or room < 0:
        raise ValueError(f"room must be a non-negative number of tokens, got {room!r}")
    cache = DynamicCache(config=config)  # one layer per entry of the config's layer types
    plain = [i for i, layer in enumerate(cache.layers) if type(layer) is DynamicLayer]
    make = partial(ArenaLayer, _Block(len(plain), room))
    for slot, index in enumerate(plain):
        cache.layers[index] = make(slot)
    return cache
