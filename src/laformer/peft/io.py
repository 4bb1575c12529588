"""Saving and loading adapters on their own: ``adapter_config.json`` + ``adapter_model.safetensors``.

LoRA and AdaLoRA use Hugging Face PEFT's format exactly (tensor names ``base_model.model.<module>.lora_A.weight``,
PEFT's config keys, AdaLoRA pruned to its ``rank_pattern``), so ``peft.PeftModel.from_pretrained`` loads them
onto the matching ``transformers`` model and PEFT's adapters load here. Modules trained in full
(``modules_to_save``, e.g. the classifier ``score``) are saved beside them under PEFT's names
(``base_model.model.score.weight``). Bottleneck adapters and prefix tuning have no PEFT equivalent that
fits, so they use the same two files with laformer's own ``peft_type`` ("LAFORMER_BOTTLENECK",
"LAFORMER_PREFIX_TUNING"): the config dataclass fields plus the trained tensors under the same naming rule.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from laformer.errors import CheckpointError, ConfigError
from laformer.model import LaFormerForCausalLM, LaFormerForSequenceClassification
from laformer.peft.adalora import AdaLoraConfig, SVDLinear
from laformer.peft.adapters import AdapterConfig
from laformer.peft.lora import LoraConfig
from laformer.peft.prefix import PrefixConfig
from laformer.peft.tuner import PeftConfig, get_peft_model, unload
from laformer.validation import read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
FILE_TYPES: dict[str, type] = {
    "LORA": LoraConfig,
    "ADALORA": AdaLoraConfig,
    "LAFORMER_BOTTLENECK": AdapterConfig,
    "LAFORMER_PREFIX_TUNING": PrefixConfig,
}
# PEFT LoRA features that change the computation; an adapter using them cannot load faithfully here.
UNSUPPORTED_LORA = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "layers_to_transform": None,
                    "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None,
                    "trainable_token_indices": None}


def task_type(model: nn.Module) -> str:
    """PEFT's name for what the model's head does (subclasses of laformer's models included)."""
    if isinstance(model, LaFormerForCausalLM):
        return "CAUSAL_LM"
    return "SEQ_CLS" if isinstance(model, LaFormerForSequenceClassification) else "FEATURE_EXTRACTION"


def file_type(config: PeftConfig) -> str:
    return next(name for name, cls in FILE_TYPES.items() if isinstance(config, cls))


def config_to_dict(config: PeftConfig, model: nn.Module) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    for key, value in data.items():
        if isinstance(value, tuple):
            data[key] = list(value)
    info = getattr(model, "checkpoint_info", None) or {}
    data.update(peft_type=file_type(config), task_type=task_type(model),
                base_model_name_or_path=info.get("path"), inference_mode=True)
    if isinstance(config, (LoraConfig, AdaLoraConfig)):  # PEFT's defaults for what we do not implement
        data.update(UNSUPPORTED_LORA, init_lora_weights=True, layers_pattern=None, revision=None,
                    exclude_modules=None)
    if isinstance(config, AdaLoraConfig):
        data.update(r=8, rank_pattern=config.rank_pattern)
    return data


def config_from_dict(data: dict[str, Any], source: Path) -> PeftConfig:
    peft_type = data.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in FILE_TYPES:
        raise ConfigError(
            f"{source} has peft_type {peft_type!r}; laformer loads {sorted(FILE_TYPES)} (PEFT's LoRA and AdaLoRA "
            "plus laformer's own bottleneck and prefix formats)"
        )
    cls = FILE_TYPES[peft_type]
    if cls is LoraConfig:
        used = [k for k, default in UNSUPPORTED_LORA.items() if data.get(k, default) not in (default, None, {}, False)]
        if used:
            raise ConfigError(f"{source} uses PEFT LoRA option(s) {used} that laformer does not implement; "
                              "retrain the adapter without them")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in fields}
    if cls is AdaLoraConfig:
        kwargs["init_lora_weights"] = "gaussian"  # irrelevant once the weights are loaded
    return cls(**kwargs)


