"""laformer: LLaMA-family language models in plain PyTorch."""

from laformer.cache import KVCache
from laformer.config import LaFormerConfig
from laformer.errors import (
    CheckpointError,
    ConfigError,
    GenerationError,
    LaFormerError,
    TokenizerError,
    TrainingError,
)
from laformer.formats.registry import DEFAULT_MODEL
from laformer.model import LaFormerForCausalLM, LaFormerForSequenceClassification, LaFormerModel
from laformer.tokenizer import LaFormerTokenizer

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "CheckpointError",
    "ConfigError",
    "GenerationError",
    "KVCache",
    "LaFormerConfig",
    "LaFormerError",
    "LaFormerForCausalLM",
    "LaFormerForSequenceClassification",
    "LaFormerModel",
    "LaFormerTokenizer",
    "TokenizerError",
    "TrainingError",
]
