"""Model configuration: one dataclass whose field names match Hugging Face's ``LlamaConfig``.

Keeping the field names identical makes ``config.json`` a plain dict round trip.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from laformer.errors import ConfigError
from laformer.validation import check_field_types, check_finite, check_positive, read_json

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings")


@dataclass
class LaFormerConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    # Free-form extras (e.g. the PEFT or attention settings a checkpoint was saved with).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_field_types(self)  # config.json may hold any JSON type in any field
        check_positive(self, SIZES)
        check_finite(self, ("rms_norm_eps", "rope_theta"))
        check_finite(self, ("initializer_range",), positive=False)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(
                    f"rope_scaling type {rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}"
                )
        if self.id2label is not None:
            if not all(str(k).lstrip("-").isdigit() for k in self.id2label):
                raise ConfigError(f"id2label keys must be class ids (integers), got {sorted(map(str, self.id2label))[:5]}")
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.label2id is None:
                self.label2id = {v: k for k, v in self.id2label.items()}
        if self.label2id is not None:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in self.label2id.values()):
                raise ConfigError(f"label2id values must be class ids (integers), got {list(self.label2id.values())[:5]}")
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
            if self.id2label is None:
                self.id2label = {v: k for k, v in self.label2id.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label) if self.id2label else 2

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def to_dict(self) -> dict[str, Any]:
        """The fields under Hugging Face's ``LlamaConfig`` names. What depends on the model class and its weights
        (``architectures``, ``torch_dtype``) is added by ``formats.huggingface.save_hf_folder``, which writes
        ``config.json``."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if data["id2label"] is not None:
            data["id2label"] = {str(k): v for k, v in data["id2label"].items()}
        data.update(model_type="llama", hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=0.0)
        if self.extra:
            data["laformer"] = self.extra
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LaFormerConfig":
        """Build from a Hugging Face ``config.json`` dictionary, ignoring keys we do not use."""
        model_type = data.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "laformer"):
            raise ConfigError(
                f"model_type {model_type!r} is not a LLaMA-family architecture; laformer supports 'llama'"
            )
        if data.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {data['hidden_act']!r} is not supported; LLaMA uses 'silu'")
        if data.get("attention_bias") or data.get("mlp_bias"):
            raise ConfigError("checkpoints with attention or MLP biases are not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and k != "extra"}
        kwargs["extra"] = data.get("laformer", {})
        rope_params = data.get("rope_parameters")  # transformers >= 5 spelling
        if rope_params is not None and not isinstance(rope_params, dict):
            raise ConfigError(f"rope_parameters must be an object, got {rope_params!r}")
        if rope_params and "rope_theta" not in data:
            kwargs["rope_theta"] = rope_params.get("rope_theta", cls.rope_theta)
        if rope_params and kwargs.get("rope_scaling") is None:
            if rope_params.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if isinstance(kwargs.get("rope_scaling"), dict) and kwargs["rope_scaling"].get("rope_type", kwargs["rope_scaling"].get("type")) == "default":
            kwargs["rope_scaling"] = None
        return cls(**kwargs)

    @classmethod
    def load(cls, directory: str | Path) -> "LaFormerConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {directory}; a Hugging Face model folder needs one")
        data = read_json(path, ConfigError)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
