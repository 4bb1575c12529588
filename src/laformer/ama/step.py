"""AMA inside the engine's native decode step: the sparse-attention hook ``inference/decode_step.c`` calls.

The native step runs a whole token in one C call; for the layers under AMA it calls ``kernel.c``'s
``laformer_ama_step_attention`` instead of exact attention. That needs the slice summaries in C-owned form:
buffers sized for the whole cache, allocated once per cache, which the kernel brings up to date itself when a slice
fills. The prefill (the PyTorch forward) leaves its summaries in ``cache.layer_state``; ``prepare`` copies them in
before the first step, so the native steps continue exactly where the prefill stopped.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from laformer.ama import kernel
from laformer.ama.cache import SliceSummaries
from laformer.ama.config import AMAConfig
from laformer.config import LaFormerConfig

if TYPE_CHECKING:  # the engine's cache; AMA itself sits below the inference package
    from laformer.inference.static_cache import StaticKVCache

_UNSYNCED = object()  # no prefill state copied yet


class NativeAttention:
    """The summaries and the ``kernel.Step`` of one AMA backend over one ``StaticKVCache`` (lockstep rows).

    ``function`` and ``context`` are the hook's address and argument for the native step, ``layers`` the layers it
    serves (the rest keep exact attention); call ``start`` when a new batch is prefilled and ``prepare`` before every
    step."""

    def __init__(self, config: AMAConfig, model_config: LaFormerConfig, cache: StaticKVCache) -> None:
        B, Hkv, S, D = cache.keys[0].shape
        L = config.slice_len
        capacity = S // L
        self.cache = cache
        self.layers = range(config.dense_layers, len(cache.keys))
        self.settings = kernel.settings(config, model_config.num_attention_heads, Hkv, D, B)
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        self._structs = (kernel.Layer * len(cache.keys))()
        bound, scan = config.score == "bound", config.score == "scan"
        for i in self.layers:
            keys, values = cache.keys[i], cache.values[i]
            b = self._buffers[i] = {
                "kmean": torch.empty(B, Hkv, capacity, D), "vmean": torch.empty(B, Hkv, capacity, D),
                "log_count": torch.empty(B, Hkv, capacity),
                "kmin": torch.empty(B, Hkv, capacity, D) if bound else None,
                "kmax": torch.empty(B, Hkv, capacity, D) if bound else None,
                "key_scales": torch.empty(B, Hkv, capacity * L) if scan else None,
                "key_codes": torch.empty(B, Hkv, capacity * L, D // 2, dtype=torch.uint8) if scan else None,
                "summarised": torch.zeros(B * Hkv, dtype=torch.int64),
            }
            address = {name: None if t is None else t.data_ptr() for name, t in b.items()}
            self._structs[i] = kernel.Layer(
                keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
                address["kmean"], address["vmean"], address["kmin"], address["kmax"], address["log_count"],
                address["key_scales"], address["key_codes"], capacity, Hkv * capacity, capacity,
                address["summarised"])
        self._capacity = capacity  # full slices a row of the cache holds
        self._scratch = torch.empty(0)
        self._step = kernel.Step(ctypes.pointer(self.settings), self._structs, None, 0, 0)
        self.function = ctypes.cast(kernel.library().laformer_ama_step_attention, ctypes.c_void_p).value
        self.context = ctypes.addressof(self._step)
        self._synced: list[object] = [_UNSYNCED] * len(cache.keys)

    def start(self) -> None:
        """A new batch: the next ``prepare`` takes the prefill's summaries (or none) again."""
        self._synced = [_UNSYNCED] * len(self._synced)

    def prepare(self, threads: int) -> None:
        """Before a step: scratch for ``threads`` threads, and the prefill's summaries copied in once."""
        if self._step.threads != threads:
            floats = kernel.scratch_floats(self.settings, self._capacity)
            self._scratch = torch.empty(threads * floats)
            self._step.scratch, self._step.scratch_floats, self._step.threads = self._scratch.data_ptr(), floats, threads
        for i in self.layers:
            state = self.cache.layer_state[i]
            if state is not self._synced[i]:
                self._copy_in(i, state if isinstance(state, SliceSummaries) else None)
                self._synced[i] = state

    def _copy_in(self, layer: int, summaries: SliceSummaries | None) -> None:
        b = self._buffers[layer]
        n = 0 if summaries is None else summaries.num_slices
        if n:
            b["kmean"][:, :, :n] = summaries.kmean
            b["vmean"][:, :, :n] = summaries.vmean
            b["log_count"][:, :, :n] = summaries.log_count  # (B, 1, n): one row for every head
            for name in ("kmin", "kmax"):
                if b[name] is not None:
                    b[name][:, :, :n] = getattr(summaries, name)
            if b["key_codes"] is not None:  # (B, H_kv, n, L, D/2) -> n * L token rows
                tokens = n * summaries.key_codes.shape[3]
                b["key_codes"][:, :, :tokens] = summaries.key_codes.flatten(2, 3)
                b["key_scales"][:, :, :tokens] = summaries.key_scales.flatten(2)
        b["summarised"].fill_(n)

