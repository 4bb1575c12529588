"""The key/value cache used during generation.

Keys and values are stored per layer as (B, H_kv, S, D), before the grouped-query repeat, so a cache
costs ``n_kv_heads / n_heads`` of a naive one. Attention backends receive the cache and may keep their own
per-layer state next to it (``layer_state``), which is how sparse attention keeps slice summaries.
"""

from __future__ import annotations

from typing import Any

import torch


class KVCache:
    """A growable per-layer cache: ``update`` appends the new keys/values and returns the full ones."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.layer_state: list[dict[str, Any]] = [{} for _ in range(num_layers)]

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[-2]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = k, v
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (used when finished sequences leave a batch)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k.index_select(0, index), v.index_select(0, index)
        self.layer_state = [{} for _ in self.keys]  # backends rebuild their state from the keys

    def crop(self, length: int) -> None:
        """Drop everything after the first ``length`` positions."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[..., :length, :], v[..., :length, :]
        self.layer_state = [{} for _ in self.keys]
