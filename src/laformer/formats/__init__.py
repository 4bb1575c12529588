"""Checkpoint formats, each a pure converter from files to a config and a Hugging Face-named state dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from laformer.config import LaFormerConfig
from laformer.errors import CheckpointError
from laformer.formats.registry import DEFAULT_MODEL, resolve


@dataclass
class Checkpoint:
    config: LaFormerConfig
    state_dict: dict[str, torch.Tensor]  # Hugging Face names: model.layers.0.self_attn.q_proj.weight, lm_head.weight
    path: Path
    format: str  # "gguf" or "huggingface"
    tensor_types: dict[str, str] = field(default_factory=dict)  # name -> storage type (Q4_1, F32, ...)


def load_checkpoint(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Read any supported checkpoint (registry name, GGUF file, Hugging Face folder)."""
    path = resolve(name_or_path)
    if path.is_dir():
        from laformer.formats.huggingface import load_hf_folder

        return load_hf_folder(path, dtype)
    from laformer.formats.gguf import is_gguf, load_gguf

    if is_gguf(path):
        return load_gguf(path, dtype)
    if path.name.endswith(".safetensors") or path.name == "config.json":
        from laformer.formats.huggingface import load_hf_folder

        return load_hf_folder(path.parent, dtype)
    raise CheckpointError(
        f"{path} is not a GGUF file (it lacks the 'GGUF' magic bytes) nor a Hugging Face model folder; "
        "pass a .gguf file or a folder with config.json and *.safetensors"
    )


__all__ = ["Checkpoint", "DEFAULT_MODEL", "load_checkpoint", "resolve"]
