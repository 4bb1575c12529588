"""The method-independent API: attach an adapter, see what trains, merge, and get the per-step hooks.

One adapter per model. ``get_peft_model`` swaps modules in place and records on the model ``peft_config`` (the
config used) and ``peft_parameter_names`` (what ``save_adapter`` writes).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from laformer.errors import ConfigError
from laformer.peft.adalora import AdaLoraConfig, AdaLoraHooks, SVDLinear, inject_adalora
from laformer.peft.adapters import AdapterConfig, BottleneckAdapter, inject_adapters
from laformer.peft.lora import LoraConfig, LoRALinear, inject_lora
from laformer.peft.prefix import PrefixConfig, inject_prefix, remove_prefix
from laformer.peft.targets import freeze_except, replace_module

PeftConfig = LoraConfig | AdaLoraConfig | AdapterConfig | PrefixConfig
INJECT = {LoraConfig: inject_lora, AdaLoraConfig: inject_adalora, AdapterConfig: inject_adapters,
          PrefixConfig: inject_prefix}
MERGEABLE = (LoRALinear, SVDLinear)


class TrainingHooks(Protocol):
    """What a trainer calls for methods that need per-step work (every method returns one)."""

    def regularization_loss(self) -> torch.Tensor:
        """A term to add to the task loss before ``backward`` (zero for most methods)."""
        ...

    def on_step_end(self, global_step: int) -> None:
        """Called after ``optimizer.step()`` and before ``zero_grad()`` (gradients still present)."""
        ...


class NoHooks:
    def regularization_loss(self) -> torch.Tensor:
        return torch.zeros(())

    def on_step_end(self, global_step: int) -> None:
        pass


def get_peft_model(model: nn.Module, config: PeftConfig) -> nn.Module:
    """Attach the adapter described by ``config`` in place and freeze everything else; returns ``model``.

    A sequence classifier's new head ``score`` is trained and saved with the adapter unless
    ``modules_to_save`` says otherwise (as PEFT does for ``task_type="SEQ_CLS"``).
    """
    if type(config) not in INJECT:
        raise ConfigError(f"unknown PEFT config {type(config).__name__}; use one of {[c.__name__ for c in INJECT]}")
    if getattr(model, "peft_config", None) is not None:
        raise ConfigError(
            f"the model already has a {model.peft_config.peft_type} adapter; call merge_and_unload(model) first "
            "or start from a fresh model"
        )
    if config.modules_to_save is None and hasattr(model, "score"):
        config.modules_to_save = ("score",)
    trainable = INJECT[type(config)](model, config)
    model.peft_config = config
    model.peft_parameter_names = freeze_except(model, trainable)
    model.peft_hooks = AdaLoraHooks(model, config) if isinstance(config, AdaLoraConfig) else NoHooks()
    return model


def peft_training_hooks(model: nn.Module) -> TrainingHooks:
    """The hooks object of the model's adapter (always the same object; ``NoHooks`` when nothing is needed)."""
    return getattr(model, "peft_hooks", None) or NoHooks()


def trainable_summary(model: nn.Module) -> str:
    """One line: trainable and total parameter counts (shared tensors counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    percent = 100 * trainable / max(total, 1)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    print(trainable_summary(model))


def _mergeable(model: nn.Module) -> list[nn.Module]:
    config = getattr(model, "peft_config", None)
    if config is None:
        raise ConfigError("the model has no adapter to merge; attach one with get_peft_model or load_adapter")
    if not isinstance(config, (LoraConfig, AdaLoraConfig)):
        raise ConfigError(
            f"{config.peft_type} adapters cannot be merged into the weights (only LoRA and AdaLoRA are linear "
            "updates); keep the adapter attached, or save it with save_adapter"
        )
    return [m for m in model.modules() if isinstance(m, MERGEABLE)]


def merge_adapter(model: nn.Module) -> None:
    """Fold every LoRA/AdaLoRA update into its base weight (inference without the extra matmuls)."""
    for layer in _mergeable(model):
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Undo ``merge_adapter`` so training can continue."""
    for layer in _mergeable(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge LoRA/AdaLoRA into the base weights and remove the wrappers: a plain model again (all trainable).

    A quantized base is dequantized first, so a QLoRA fine-tune ends as a float model (quantize it again if wanted).
    """
    _mergeable(model)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, MERGEABLE)]:
        replace_module(model, name, _merged_linear(layer))
    return unload(model)


@torch.no_grad()
def _merged_linear(layer: LoRALinear | SVDLinear) -> nn.Module:
    """The base with the update folded in; a quantized base (QLoRA) becomes a float ``nn.Linear``."""
    base = layer.base_layer
    if not hasattr(base, "dequantize"):
        layer.merge()
        return base
    weight = base.dequantize(torch.float32) + layer.delta_weight().float()
    bias = getattr(base, "bias", None)
    linear = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=weight.device)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapter without merging it: the base model as it was (modules_to_save keep their training)."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, (*MERGEABLE, BottleneckAdapter))]:
        if getattr(layer, "merged", False):
            layer.unmerge()
        replace_module(model, name, layer.base_layer)
    if hasattr(model, "prefix_encoder"):
        remove_prefix(model)
    for attr in ("peft_config", "peft_parameter_names", "peft_hooks"):
        model.__dict__.pop(attr, None)
    for param in model.parameters():
        param.requires_grad_(True)
    return model
