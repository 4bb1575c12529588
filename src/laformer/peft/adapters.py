"""Houlsby bottleneck adapters (Houlsby et al., 2019): a small residual MLP after attention and after the MLP.

``BottleneckAdapter`` wraps a block's output projection (``o_proj``, ``down_proj``): ``y = base(x)`` and then
``y + up(act(down(y)))``, which is the paper's placement (after the sub-layer, before its residual add). The
up-projection starts at zero so the model is unchanged until training moves it. As in the paper the RMSNorm
weights are trained too (``train_norms``). Adapters are non-linear, so unlike LoRA they cannot be merged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from laformer.errors import ConfigError
from laformer.model import RMSNorm
from laformer.peft.targets import find_modules_to_save, find_targets, parameters_under, replace_module
from laformer.validation import check_field_types

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


@dataclass
class AdapterConfig:
    """Bottleneck width, the wrapped output projections, the activation and whether norms are trained."""

    bottleneck: int = 64
    target_modules: Sequence[str] | str = ("o_proj", "down_proj")
    activation: str = "silu"
    adapter_dropout: float = 0.0
    train_norms: bool = True
    modules_to_save: Sequence[str] | None = None

    peft_type = "BOTTLENECK"

    def __post_init__(self) -> None:
        check_field_types(self)  # adapter_config.json may hold any JSON type in any field
        if not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise ConfigError(f"adapter bottleneck must be a positive integer, got {self.bottleneck!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"adapter activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = tuple(self.modules_to_save)


class BottleneckAdapter(nn.Module):
    def __init__(self, base: nn.Module, bottleneck: int, activation: str = "silu", dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.activation = activation
        device = next(base.parameters(), next(base.buffers(), torch.empty(0))).device
        self.adapter_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.adapter_down = nn.Linear(self.out_features, bottleneck, device=device)
        self.adapter_up = nn.Linear(bottleneck, self.out_features, device=device)
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # near-identity start, as in the paper
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h = self.adapter_down(self.adapter_dropout(y.to(self.adapter_down.weight.dtype)))
        return y + self.adapter_up(ACTIVATIONS[self.activation](h)).to(y.dtype)

    def extra_repr(self) -> str:
        return f"bottleneck={self.adapter_down.out_features}, activation={self.activation}"


def inject_adapters(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Wrap the targets in ``BottleneckAdapter``; returns the names of the parameters to train."""
    for name in find_targets(model, config.target_modules, "adapter"):
        replace_module(model, name, BottleneckAdapter(model.get_submodule(name), config.bottleneck,
                                                      config.activation, config.adapter_dropout))
    trainable = [n for n, _ in model.named_parameters() if ".adapter_down." in n or ".adapter_up." in n]
    if config.train_norms:
        norms = [n for n, m in model.named_modules() if isinstance(m, RMSNorm)]
        trainable += parameters_under(model, norms)
    return trainable + parameters_under(model, find_modules_to_save(model, config.modules_to_save))
