"""What the AMA tests share: a model config with room for long contexts, random and hand-built attention inputs."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config

from laformer import LaFormerConfig
from laformer.ama import AMAConfig, kernel
from laformer.ama.attention import AMAAttention

needs_kernel = pytest.mark.skipif(not kernel.available(), reason="no C compiler for the AMA kernel")


def ama_config(**overrides) -> LaFormerConfig:
    """2 layers, 4 query / 2 KV heads of 16, a vocabulary of 97 and 512 positions."""
    fields = dict(vocab_size=97, hidden_size=64, intermediate_size=128, max_position_embeddings=512,
                  rope_theta=10000.0, pad_token_id=None)
    fields.update(overrides)
    return tiny_config(**fields)


def backend(**fields) -> AMAAttention:
    return AMAAttention(AMAConfig(**fields), torch.nn.Module())


def random_qkv(B=2, H=4, Hkv=2, T=70, S=70, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, S, D, generator=g),
            torch.randn(B, Hkv, S, D, generator=g))


def planted_keys(n_slices=12, L=4, D=8, hot=(5, 8), seed=0):
    """Keys that are small noise except in the ``hot`` slices, which align with the query direction."""
    g = torch.Generator().manual_seed(seed)
    k = 0.1 * torch.randn(1, 1, n_slices * L, D, generator=g)
    direction = torch.zeros(D)
    direction[0] = 1.0
    for s in hot:
        k[0, 0, s * L : (s + 1) * L] += 3.0 * direction
    q = direction.view(1, 1, 1, D).repeat(1, 2, 1, 1)  # two query heads share the KV head
    return q, k, torch.randn(1, 1, n_slices * L, D, generator=g)
