"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form ``P Λ Q`` whose rank budget is reallocated while training.

Each wrapped layer adds ``B @ (A * E) * alpha / init_r`` (PEFT's names: ``lora_A`` = Q (r, in), ``lora_E`` = Λ
(r, 1), ``lora_B`` = P (out, r)). Training needs two extra things per step, provided by ``AdaLoraHooks``
(returned by ``laformer.peft.peft_training_hooks``): an orthogonality penalty on P and Q added to the loss,
and, after ``optimizer.step()`` and before ``zero_grad()``, ``on_step_end(step)``, which scores every singular
triplet by smoothed sensitivity ``|w * grad|`` times its uncertainty and zeroes the least important ones so the
total rank follows a cubic schedule from ``init_r`` per layer down to ``target_r`` per layer. The semantics and
the saved format (pruned tensors plus ``rank_pattern`` in ``adapter_config.json``) are those of PEFT's
``AdaLoraModel.update_and_allocate``, so adapters move between the two libraries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from laformer.errors import ConfigError
from laformer.peft.lora import MergeableDelta
from laformer.peft.targets import (
    check_untied,
    find_modules_to_save,
    find_targets,
    parameters_under,
    replace_module,
)
from laformer.validation import check_field_types


@dataclass
class AdaLoraConfig:
    """AdaLoRA settings, named as in Hugging Face PEFT.

    Phases: ``tinit`` warm-up steps at the full budget, then a cubic decrease until step ``total_step - tfinal``
    (masking every ``deltaT`` steps), then ``tfinal`` steps at the final ranks. ``beta1``/``beta2`` smooth the
    sensitivity and its uncertainty. ``total_step`` may be set later with ``hooks.set_total_step``.
    ``init_lora_weights="orthogonal"`` starts P and Q orthonormal (zero penalty); the default is PEFT's gaussian.
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Sequence[str] | str = ("q_proj", "v_proj")
    modules_to_save: Sequence[str] | None = None
    init_lora_weights: str = "gaussian"
    rank_pattern: dict[str, list[bool]] | None = None

    peft_type = "ADALORA"

    def __post_init__(self) -> None:
        check_field_types(self)  # adapter_config.json may hold any JSON type in any field
        if self.init_r <= 0 or not 0 < self.target_r <= self.init_r:
            raise ConfigError(
                f"AdaLoRA needs 0 < target_r <= init_r, got target_r={self.target_r}, init_r={self.init_r}"
            )
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError(f"AdaLoRA beta1/beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.deltaT < 1:
            raise ConfigError(f"deltaT must be >= 1, got {self.deltaT}")
        if self.init_lora_weights not in ("gaussian", "orthogonal"):
            raise ConfigError(f"init_lora_weights {self.init_lora_weights!r} is not 'gaussian' or 'orthogonal'")
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = tuple(self.modules_to_save)
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int) -> None:
        if total_step <= 0 or self.tinit >= total_step - self.tfinal:
            raise ConfigError(
                f"AdaLoRA schedule tinit={self.tinit}, tfinal={self.tfinal}, total_step={total_step} leaves no "
                "budgeting phase; make tinit < total_step - tfinal"
            )


class SVDLinear(MergeableDelta):
    """``base(x) + dropout(x) @ (A * E).T @ B.T * scaling / ranknum`` with ranknum = the initial rank."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, init: str = "gaussian") -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = float(alpha) if alpha > 0 else float(r)
        self.ranknum = float(r)  # stays the initial rank after pruning, as in PEFT, so pruning keeps the scale
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        device = next(base.parameters(), next(base.buffers(), torch.empty(0))).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))  # Q: right singular vectors
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device))  # Λ: zero, so training starts at the base
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device))  # P: left singular vectors
        if init == "orthogonal":
            nn.init.orthogonal_(self.lora_A)
            nn.init.orthogonal_(self.lora_B)
        else:
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        self.merged = False

    @property
    def rank(self) -> int:
        return self.lora_E.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.rank == 0:
            return out
        update = self.lora_dropout(x.to(self.lora_A.dtype)) @ (self.lora_A * self.lora_E).T @ self.lora_B.T
        return out + (update * self.scaling / (self.ranknum + 1e-5)).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)


    @torch.no_grad()
    def prune(self, keep: Sequence[bool]) -> None:
        """Drop the masked triplets for good (used when loading a pruned adapter)."""
        index = torch.tensor(list(keep), dtype=torch.bool, device=self.lora_E.device)
        if index.numel() != self.rank:
            raise ConfigError(f"rank_pattern entry has {index.numel()} flags but the layer has rank {self.rank}")
        self.lora_A = nn.Parameter(self.lora_A[index].clone())
        self.lora_E = nn.Parameter(self.lora_E[index].clone())
        self.lora_B = nn.Parameter(self.lora_B[:, index].clone())

    def extra_repr(self) -> str:
        return f"rank={self.rank}, init_r={int(self.ranknum)}, scaling={self.scaling:g}"


