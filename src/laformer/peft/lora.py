"""LoRA (Hu et al., 2021): a frozen linear layer plus a trainable low-rank update ``B @ A * alpha / r``.

``LoRALinear`` wraps any linear-like module (``nn.Linear`` or a quantized swap with ``in_features``,
``out_features`` and a forward), so QLoRA-style training on a quantized base needs nothing extra. The wrapped
layer stays reachable as ``.base_layer`` and the factors are ``lora_A``/``lora_B``, which gives exactly
Hugging Face PEFT's tensor names (``...q_proj.lora_A.weight``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from laformer.errors import ConfigError
from laformer.peft.targets import (
    check_untied,
    find_modules_to_save,
    find_targets,
    parameters_under,
    replace_module,
)
from laformer.validation import check_field_types

BIAS_MODES = ("none", "lora_only", "all")


@dataclass
class LoraConfig:
    """LoRA settings, named as in Hugging Face PEFT.

    ``target_modules``: module names (matched as dotted-name suffixes), a regex over full names, or "all-linear".
    ``bias``: which existing biases to train as well: "none", "lora_only" (of wrapped layers) or "all".
    ``modules_to_save``: modules trained in full and saved with the adapter; a classifier's ``score`` is added
    automatically. ``use_rslora`` scales by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: Sequence[str] | str = ("q_proj", "v_proj")
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None
    use_rslora: bool = False

    peft_type = "LORA"

    def __post_init__(self) -> None:
        check_field_types(self)  # adapter_config.json may hold any JSON type in any field
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"LoRA bias {self.bias!r} is not one of {BIAS_MODES}")
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = tuple(self.modules_to_save)


class MergeableDelta(nn.Module):
    """Merging for wrappers whose update is a weight delta: ``delta_weight()`` added to ``base_layer``'s weight."""

    base_layer: nn.Module
    merged: bool

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight = mergeable_weight(self.base_layer)
            weight += self.delta_weight().to(weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = mergeable_weight(self.base_layer)
            weight -= self.delta_weight().to(weight.dtype)
            self.merged = False


class LoRALinear(MergeableDelta):
    """``base(x) + B(A(dropout(x))) * scaling``; ``merge`` folds the update into the base weight."""

    def __init__(
        self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, *, use_rslora: bool = False
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        device = next(base.parameters(), next(base.buffers(), torch.empty(0))).device
        # Adapter weights stay float32 even over a bf16 or quantized base: tiny, and stabler to train.
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the wrapped model starts out exactly equal to the base
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (update * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)


    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def mergeable_weight(base: nn.Module) -> torch.Tensor:
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ConfigError(
            f"cannot merge an adapter into a {type(base).__name__}: its weight is not a floating-point matrix "
            "(a quantized base); keep the adapter unmerged, or load the base in float32/bfloat16 to merge"
        )
    return weight.data


def inject_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap the targets in ``LoRALinear``; returns the names of the parameters to train."""
    targets = find_targets(model, config.target_modules, "LoRA")
    check_untied(model, targets, "LoRA")
    for name in targets:
        base = model.get_submodule(name)
        replace_module(model, name, LoRALinear(base, config.r, config.lora_alpha, config.lora_dropout,
                                               use_rslora=config.use_rslora))
    trainable = [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    if config.bias == "all":
        trainable += [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    elif config.bias == "lora_only":
        biased = [t for t in targets if getattr(model.get_submodule(t).base_layer, "bias", None) is not None]
        trainable += [f"{t}.base_layer.bias" for t in biased]
    trainable += parameters_under(model, find_modules_to_save(model, config.modules_to_save))
    return trainable
