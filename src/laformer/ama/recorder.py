"""What AMA chose, kept per call and layer, so a selection can be inspected or drawn."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SelectionRecord:
    layer: int
    key_len: int  # keys visible to the last query of the call (its position + 1)
    probs: torch.Tensor  # (B, H_kv, Q, N) sampling probability of each candidate slice, 0 for sinks/local/future
    chosen: torch.Tensor  # (B, H_kv, Q, N) bool: slice attended exactly (sinks, local window and selected)

    @property
    def is_decode(self) -> bool:
        return self.probs.shape[2] == 1


class SelectionRecorder:
    """Collects one ``SelectionRecord`` per AMA layer call; ``Q`` is 1 in decode, the number of query blocks in
    prefill. Layers running dense attention record nothing."""

    def __init__(self) -> None:
        self.records: list[SelectionRecord] = []

    def add(self, layer: int, key_len: int, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        self.records.append(SelectionRecord(layer, key_len, probs.detach().float().cpu(), chosen.detach().cpu()))

    def clear(self) -> None:
        self.records.clear()

    def layers(self) -> list[int]:
        return sorted({r.layer for r in self.records})

    def decode_steps(self, layer: int) -> list[SelectionRecord]:
        return [r for r in self.records if r.layer == layer and r.is_decode]
