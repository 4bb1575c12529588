"""Prefix tuning (Li & Liang, 2021): learned per-layer keys and values that every query may attend to.

Implemented as an attention-backend wrapper rather than as cache entries: ``PrefixAttention`` prepends the
layer's prefix (expanded over the batch, grouped-query shape (B, H_kv, P, D)) to the keys and values it is
given and adds always-True columns to the mask, then calls the backend it wraps. The prefix therefore never
enters the ``KVCache``, positions are untouched, and padding, caching and generation work unchanged.
The prefixes live in ``model.prefix_encoder``; with ``prefix_projection`` they are produced by a two-layer MLP
from a small embedding (the paper's reparameterisation, stabler to train).
Replacing the backend (``set_attention``, ``generate(attention=...)``) drops the prefix; to combine it with
another backend pass ``PrefixAttention(model.prefix_encoder, other_backend)`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from laformer.attention import AttentionBackend, causal_mask
from laformer.cache import KVCache
from laformer.config import LaFormerConfig
from laformer.errors import ConfigError
from laformer.peft.targets import find_modules_to_save, parameters_under


@dataclass
class PrefixConfig:
    """``num_virtual_tokens`` prefix positions per layer; ``prefix_projection`` enables the MLP reparameterisation
    with ``encoder_hidden_size`` hidden units (PEFT's names)."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int = 512
    modules_to_save: Sequence[str] | None = None

    peft_type = "PREFIX_TUNING"

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.encoder_hidden_size <= 0:
            raise ConfigError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}")
        if self.modules_to_save is not None:
            self.modules_to_save = tuple(self.modules_to_save)


class PrefixEncoder(nn.Module):
    """Holds (or computes) every layer's prefix keys and values."""

    def __init__(self, config: PrefixConfig, model_config: LaFormerConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_layers = model_config.num_hidden_layers
        self.kv_heads, self.head_dim = model_config.num_key_value_heads, model_config.head_dim
        self.num_virtual_tokens = config.num_virtual_tokens
        width = 2 * self.kv_heads * self.head_dim  # one layer's keys and values per position
        if config.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, model_config.hidden_size, device=device)
            self.transform = nn.Sequential(
                nn.Linear(model_config.hidden_size, config.encoder_hidden_size, device=device),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, self.num_layers * width, device=device),
            )
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, self.num_layers * width, device=device)
            self.transform = None
        nn.init.normal_(self.embedding.weight, std=model_config.initializer_range)

    def layer_prefix(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each (H_kv, P, D)."""
        width = 2 * self.kv_heads * self.head_dim
        rows = slice(layer_idx * width, (layer_idx + 1) * width)
        if self.transform is None:
            flat = self.embedding.weight[:, rows]
        else:  # only this layer's slice of the last projection is computed
            hidden = self.transform[1](self.transform[0](self.embedding.weight))
            last = self.transform[2]
            flat = F.linear(hidden, last.weight[rows], last.bias[rows])
        kv = flat.view(self.num_virtual_tokens, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)  # (2, Hkv, P, D)
        return kv[0], kv[1]


class PrefixAttention:
    """An attention backend that adds the prefix to keys, values and mask, then delegates to ``inner``.

    Deliberately not an ``nn.Module``: it is assigned to every layer, and the parameters belong once to
    ``model.prefix_encoder``.
    """

    def __init__(self, encoder: PrefixEncoder, inner: AttentionBackend) -> None:
        self.encoder = encoder
        self.inner = inner

    @property
    def contiguous_keys(self) -> bool:
        """As the wrapped backend (the decode engine asks)."""
        return getattr(self.inner, "contiguous_keys", False)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        layer_idx: int,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, S = q.shape[0], q.shape[-2], k.shape[-2]
        pk, pv = self.encoder.layer_prefix(layer_idx)
        k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=-2)  # (B, Hkv, P + S, D)
        v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=-2)
        if mask is None:
            mask = causal_mask(T, S, q.device)[None, None]  # (1, 1, T, S)
        prefix_cols = torch.ones(*mask.shape[:-1], pk.shape[-2], dtype=torch.bool, device=mask.device)
        mask = torch.cat([prefix_cols, mask], dim=-1)  # every query may attend to the whole prefix
        return self.inner(q, k, v, mask, layer_idx=layer_idx, cache=cache)


def inject_prefix(model: nn.Module, config: PrefixConfig) -> list[str]:
    """Add ``model.prefix_encoder`` and route the decoder's attention through ``PrefixAttention``."""
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(decoder, "set_attention"):
        raise ConfigError(f"prefix tuning needs a laformer model, got {type(model).__name__}")
    device = decoder.embed_tokens.weight.device
    model.prefix_encoder = PrefixEncoder(config, model.config, device).train(model.training)
    decoder.set_attention(PrefixAttention(model.prefix_encoder, decoder.layers[0].self_attn.backend))
    trainable = [n for n, _ in model.named_parameters() if n.startswith("prefix_encoder.")]
    return trainable + parameters_under(model, find_modules_to_save(model, config.modules_to_save))


def remove_prefix(model: nn.Module) -> None:
    backend = model.decoder.layers[0].self_attn.backend
    model.decoder.set_attention(backend.inner if isinstance(backend, PrefixAttention) else backend)
    del model.prefix_encoder
