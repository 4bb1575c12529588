"""``from_pretrained`` / ``save_pretrained`` for every model class.

The model classes know nothing about file formats: this mixin asks ``laformer.formats`` for a config and a
Hugging Face-named state dict, adapts the names to the class (decoder only, causal LM, classifier), and
assigns the tensors into a model built on the meta device, so no second copy of the weights is made.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TypeVar

import torch
from torch import nn

from laformer.config import LaFormerConfig
from laformer.embeddings import encode as embed
from laformer.errors import CheckpointError, ConfigError
from laformer.prune import apply_pruned_shapes

T = TypeVar("T", bound="PreTrainedMixin")

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class PreTrainedMixin:
    """Each model class says where its decoder and its head sit in a checkpoint; subclasses inherit both."""

    base_model_prefix: str = "model"  # the decoder's tensors are "<prefix>.layers..." ("" for the bare decoder)
    hf_architecture: str  # the transformers class a saved folder loads as (config.json "architectures")
    output_head: str | None = None  # the head's tensors are "<output_head>.weight" (or its quantized parts)
    new_head_allowed: bool = False  # a checkpoint without this head (or with another label count) gets a fresh one
    config: LaFormerConfig

    @classmethod
    def from_pretrained(
        cls: type[T],
        name_or_path: str | Path,
        dtype: torch.dtype | str = torch.float32,
        attention: Any = None,
        quantize: str | None = None,
        group_size: int | None = None,
        **config_overrides: Any,
    ) -> T:
        """Load from a registry name, a GGUF file or a Hugging Face folder.

        Keyword arguments override config fields, e.g. ``id2label={0: "neg", 1: "pos"}`` or ``num_labels=3``
        for a classifier whose head is new (it is then initialised at random, ready for fine-tuning).
        ``attention`` (a backend or a config such as ``laformer.ama.AMAConfig``) replaces exact attention.
        ``quantize="int8"|"int4"`` swaps the linears for weight-only quantized ones (``group_size`` inputs per
        scale; see ``laformer.quantization.quantize_model``); checkpoints saved quantized load quantized anyway.
        """
        from laformer.formats import load_checkpoint

        dtype = resolve_dtype(dtype)
        checkpoint = load_checkpoint(name_or_path, dtype)
        config = apply_overrides(checkpoint.config, config_overrides)
        check_layer_count(checkpoint.state_dict, config, checkpoint.path)
        with torch.device("meta"), skip_init():
            model = cls(config)
        state = cls._adapt_state_dict(checkpoint.state_dict, config)
        model._restore_structure(state)
        model._assign_weights(state, checkpoint.path, dtype)
        model.checkpoint_info = {"path": str(checkpoint.path), "format": checkpoint.format,
                                 "tensor_types": checkpoint.tensor_types}
        if quantize is not None:
            model._quantize(quantize, group_size, checkpoint)
        if attention is not None:
            model.decoder.set_attention(attention)
        return model.eval()

    def _restore_structure(self, state: dict[str, torch.Tensor]) -> None:
        """Give a model built from its config the pruned shapes and quantized layers its checkpoint was saved with."""
        if "pruning" in self.config.extra:
            apply_pruned_shapes(self)
        if "quantization_config" in self.config.extra:
            from laformer.quantization import swap_for_state_dict  # seconds to import (its kernels): only when used

            swap_for_state_dict(self, state)

    def _quantize(self, mode: str, group_size: int | None, checkpoint) -> None:
        from laformer.quantization import is_quantized, quantize_model  # seconds to import: only when used

        if is_quantized(self):
            raise ConfigError(
                f"{checkpoint.path} is already quantized ({self.config.extra['quantization_config']['mode']}); "
                "load it without quantize=, or quantize its float original"
            )
        tensors = None
        if checkpoint.format == "gguf":  # take Q8_0/Q4_0/Q4_1 blocks over as they are
            from laformer.formats.gguf import read_gguf_tensors

            tensors = read_gguf_tensors(checkpoint.path)
        quantize_model(self, mode, group_size, gguf_tensors=tensors)

    @classmethod
    def from_config(cls: type[T], config: LaFormerConfig, seed: int | None = None) -> T:
        """A randomly initialised model (normal(0, initializer_range) weights, unit norms)."""
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(config)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=config.initializer_range)
        return model

    @classmethod
    def _adapt_state_dict(cls, state: dict[str, torch.Tensor], config: LaFormerConfig) -> dict[str, torch.Tensor]:
        """Hugging Face names -> this class's names; other classes' heads are dropped."""
        prefix, head = cls.base_model_prefix, cls.output_head
        adapted: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            body = name[len("model."):] if name.startswith("model.") else None
            if body is not None:
                adapted[f"{prefix}.{body}" if prefix else body] = tensor
            elif head is not None and name.startswith(f"{head}."):  # .weight, or a quantized head's .qweight/.scales
                adapted[name] = tensor
        if cls.new_head_allowed:
            weight = adapted.get(f"{head}.weight")
            if weight is not None and weight.shape[0] != config.num_labels:
                del adapted[f"{head}.weight"]  # another label count: _assign_weights makes a fresh head
        elif head is not None and config.tie_word_embeddings:
            adapted.pop(f"{head}.weight", None)  # tied to the embedding
        return adapted

    def _assign_weights(self, state: dict[str, torch.Tensor], source: Path, dtype: torch.dtype) -> None:
        """Check the checkpoint's names and shapes against the model built from its config, then assign them.

        A fresh classifier head is allocated only after that check: a config claiming ``hidden_size=10**9``
        must be refused for its mismatching embedding, not fail allocating a (labels, 10**9) head."""
        expected = {name: p for name, p in self.state_dict(keep_vars=True).items()}
        if getattr(self.config, "tie_word_embeddings", False):
            expected.pop("lm_head.weight", None)
        head = f"{self.output_head}.weight"
        fresh_head = head if self.new_head_allowed and head in expected and head not in state else None
        missing = sorted(set(expected) - set(state) - {fresh_head})
        if missing:
            raise CheckpointError(
                f"{source} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}; "
                "the checkpoint is incomplete or of another architecture"
            )
        for name, tensor in state.items():
            if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
                raise CheckpointError(
                    f"tensor {name!r} in {source} has shape {tuple(tensor.shape)}, but the config implies "
                    f"{tuple(expected[name].shape)}; the config and weights do not match"
                )
        if fresh_head is not None:
            fresh = torch.empty(expected[fresh_head].shape, dtype=dtype)
            state = {**state, fresh_head: nn.init.normal_(fresh, std=self.config.initializer_range)}
        self.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
        if hasattr(self, "tie_weights"):
            self.tie_weights()
        self.decoder.reset_buffers()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a Hugging Face folder (config.json + model.safetensors) that ``transformers`` can load."""
        from laformer.formats.huggingface import save_hf_folder

        state = {name: t for name, t in self.state_dict().items()}
        if not self.base_model_prefix:
            state = {f"model.{name}": t for name, t in state.items()}
        save_hf_folder(state, self.config, directory, self.hf_architecture)

    def save_gguf(self, path: str | Path, type: str = "f16", tokenizer: Any = None) -> Path:
        """Write a GGUF file for llama.cpp/Ollama (``type``: f32, f16, bf16, q8_0, q4_0, q4_1); see docs/export.md."""
        from laformer.formats.gguf_export import save_gguf

        return save_gguf(self, path, type, tokenizer)

    def num_parameters(self, trainable_only: bool = False) -> int:
        params = {id(p): p for p in self.parameters() if p.requires_grad or not trainable_only}
        return sum(p.numel() for p in params.values())

    def encode(self, texts, tokenizer, **kwargs) -> torch.Tensor:
        """Sentence embeddings (N, hidden); see ``laformer.embeddings.encode`` for the options."""
        return embed(self, tokenizer, texts, **kwargs)


