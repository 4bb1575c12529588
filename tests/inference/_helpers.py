"""What the engine and native-step tests share: their overrides of the shared tiny config, the reference loop, an
error measure."""

from __future__ import annotations

import torch

from laformer import KVCache
from laformer.generation import generate

# Overrides of conftest's ``tiny_config``: sizes the native step's kernels take (multiples of 32), room for long
# prompts, no eos, and a large init that spreads the logits, so greedy choices are far from ties and token sequences
# compare exactly.
CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, eos_token_id=None)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def reference(model, ids, mask=None, **options) -> torch.Tensor:
    """The plain loop: one ``model(...)`` call per token over a growable cache, no engine."""
    return generate(model, ids, mask, cache=KVCache(len(model.model.layers)), **options)