def inject_adalora(model: nn.Module, config: AdaLoraConfig) -> list[str]:
    """Wrap the targets in ``SVDLinear`` (pruned to ``config.rank_pattern`` if set); returns trainable names."""
    targets = find_targets(model, config.target_modules, "AdaLoRA")
    check_untied(model, targets, "AdaLoRA")
    for name in targets:
        layer = SVDLinear(model.get_submodule(name), config.init_r, config.lora_alpha, config.lora_dropout,
                          config.init_lora_weights)
        replace_module(model, name, layer)
        if config.rank_pattern:
            keep = config.rank_pattern.get(f"{name}.lora_E")
            if keep is None:
                raise ConfigError(f"AdaLoRA rank_pattern has no entry for {name}.lora_E; the adapter_config.json "
                                  "does not belong to this model")
            layer.prune(keep)
    trainable = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_E")]
    return trainable + parameters_under(model, find_modules_to_save(model, config.modules_to_save))


class AdaLoraHooks:
    """The per-step work of AdaLoRA: orthogonality penalty and importance-driven rank allocation."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig) -> None:
        self.config = config
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, SVDLinear)}
        self.init_budget = sum(m.rank for m in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.rank_pattern: dict[str, list[bool]] | None = config.rank_pattern
        # A loaded adapter is already pruned to its final ranks: allocation is over, only the penalty remains.
        self.finished = any(m.rank != int(m.ranknum) for m in self.layers.values())
        self.reset_importance()

    def reset_importance(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def state_dict(self) -> dict:
        """The importance averages and rank pattern, so a resumed run allocates exactly as an uninterrupted one."""
        return {
            "exp_avg_ipt": {f"{n}|{p}": t.clone() for (n, p), t in self.exp_avg_ipt.items()},
            "exp_avg_unc": {f"{n}|{p}": t.clone() for (n, p), t in self.exp_avg_unc.items()},
            "rank_pattern": self.rank_pattern,
            "total_step": self.config.total_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg_ipt = {tuple(k.split("|")): t for k, t in state["exp_avg_ipt"].items()}
        self.exp_avg_unc = {tuple(k.split("|")): t for k, t in state["exp_avg_unc"].items()}
        self.rank_pattern = self.config.rank_pattern = state["rank_pattern"]
        self.config.total_step = state["total_step"]

    def set_total_step(self, total_step: int) -> None:
        self.config.check_schedule(total_step)
        self.config.total_step = total_step

    def regularization_loss(self) -> torch.Tensor:
        """``orth_reg_weight * mean(||Q Qᵀ - I||_F, ||Pᵀ P - I||_F)``; add it to the task loss."""
        terms = []
        for layer in self.layers.values():
            for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                terms.append(torch.linalg.matrix_norm(gram - eye))
        if not terms:
            return torch.zeros(())
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at ``step``, whether to mask now): the cubic schedule of the paper."""
        c = self.config
        if c.total_step is None:
            raise ConfigError("AdaLoRA needs total_step; set AdaLoraConfig(total_step=...) or hooks.set_total_step(n)")
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_budget - self.target_budget) * progress**3 + self.target_budget), step % c.deltaT == 0

    def current_ranks(self) -> dict[str, int]:
        """Rank in use per layer: the number of non-zero singular values."""
        return {name: int((m.lora_E != 0).sum()) for name, m in self.layers.items()}

    @torch.no_grad()
    def on_step_end(self, global_step: int) -> None:
        """Call after ``optimizer.step()`` and before ``zero_grad()``: it reads the gradients."""
        if self.finished:
            return
        c = self.config
        if c.total_step is None:
            raise ConfigError("AdaLoRA needs total_step; set AdaLoraConfig(total_step=...) or hooks.set_total_step(n)")
        final_step = c.total_step - c.tfinal
        if global_step < final_step:
            self._update_importance()
            budget, mask_now = self.budget(global_step)
            if mask_now:
                self.rank_pattern = self._mask_to_budget(budget)
        elif global_step == final_step:  # fix the final ranks from the importance gathered so far
            self.rank_pattern = self._mask_to_budget(self.target_budget)
            self.reset_importance()
        elif self.rank_pattern is not None:
            for name, layer in self.layers.items():  # keep pruned triplets at zero through the final phase
                keep = torch.tensor(self.rank_pattern[f"{name}.lora_E"], device=layer.lora_E.device)
                layer.lora_E.masked_fill_(~keep[:, None], 0.0)
        c.rank_pattern = self.rank_pattern

    def _update_importance(self) -> None:
        c = self.config
        for name, layer in self.layers.items():
            for part in ("lora_A", "lora_E", "lora_B"):
                p = getattr(layer, part)
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs()
                key = (name, part)
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                avg = c.beta1 * avg + (1 - c.beta1) * ipt  # smoothed sensitivity
                self.exp_avg_unc[key] = c.beta2 * unc + (1 - c.beta2) * (ipt - avg).abs()  # its uncertainty
                self.exp_avg_ipt[key] = avg

    def _score(self, name: str, part: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, part)
        if key not in self.exp_avg_ipt:
            return torch.zeros_like(like)
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def _mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        scores = {}
        for name, layer in self.layers.items():
            score_a = self._score(name, "lora_A", layer.lora_A).mean(dim=1)  # (r,)
            score_b = self._score(name, "lora_B", layer.lora_B).mean(dim=0)  # (r,)
            score_e = self._score(name, "lora_E", layer.lora_E).view(-1)
            scores[name] = score_e + score_a + score_b  # triplet importance
        to_mask = self.init_budget - budget
        threshold = -math.inf
        if to_mask > 0:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=to_mask).values.item()
        pattern = {}
        for name, layer in self.layers.items():
            keep = scores[name] > threshold
            layer.lora_E.masked_fill_(~keep[:, None], 0.0)
            pattern[f"{name}.lora_E"] = keep.tolist()
        return pattern
