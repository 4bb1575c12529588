"""Slice summaries kept next to the KV cache, and a cache that stores keys/values in whole slices.

A slice is ``slice_len`` consecutive cached tokens. The contiguous (B, H, S, D) cache is viewed as
(B, H, S // slice_len, slice_len, D) blocks without copying; only full slices are summarised, and the
summaries of a slice are computed once, when it fills.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from laformer.cache import Cache, KVCache
from laformer.errors import ConfigError

KEY_LEVELS = 7  # the key copy of the scan score: integers -7..7 (4 bits, stored + 8), one scale per token


@dataclass
class SliceSummaries:
    """Per full slice: mean key, mean value and token count (for mediation), and what the slice score reads:
    the channel-wise key min/max for ``bound`` (an upper bound of q.k), a 4-bit copy of the keys for ``scan``."""

    kmean: torch.Tensor  # (B, H, N, D) float32
    vmean: torch.Tensor
    count: torch.Tensor  # (B, 1, N) float32, real (non-padding) tokens in the slice
    log_count: torch.Tensor  # (B, 1, N) the pseudo-token logit bias of mediation
    kmin: torch.Tensor | None = None  # (B, H, N, D) float32, ``bound`` only
    kmax: torch.Tensor | None = None
    key_codes: torch.Tensor | None = None  # (B, H, N, L, D/2) uint8, ``scan`` only: two 4-bit channels per byte
    key_scales: torch.Tensor | None = None  # (B, H, N, L) float32: key = scale * (code - 8)

    def score_keys(self, score: str, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, H, D or 2D, N) keys of the slice scores, divided by sqrt(d). For ``bound``, [center, radius] of the
        min/max box: q . center + |q| . radius = sum_d max(q_d kmin_d, q_d kmax_d), in one product."""
        key = ("score", score, dtype)
        if key not in self.cache:
            keys = torch.cat([self.kmax + self.kmin, self.kmax - self.kmin], -1) / 2 if score == "bound" else self.kmean
            self.cache[key] = (keys / math.sqrt(head_dim)).to(dtype).transpose(-1, -2).contiguous()
        return self.cache[key]

    @property
    def num_slices(self) -> int:
        return self.kmean.shape[2]

    def serves(self, score: str) -> bool:
        """Whether these summaries hold what ``score`` reads (and nothing another score would)."""
        return (self.kmin is not None) == (score == "bound") and (self.key_codes is not None) == (score == "scan")

    def __post_init__(self) -> None:
        self.cache: dict[tuple, Any] = {}  # derived tensors, rebuilt whenever a slice is added

    def cat(self, other: SliceSummaries) -> SliceSummaries:
        return SliceSummaries(*(None if a is None else torch.cat([a, b], dim=2)
                                for a, b in zip(self.fields(), other.fields())))

    def fields(self) -> tuple[torch.Tensor | None, ...]:
        return self.kmean, self.vmean, self.count, self.log_count, self.kmin, self.kmax, self.key_codes, self.key_scales


def key_copy(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) float keys as 4-bit codes (..., D/2) uint8, channels 2i and 2i+1 in the low and high half of byte
    i, and per-token scales (...): ``key = scale * (code - 8)``, symmetric, max |key| / KEY_LEVELS."""
    if keys.shape[-1] % 2:
        raise ConfigError(f"AMA score 'scan' packs two key channels per byte and needs an even head dim, got "
                          f"{keys.shape[-1]}; use AMAConfig(score='bound') for this model")
    scales = keys.abs().amax(-1) / KEY_LEVELS
    codes = torch.round(keys / scales.clamp_min(1e-30)[..., None]).clamp_(-KEY_LEVELS, KEY_LEVELS).to(torch.uint8) + 8
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scales


def unpack_key_codes(codes: torch.Tensor) -> torch.Tensor:
    """(..., D/2) packed codes -> (..., D) float32 integers -7..7 (the key divided by its scale)."""
    low, high = (codes & 15).float() - 8, (codes >> 4).float() - 8
    return torch.stack([low, high], -1).flatten(-2)


def summarize(
    k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, slice_len: int, start: int, end: int,
    score: str = "scan",
) -> SliceSummaries:
    """Summaries of slices ``start:end`` of (B, H, S, D) keys/values for the slice score ``score``; ``valid``
    (B, S) marks real tokens."""
    B, H, _, D = k.shape
    n = end - start
    span = slice(start * slice_len, end * slice_len)
    kb = k[:, :, span].float().reshape(B, H, n, slice_len, D)  # (B, H, n, L, D)
    vb = v[:, :, span].float().reshape(B, H, n, slice_len, D)
    keep = None if valid is None else valid[:, span].reshape(B, 1, n, slice_len, 1)
    if keep is None:
        count = torch.full((B, 1, n, 1), float(slice_len), device=k.device)
        kmean, vmean = kb.mean(3), vb.mean(3)
    else:
        count = keep.sum(3, dtype=torch.float32)  # (B, 1, n, 1)
        kmean, vmean = (kb * keep).sum(3) / count.clamp_min(1.0), (vb * keep).sum(3) / count.clamp_min(1.0)
    bounds = copied = (None, None)
    if score == "bound":
        if keep is None:
            bounds = kb.amin(3), kb.amax(3)
        else:
            empty = count == 0
            bounds = (kb.masked_fill(~keep, float("inf")).amin(3).masked_fill(empty, 0.0),
                      kb.masked_fill(~keep, float("-inf")).amax(3).masked_fill(empty, 0.0))
    elif score == "scan":
        copied = key_copy(kb)
    count = count.squeeze(-1)
    return SliceSummaries(kmean, vmean, count, count.log(), *bounds, *copied)


def update_summaries(
    cache: Cache | None, layer_idx: int, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, slice_len: int,
    score: str = "scan",
) -> SliceSummaries:
    """Bring the summaries in ``cache.layer_state[layer_idx]`` up to date with the full slices of ``k``.

    Only slices that filled since the last call are summarised. Cropping or reordering the cache clears
    ``layer_state``, which makes this rebuild from the keys; so does a change of ``score``.
    """
    full = k.shape[2] // slice_len
    summaries = cache.layer_state[layer_idx] if cache is not None else None
    if not isinstance(summaries, SliceSummaries):  # another backend's state, or none yet
        summaries = None
    if summaries is not None and (summaries.kmean.shape[0] != k.shape[0] or summaries.num_slices > full
                                  or not summaries.serves(score)):
        summaries = None
    done = 0 if summaries is None else summaries.num_slices
    if done < full:
        new = summarize(k, v, valid, slice_len, done, full, score)
        summaries = new if summaries is None else summaries.cat(new)
    elif summaries is None:
        summaries = summarize(k, v, valid, slice_len, 0, 0, score)
    if cache is not None:
        cache.layer_state[layer_idx] = summaries
    return summaries


class SlicedKVCache(KVCache):
    """A ``KVCache`` whose storage is laid out in whole slices of ``slice_len`` tokens, so full slices are
    (B, H, n_slices, slice_len, D) views of the buffers with no copy."""

    def __init__(self, num_layers: int, slice_len: int = 32, capacity: int = 0) -> None:
        super().__init__(num_layers, block=slice_len, capacity=capacity)
        self.slice_len = slice_len