def save_adapter(model: nn.Module, directory: str | Path) -> None:
    """Write the adapter (and any ``modules_to_save``) of ``model`` to ``directory``."""
    config = getattr(model, "peft_config", None)
    if config is None:
        raise ConfigError("the model has no adapter to save; attach one with get_peft_model first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    state = {name: params[name].detach() for name in model.peft_parameter_names}
    if isinstance(config, AdaLoraConfig) and config.rank_pattern:
        state = _prune_to_rank_pattern(model, state, config.rank_pattern)
    tensors = {PREFIX + name: t.to("cpu").contiguous() for name, t in state.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    text = json.dumps(config_to_dict(config, model), indent=2, ensure_ascii=False)
    (directory / CONFIG_NAME).write_text(text + "\n")


def _prune_to_rank_pattern(model: nn.Module, state: dict[str, torch.Tensor], pattern: dict[str, list[bool]]):
    """Drop masked AdaLoRA triplets, as PEFT saves them (layers pruned at load time are already small)."""
    for name, layer in model.named_modules():
        if not isinstance(layer, SVDLinear) or len(pattern[f"{name}.lora_E"]) != layer.rank:
            continue
        keep = torch.tensor(pattern[f"{name}.lora_E"], dtype=torch.bool, device=layer.lora_E.device)
        state[f"{name}.lora_A"], state[f"{name}.lora_E"] = state[f"{name}.lora_A"][keep], state[f"{name}.lora_E"][keep]
        state[f"{name}.lora_B"] = state[f"{name}.lora_B"][:, keep]
    return state


def _read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {directory}; save the adapter with save_adapter (or PEFT)")
    return read_json(path, CheckpointError)


def read_adapter_config(directory: str | Path) -> PeftConfig:
    """The config dataclass of a saved adapter (its method is ``peft_type``)."""
    directory = Path(directory)
    return config_from_dict(_read_config_json(directory), directory / CONFIG_NAME)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Attach the adapter saved in ``directory`` to ``model`` (or refill the model's matching adapter).

    The method is read from ``adapter_config.json``. Every saved tensor must exist in the model with the same
    shape, otherwise the adapter belongs to another base model and a ``CheckpointError`` says which tensor.
    """
    directory = Path(directory)
    data = _read_config_json(directory)
    config = config_from_dict(data, directory / CONFIG_NAME)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS_NAME} in {directory}; the adapter folder is incomplete")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}; the file is corrupt or truncated") from exc
    _check_sizes(config, tensors, directory)
    current = getattr(model, "peft_config", None)
    if current is not None and type(current) is not type(config):
        raise ConfigError(f"the model already has a {current.peft_type} adapter but {directory} holds "
                          f"{config.peft_type}; load it onto a fresh model")
    if current is None:
        get_peft_model(model, config)
    try:
        _assign(model, tensors, directory, data.get("base_model_name_or_path"))
    except CheckpointError:
        if current is None:
            unload(model)  # leave the model as it was given
        raise
    return model


def _check_sizes(config: PeftConfig, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Every size in the config is some dimension of a saved tensor, so one larger than all of them is corrupt;
    refusing it here keeps a config claiming r=10**12 from allocating the adapter before its shapes are checked."""
    largest = max((max(t.shape, default=1) for t in tensors.values()), default=0)
    sizes = ["r", "init_r", "target_r", "bottleneck", "num_virtual_tokens"]
    if getattr(config, "prefix_projection", False):
        sizes.append("encoder_hidden_size")
    for name in sizes:
        value = getattr(config, name, None)
        if value is not None and value > largest:
            raise CheckpointError(f"{source / CONFIG_NAME} says {name}={value}, but no tensor in {WEIGHTS_NAME} has a "
                                  f"dimension that large (the largest is {largest}); the adapter folder is corrupt")


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path, base: str | None) -> None:
    params = dict(model.named_parameters())
    hint = f"the adapter was made for a different base model ({base or 'unknown'}); load it onto that model"
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        if name not in params:
            raise CheckpointError(f"{source / WEIGHTS_NAME} has tensor {key!r}, which this model lacks; {hint}")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(
                f"tensor {key!r} in {source / WEIGHTS_NAME} has shape {tuple(tensor.shape)} but the model's "
                f"{name!r} has {tuple(params[name].shape)}; {hint}"
            )
    names = {key.removeprefix(PREFIX) for key in tensors}
    missing = [n for n in model.peft_parameter_names if n not in names and not n.startswith(_optional_prefixes(model))]
    if missing:
        raise CheckpointError(f"{source / WEIGHTS_NAME} lacks {len(missing)} adapter tensor(s), e.g. {missing[:3]}; "
                              "the file is incomplete or from another adapter configuration")
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key.removeprefix(PREFIX)].copy_(tensor)


def _optional_prefixes(model: nn.Module) -> tuple[str, ...]:
    """modules_to_save may be absent from a file (PEFT lists 'classifier' and 'score' for any classifier)."""
    return tuple(f"{m}." for m in (model.peft_config.modules_to_save or ()))
