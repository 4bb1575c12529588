"""A preallocated key/value cache: fixed buffers written in place, so decoding allocates nothing per token.

It keeps the ``laformer.cache.Cache`` contract in two modes. By default (append mode) every row appends at the
same offset and ``update`` returns views of the filled part, so it drops into ``LaFormerForCausalLM.forward`` and
``laformer.generation.generate(cache=...)`` as is, and attention backends that read the keys as a contiguous
sequence (AMA's slices) work on it unchanged. When an engine
sets ``slots`` (a (B, T) tensor of buffer columns), ``update`` scatters each row's new keys into its own columns
and returns the whole fixed-shape buffers; the engine then passes a mask over all columns. Fixed shapes and no
Python integers on the hot path are what let ``torch.compile`` trace the step once. The write is an ``index_put_``,
not a ``scatter_``: torch.compile turns a scatter into the buffer in a new copy of the whole buffer plus a copy
back (per layer and step: ~35 MB of memory traffic per SmolLM2 token at a 192-token cache, 8x that at batch 8),
while it does an ``index_put_`` in place.
"""

from __future__ import annotations

import torch

from laformer.config import LaFormerConfig
from laformer.errors import GenerationError


class StaticKVCache:
    def __init__(
        self,
        config: LaFormerConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1 or max_length < 1:
            raise GenerationError(
                f"a static cache needs batch_size >= 1 and max_length >= 1, got {batch_size} and {max_length}"
            )
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)  # (B, Hkv, S, D)
        layers = config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.layer_state: list[object | None] = [None] * layers
        self.lengths = [0] * layers  # filled columns per layer, append mode only
        self.slots: tuple[torch.Tensor, ...] | None = None  # (row, head, column) indices, slot mode only

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def set_slots(self, slots: torch.Tensor | None) -> None:
        """Switch to slot mode: row b's t-th new token goes to column ``slots[b, t]`` (None: back to append)."""
        if slots is None:
            self.slots = None
            return
        B, H = slots.shape[0], self.keys[0].shape[1]
        rows = torch.arange(B, device=slots.device)[:, None, None]  # broadcast to (B, H, T)
        heads = torch.arange(H, device=slots.device)[None, :, None]
        self.slots = (rows, heads, slots[:, None, :])

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.slots is not None:
            keys.index_put_(self.slots, k)  # keys[b, h, slots[b, t]] = k[b, h, t]
            values.index_put_(self.slots, v)
            return keys, values
        start = self.lengths[layer_idx]
        end = start + k.shape[-2]
        if end > keys.shape[2]:
            raise GenerationError(
                f"the static cache holds {keys.shape[2]} positions but {end} are needed; "
                "build it with a larger max_length (prompt length + max_new_tokens)"
            )
        keys[:, :, start:end].copy_(k)
        values[:, :, start:end].copy_(v)
        self.lengths[layer_idx] = end
        return keys[:, :, :end], values[:, :, :end]

    def rows(self, start: int, stop: int, length: int = 0) -> "StaticKVCache":
        """A cache over rows ``start:stop`` sharing these buffers (writes land here), for filling one row; its
        first ``length`` columns count as filled (a reused prefix)."""
        view = object.__new__(StaticKVCache)
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        view.layer_state = [None] * len(self.keys)
        view.lengths = [length] * len(self.keys)
        view.slots = None
        return view

    def reorder(self, index: torch.Tensor) -> None:
        """Row b becomes old row ``index[b]`` (beam-search style); the batch size of a static cache is fixed."""
        if index.numel() != self.batch_size:
            raise GenerationError(
                f"a static cache keeps its batch of {self.batch_size} rows but got {index.numel()} indices; "
                "pass one source row per row (repeat rows to fill finished slots) or use the growable KVCache"
            )
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf.copy_(buf.index_select(0, index))
        self.layer_state = [None] * len(self.keys)

    def crop(self, length: int) -> None:
        """Forget everything after the first ``length`` positions (append mode)."""
        self.lengths = [min(n, length) for n in self.lengths]
        self.layer_state = [None] * len(self.keys)

    def advance(self, steps: int = 1) -> None:
        """Count ``steps`` more columns as filled in append mode (they were written by a native step)."""
        self.lengths = [n + steps for n in self.lengths]

    def reset(self, length: int = 0) -> None:
        """Start over in append mode, keeping the first ``length`` columns (a reused prefix) as filled."""
        self.lengths = [length] * len(self.keys)
        self.slots = None
        self.layer_state = [None] * len(self.keys)