@contextmanager
def skip_init() -> Iterator[None]:
    """Make ``torch.nn.init`` a no-op while building a model whose weights are about to be replaced.

    Random init on the meta device is wasted work, and ``normal_`` there even imports ``torch._dynamo`` (~3-5 s).
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def check_layer_count(state: dict[str, torch.Tensor], config: LaFormerConfig, source: Path) -> None:
    """Refuse a config claiming more layers than the checkpoint holds before building them: even on the meta
    device each layer is a Python object, so ``block_count=2**31 - 1`` would build for hours."""
    last = config.num_hidden_layers - 1
    if not any(name.startswith(f"model.layers.{last}.") for name in state):
        raise CheckpointError(
            f"the config of {source} claims {config.num_hidden_layers} layers, but the checkpoint has no tensors for "
            f"layer {last}; the config (num_hidden_layers / block_count) and the weights do not match"
        )


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use 'float32' or 'bfloat16'")
    return dtype


def apply_overrides(config: LaFormerConfig, overrides: dict[str, Any]) -> LaFormerConfig:
    if "num_labels" in overrides:
        num_labels = int(overrides.pop("num_labels"))
        overrides.setdefault("id2label", {i: f"LABEL_{i}" for i in range(num_labels)})
    if "labels" in overrides:
        overrides.setdefault("id2label", dict(enumerate(overrides.pop("labels"))))
    if "id2label" in overrides and "label2id" not in overrides:
        overrides["label2id"] = None
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown from_pretrained argument(s) {unknown}; valid config fields are {sorted(fields)}")
    return dataclasses.replace(config, **overrides)
