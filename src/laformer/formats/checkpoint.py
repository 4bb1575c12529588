"""What every format's loader returns: a config and a Hugging Face-named state dict, with where they came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from laformer.config import LaFormerConfig


@dataclass
class Checkpoint:
    config: LaFormerConfig
    state_dict: dict[str, torch.Tensor]  # Hugging Face names: model.layers.0.self_attn.q_proj.weight, lm_head.weight
    path: Path
    format: str  # "gguf" or "huggingface"
    tensor_types: dict[str, str] = field(default_factory=dict)  # name -> storage type (Q4_1, F32, ...)
