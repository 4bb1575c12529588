"""The classification fine-tuning recipe: presets, and the choices made from the data (max length, evaluation rhythm).

``default`` is what ``laformer finetune --task classification`` and :func:`classification_arguments` use with no
flags; ``fast`` gives a first result in minutes on a laptop; ``best`` trades time for accuracy. The numbers were
chosen from validation runs on SST-2, Financial PhraseBank, ChnSentiCorp, BANKING77 and AG News (docs/finetuning.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from laformer.errors import TrainingError
from laformer.training.arguments import TrainingArguments

NORMS = ("input_layernorm", "post_attention_layernorm", "norm")


@dataclass(frozen=True)
class Preset:
    epochs: float
    learning_rate: float
    lora_r: int
    lora_alpha: float
    target_modules: Sequence[str] | str
    train_norms: bool  # norms trained in full next to the head (saved with the adapter)
    length_percentile: float  # max length covers this share of the training texts...
    length_cap: int  # ...but never more than this many tokens
    evals_per_epoch: int
    early_stopping_patience: int | None
    batch_size: int = 16
    warmup_ratio: float = 0.06
    lr_scheduler: str = "cosine"


PRESETS = {
    "fast": Preset(epochs=1, learning_rate=2e-3, lora_r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"),
                   train_norms=False, length_percentile=0.9, length_cap=96, evals_per_epoch=1,
                   early_stopping_patience=None),
    "default": Preset(epochs=3, learning_rate=1e-3, lora_r=8, lora_alpha=16, target_modules="all-linear",
                      train_norms=False, length_percentile=0.95, length_cap=128, evals_per_epoch=2,
                      early_stopping_patience=2),
    "best": Preset(epochs=5, learning_rate=5e-4, lora_r=16, lora_alpha=32, target_modules="all-linear",
                   train_norms=True, length_percentile=0.99, length_cap=512, evals_per_epoch=2,
                   early_stopping_patience=3),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise TrainingError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}")
    return PRESETS[name]


def choose_max_length(lengths: Sequence[int], percentile: float = 0.95, cap: int = 256, floor: int = 8) -> int:
    """The token length that covers ``percentile`` of the examples, within [floor, cap]: long-tailed data (AG News)
    keeps its typical text whole without padding every batch to its longest outlier."""
    if not lengths:
        raise TrainingError("cannot choose a max length from no examples; give the training data at least one")
    ordered = sorted(lengths)
    covered = ordered[min(len(ordered) - 1, math.ceil(percentile * len(ordered)) - 1)]
    return max(floor, min(cap, covered))


def native_bf16() -> bool:
    """Whether bfloat16 matrix products run natively on the device a run will use (a CUDA GPU with bf16, or a CPU
    with AVX512-BF16 or AMX). There the recipe trains and evaluates under bf16 autocast: a LoRA step of 16 x 92
    tokens took 16.5 s instead of 31.5 s on two AVX512-BF16 cores. Elsewhere bf16 is emulated and slower, so fp32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def lora_options(preset: str | Preset = "default") -> dict[str, Any]:
    """The preset's PEFT options (the fields of ``laformer.peft.LoraConfig``)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    modules_to_save = ("score", *NORMS) if p.train_norms else ("score",)
    return {"r": p.lora_r, "init_r": p.lora_r, "lora_alpha": p.lora_alpha, "target_modules": p.target_modules,
            "modules_to_save": modules_to_save}


def classification_arguments(output_dir: str, preset: str | Preset = "default", **overrides: Any) -> TrainingArguments:
    """The preset's TrainingArguments for a classification run; ``overrides`` are TrainingArguments fields that
    win over it (e.g. ``report_to=[]``). The best checkpoint by validation macro-F1 is kept and loaded at the end;
    bf16 autocast is on where the hardware runs it natively (:func:`native_bf16`)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    fields: dict[str, Any] = dict(
        output_dir=output_dir, learning_rate=p.learning_rate, num_epochs=p.epochs, batch_size=p.batch_size,
        lr_scheduler=p.lr_scheduler, warmup_ratio=p.warmup_ratio, bucket_by_length=True,
        evals_per_epoch=p.evals_per_epoch, metric_for_best_model="macro_f1", greater_is_better=True,
        load_best_model_at_end=True, early_stopping_patience=p.early_stopping_patience, bf16=native_bf16(),
    )
    fields.update(overrides)
    return TrainingArguments(**fields)
