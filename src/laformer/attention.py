"""The attention computation, kept behind one small replaceable function.

An attention backend is any callable ``backend(q, k, v, mask, *, layer_idx, cache) -> out`` with
``q`` of shape (B, H, T, D), ``k``/``v`` of shape (B, H_kv, S, D) (the cache already appended, no
grouped-query repeat), ``mask`` a boolean (B, 1, T, S) tensor where True means "may attend", or None
for a plain causal pattern without padding. It returns (B, H, T, D). Sparse attention plugs in here.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from laformer.cache import KVCache


class AttentionBackend(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        layer_idx: int,
        cache: KVCache | None,
    ) -> torch.Tensor: ...


@functools.singledispatch
def attention_backend(spec: Any, model: Any) -> AttentionBackend | None:
    """The backend ``spec`` stands for in ``model`` (``set_attention`` calls this): a backend (or None) is itself;
    a sparse-attention config is built by the factory its package registers for the config's type
    (``attention_backend.register(Config)``), so the model never imports the sparse variants."""
    return spec


def causal_mask(query_len: int, key_len: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) boolean mask for queries that are the last ``query_len`` of ``key_len`` positions."""
    offset = key_len - query_len
    q_pos = torch.arange(query_len, device=device)[:, None] + offset
    return torch.arange(key_len, device=device)[None, :] <= q_pos


def build_attention_mask(
    padding_mask: torch.Tensor | None, query_len: int, key_len: int, device: torch.device
) -> torch.Tensor | None:
    """Combine causality with a (B, S) padding mask into the backend's (B, 1, T, S) boolean mask.

    Returns None when no padding is involved (backends then use their fast causal path). A padding
    query still attends to itself so its row is never empty (an empty row would produce NaN).
    """
    if padding_mask is None or bool(padding_mask.all()):
        return None
    mask = causal_mask(query_len, key_len, device)[None, None] & padding_mask[:, None, None, :].bool()
    diagonal = torch.arange(query_len, device=device) + (key_len - query_len)
    mask[..., torch.arange(query_len, device=device), diagonal] = True
    return mask


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    layer_idx: int = 0,
    cache: KVCache | None = None,
) -> torch.Tensor:
    """Exact attention through PyTorch's fused ``scaled_dot_product_attention``."""
    query_len, key_len = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if mask is None and query_len > 1:
        if query_len == key_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = causal_mask(query_len, key_len, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
