"""Every knob of a training run in one dataclass, validated up front so a typo fails before any work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from laformer.errors import TrainingError

SCHEDULES = ("cosine", "linear", "constant", "plateau")
REPORTERS = ("tensorboard", "wandb")


@dataclass
class TrainingArguments:
    output_dir: str
    learning_rate: float = 2e-5
    weight_decay: float = 0.0  # decoupled (AdamW); never applied to norms, biases or embeddings
    adam_betas: tuple[float, float] = (0.9, 0.999)
    num_epochs: float = 1.0
    max_steps: int = -1  # optimiser steps; overrides num_epochs when > 0
    batch_size: int = 8  # per process and micro-batch
    eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    lr_scheduler: str = "cosine"  # warm-up then cosine/linear decay, constant, or plateau (lowered on stalls)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    bf16: bool = False  # bfloat16 autocast
    gradient_checkpointing: bool = False
    dropout: float = 0.0  # on attention/MLP outputs and the classifier input, while training
    bucket_by_length: bool = False
    fgm_epsilon: float = 0.0  # > 0: adversarial training with FGM on the input embeddings
    eval_steps: int | None = None  # None: evaluate at the end of every epoch
    evals_per_epoch: int = 1  # without eval_steps: evaluations spread evenly over each epoch
    save_steps: int | None = None  # None: checkpoint at the end only
    save_total_limit: int | None = 2
    logging_steps: int = 10
    metric_for_best_model: str | None = None  # default: macro_f1 for classification (class-balanced), loss otherwise
    greater_is_better: bool | None = None
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    load_best_model_at_end: bool = True
    distributed: str = "ddp"  # under torchrun: "ddp" (a copy per process) or "fsdp" (FSDP2, parameters sharded)
    seed: int = 42
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    progress_bar: bool = True
    run_name: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1"),
            (self.max_steps > 0 or self.num_epochs > 0, "set num_epochs > 0 or max_steps > 0"),
            (self.lr_scheduler in SCHEDULES, f"lr_scheduler {self.lr_scheduler!r} is unknown; use one of {SCHEDULES}"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (0 < self.plateau_factor < 1, "plateau_factor must be in (0, 1)"),
            (self.fgm_epsilon >= 0, "fgm_epsilon must be >= 0"),
            (self.evals_per_epoch >= 1, "evals_per_epoch must be at least 1"),
            (self.distributed in ("ddp", "fsdp"), f"distributed must be 'ddp' or 'fsdp', got {self.distributed!r}"),
            (set(self.report_to) <= set(REPORTERS), f"report_to accepts {REPORTERS}, got {self.report_to}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(f"invalid training argument: {message}")
        self.adam_betas = tuple(self.adam_betas)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
