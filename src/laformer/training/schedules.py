"""Learning-rate schedules: linear warm-up, then cosine, linear or constant decay, or an adaptive plateau rule.

The schedule is a multiplier of each parameter group's base rate, kept in a tiny state dict so
checkpoints restore it exactly.
"""

from __future__ import annotations

import math

import torch


class LRSchedule:
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kind: str,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        plateau_factor: float = 0.5,
        plateau_patience: int = 1,
        greater_is_better: bool = True,
    ) -> None:
        self.optimizer = optimizer
        self.kind = kind
        self.total_steps = max(1, total_steps)
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.plateau_factor = plateau_factor
        self.plateau_patience = plateau_patience
        self.greater_is_better = greater_is_better
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.scale = 1.0  # lowered by the plateau rule
        self.best: float | None = None
        self.stalls = 0
        self.apply(0)

    def multiplier(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind in ("constant", "plateau"):
            return self.scale
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay

    def apply(self, step: int) -> None:
        """Set the rate used by optimiser step number ``step`` (0-based)."""
        factor = self.multiplier(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def on_evaluate(self, metric: float) -> None:
        """The adaptive rule: after ``plateau_patience`` evaluations without improvement, scale the rate down."""
        improved = self.best is None or (metric > self.best if self.greater_is_better else metric < self.best)
        if improved:
            self.best, self.stalls = metric, 0
            return
        self.stalls += 1
        if self.kind == "plateau" and self.stalls >= self.plateau_patience:
            self.scale *= self.plateau_factor
            self.stalls = 0

    @property
    def last_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "stalls": self.stalls}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best, self.stalls = state["scale"], state["best"], state["stalls"]


def build_optimizer(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; norms, biases and embeddings get no weight decay."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        exempt = param.ndim < 2 or "norm" in name or "embed_tokens" in name or name.endswith("bias")
        (no_decay if exempt else decay).append(param)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)
