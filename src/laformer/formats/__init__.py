"""Checkpoint formats, each a pure converter from files to a config and a Hugging Face-named state dict."""

from __future__ import annotations

from pathlib import Path

import torch

from laformer.errors import CheckpointError
from laformer.formats.checkpoint import Checkpoint
from laformer.formats.gguf import is_gguf, load_gguf
from laformer.formats.huggingface import load_hf_folder
from laformer.formats.registry import DEFAULT_MODEL, resolve


def load_checkpoint(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Read any supported checkpoint (registry name, GGUF file, Hugging Face folder)."""
    path = resolve(name_or_path)
    if path.is_dir():
        return load_hf_folder(path, dtype)
    if is_gguf(path):
        return load_gguf(path, dtype)
    if path.name.endswith(".safetensors") or path.name == "config.json":
        return load_hf_folder(path.parent, dtype)
    raise CheckpointError(
        f"{path} is not a GGUF file (it lacks the 'GGUF' magic bytes) nor a Hugging Face model folder; "
        "pass a .gguf file or a folder with config.json and *.safetensors"
    )


__all__ = ["Checkpoint", "DEFAULT_MODEL", "load_checkpoint", "resolve"]
