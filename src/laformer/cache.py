"""The key/value cache used during generation.

Keys and values are stored per layer as (B, H_kv, S, D), before the grouped-query repeat, so a cache
costs ``n_kv_heads / n_heads`` of a naive one. Storage grows by doubling (rounded up to whole blocks), so a
decode step writes one token in place instead of copying the whole cache. ``keys[i]``/``values[i]`` are views
of the filled part. Attention backends may keep their own per-layer state next to it (``layer_state``), which
is how sparse attention keeps slice summaries.

``Cache`` is the contract every cache keeps (this growable one, the decode engine's preallocated
``laformer.inference.StaticKVCache`` and AMA's ``SlicedKVCache``), so the model and attention backends run on any.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Cache(Protocol):
    """What the model and attention backends need of a cache.

    ``layer_state[i]`` is one object that layer ``i``'s attention backend owns (None until it stores one; AMA keeps
    its ``SliceSummaries`` there); a cache resets it to None whenever its keys change other than by appending.
    """

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    layer_state: list[object | None]

    def __len__(self) -> int: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, H_kv, T, D) keys/values of ``layer_idx`` (Hugging Face's order); returns what attention
        reads."""

    def reorder(self, index: torch.Tensor) -> None: ...

    def crop(self, length: int) -> None: ...


class KVCache:
    """A growable per-layer cache: ``update`` appends the new keys/values and returns the full ones."""

    def __init__(self, num_layers: int, block: int = 1, capacity: int = 0) -> None:
        self.block = block
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.layer_state: list[object | None] = [None] * num_layers
        self._kbuf: list[torch.Tensor | None] = [None] * num_layers
        self._vbuf: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[-2]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.get_seq_length(layer_idx)
        end = length + k.shape[2]
        kbuf = self._kbuf[layer_idx]
        if kbuf is None or end > kbuf.shape[2] or kbuf.shape[0] != k.shape[0]:
            size = -(-max(self.capacity, 2 * end) // self.block) * self.block
            self._kbuf[layer_idx] = self._grow(kbuf, k, size, length)
            self._vbuf[layer_idx] = self._grow(self._vbuf[layer_idx], v, size, length)
        self._kbuf[layer_idx][:, :, length:end] = k
        self._vbuf[layer_idx][:, :, length:end] = v
        self.keys[layer_idx] = self._kbuf[layer_idx][:, :, :end]
        self.values[layer_idx] = self._vbuf[layer_idx][:, :, :end]
        return self.keys[layer_idx], self.values[layer_idx]

    @staticmethod
    def _grow(old: torch.Tensor | None, new: torch.Tensor, size: int, length: int) -> torch.Tensor:
        B, H, _, D = new.shape
        buf = new.new_empty(B, H, size, D)
        if old is not None and length:
            buf[:, :, :length] = old[:, :, :length]
        return buf

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (used when finished sequences leave a batch)."""
        for i, (kbuf, vbuf) in enumerate(zip(self._kbuf, self._vbuf)):
            if kbuf is not None:
                length = self.get_seq_length(i)
                self._kbuf[i], self._vbuf[i] = kbuf.index_select(0, index), vbuf.index_select(0, index)
                self.keys[i], self.values[i] = self._kbuf[i][:, :, :length], self._vbuf[i][:, :, :length]
        self.layer_state = [None] * len(self.keys)  # backends rebuild their state from the keys

    def crop(self, length: int) -> None:
        """Drop everything after the first ``length`` positions (later writes overwrite the rest)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[..., :length, :], v[..., :length, :]
        self.layer_state = [None] * len(self.keys)
