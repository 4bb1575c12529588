"""The training loop: AdamW, schedules, accumulation, clipping, autocast, FGM, DDP, evaluation, checkpoints.

The loop is written so a run is a pure function of its arguments and seed: batch orders come from
(seed, epoch), every random draw is restored on resume, and each micro-batch's loss is weighted by
its share of the optimiser step's examples (or target tokens), so gradient accumulation, distributed
ranks and a single big batch all compute the same gradient.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from laformer.errors import TrainingError
from laformer.training import checkpoint as ckpt
from laformer.training.adversarial import fgm_perturbation
from laformer.training.arguments import TrainingArguments
from laformer.training.data import IGNORE_INDEX, PaddingCollator, epoch_batches
from laformer.training.distributed import (
    check_strategy,
    copy_full_into,
    full_tensor,
    gradient_sync,
    reshard,
    wrap_model,
)
from laformer.training.reporting import (
    Reporter,
    classification_summary,
    plot_confusion_matrix,
    plot_training_curves,
    require_train_extra,
    write_json,
)
from laformer.training.schedules import LRSchedule, build_optimizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    reshard(model)
    return {name: full_tensor(p.detach()).clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: Any) -> None:
    reshard(model)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        diff = sorted(set(params) ^ set(state))[:3]
        raise TrainingError(
            f"checkpoint {source} does not match the model's trainable parameters (e.g. {diff}); "
            "resume with the same model, method and target modules it was saved with"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if tensor.shape != params[name].shape:  # a DTensor's shape is the whole tensor's
                raise TrainingError(f"checkpoint {source}: {name} has shape {tuple(tensor.shape)}, "
                                    f"the model has {tuple(params[name].shape)}; it was saved for another model")
            copy_full_into(params[name], tensor)


def add_dropout(model: nn.Module, p: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Dropout on every attention and MLP output and on the classifier's input, active in train mode only."""
    def on_output(module, inputs, output):
        return F.dropout(output, p, module.training)

    def on_score_input(module, inputs):
        return (F.dropout(inputs[0], p, module.training),)

    handles = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("self_attn", "mlp"):
            handles.append(module.register_forward_hook(on_output))
        elif leaf == "score":
            handles.append(module.register_forward_pre_hook(on_score_input))
    return handles


def count_targets(labels: torch.Tensor) -> int:
    """Examples for classification labels (B,), predicted tokens for causal-LM labels (B, T)."""
    return labels.numel() if labels.ndim == 1 else int((labels[:, 1:] != IGNORE_INDEX).sum())


def evaluation_points(steps_per_epoch: int, evals_per_epoch: int) -> set[int]:
    """The optimiser steps within an epoch (1-based) after which to evaluate: evenly spaced, the last one at the
    epoch's end. A fixed stride would add the end of the epoch to its own last point (5 steps, 2 evaluations:
    steps 2, 4 and 5), two evaluations a step apart that early stopping counts as two stalls."""
    return {math.ceil(k * steps_per_epoch / evals_per_epoch) for k in range(1, evals_per_epoch + 1)}


class Trainer:
    """Fine-tunes a laformer model (full or PEFT-wrapped) on a dataset of ``{"input_ids", "labels"}`` items.

    ``hooks`` is an optional object with ``regularization_loss()`` and/or ``on_step_end(step)`` (PEFT
    methods such as AdaLoRA use them). Under ``torchrun`` the model is wrapped in DistributedDataParallel.
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        train_dataset: Dataset,
        eval_dataset: Dataset | None = None,
        collator: PaddingCollator | None = None,
        hooks: Any = None,
    ) -> None:
        if len(train_dataset) == 0:
            raise TrainingError("the training dataset is empty; give it at least one example")
        if not any(p.requires_grad for p in model.parameters()):
            raise TrainingError("the model has no trainable parameters; unfreeze some or apply a PEFT method")
        self.model = model
        self.args = args
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.collator = collator or PaddingCollator(pad_token_id=getattr(model.config, "pad_token_id", None) or 0)
        self.hooks = hooks
        self.output_dir = Path(args.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.rank, self.world_size = self._init_distributed()
        self.is_main = self.rank == 0
        self.device = next(model.parameters()).device
        config = getattr(model, "config", None)
        self._best_eval: dict[str, Any] | None = None
        self.label_names = [config.id2label[i] for i in range(len(config.id2label))] if getattr(config, "id2label", None) else None

    # -- setup -----------------------------------------------------------------------------------------

    @staticmethod
    def _init_distributed() -> tuple[int, int]:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _lengths(self, dataset: Dataset) -> list[int]:
        if hasattr(dataset, "lengths"):
            return dataset.lengths()
        return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]

    def _batches(self, epoch: int) -> list[list[int]]:
        global_batch = self.args.batch_size * self.world_size
        return epoch_batches(
            self.lengths, global_batch, seed=self.args.seed, epoch=epoch,
            bucket=self.args.bucket_by_length, drop_last=self.world_size > 1,
        )

    def _metric_setup(self) -> tuple[str, bool]:
        metric = self.args.metric_for_best_model or ("macro_f1" if self.label_names else "loss")
        greater = self.args.greater_is_better
        return metric, (metric != "loss" if greater is None else greater)

    # -- the loop --------------------------------------------------------------------------------------

    def train(self, resume_from: str | Path | bool | None = None) -> dict[str, Any]:
        """Train, evaluate, checkpoint; returns the final metrics (also written to ``metrics.json``)."""
        args = self.args
        require_train_extra("the Trainer", args.report_to if self.is_main else [])
        seed_everything(args.seed)
        self.lengths = self._lengths(self.train_dataset)
        batches_per_epoch = len(self._batches(0))
        if batches_per_epoch == 0:
            raise TrainingError(
                f"{len(self.train_dataset)} examples do not fill one global batch of "
                f"{args.batch_size * self.world_size}; lower batch_size or add data"
            )
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
        total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_epochs * steps_per_epoch)
        warmup = args.warmup_steps or int(args.warmup_ratio * total_steps)
        metric_name, greater = self._metric_setup()
        eval_points = evaluation_points(steps_per_epoch, args.evals_per_epoch)
        if hasattr(self.hooks, "set_total_step") and getattr(self.hooks.config, "total_step", 0) is None:
            self.hooks.set_total_step(total_steps)

        self.model.train()
        if args.gradient_checkpointing:
            self.model.decoder.gradient_checkpointing = True
        handles = add_dropout(self.model, args.dropout) if args.dropout > 0 else []
        wrapped = self.model
        if self.world_size > 1:
            check_strategy(args.distributed, args.fgm_epsilon)
            wrapped = wrap_model(self.model, args.distributed, self.world_size)  # before the optimiser: FSDP
        optimizer = build_optimizer(self.model, args.learning_rate, args.weight_decay, args.adam_betas)
        schedule = LRSchedule(optimizer, args.lr_scheduler, total_steps, warmup, args.min_lr_ratio,
                              args.plateau_factor, args.plateau_patience, greater)
        state = {"step": 0, "epoch": 0, "group_in_epoch": 0, "best_metric": None, "best_step": None,
                 "bad_evals": 0, "history": [], "stopped_early": False}
        if resume_from:
            state = self._resume(resume_from, optimizer, schedule)

        reporter = Reporter(self.output_dir, args.report_to if self.is_main else [], args.run_name, args.to_dict())
        reporter.history = list(state["history"])
        bar = tqdm(total=total_steps, initial=state["step"], desc="training", dynamic_ncols=True,
                   disable=not (args.progress_bar and self.is_main))
        log_loss, log_count, log_tokens, log_start = 0.0, 0, 0, time.perf_counter()
        try:
            while state["step"] < total_steps and not state["stopped_early"]:
                batches = self._batches(state["epoch"])
                if hasattr(self.train_dataset, "set_epoch"):
                    self.train_dataset.set_epoch(state["epoch"])
                accum = args.gradient_accumulation_steps
                groups = [batches[i : i + accum] for i in range(0, len(batches), accum)]
                for group in groups[state["group_in_epoch"] :]:
                    schedule.apply(state["step"])
                    loss, tokens = self._optimizer_step(wrapped, optimizer, group, state["step"] + 1)
                    state["step"] += 1
                    state["group_in_epoch"] += 1
                    log_loss, log_count, log_tokens = log_loss + loss, log_count + 1, log_tokens + tokens
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{schedule.last_lr:.2e}")
                    step = state["step"]
                    if step % args.logging_steps == 0 or step == total_steps:
                        elapsed = time.perf_counter() - log_start
                        reporter.log(step, {"train/loss": log_loss / log_count, "train/lr": schedule.last_lr,
                                            "train/tokens_per_s": log_tokens / max(elapsed, 1e-9)})
                        log_loss, log_count, log_tokens, log_start = 0.0, 0, 0, time.perf_counter()
                    end_of_epoch = state["group_in_epoch"] == len(groups)
                    due = (step % args.eval_steps == 0) if args.eval_steps else state["group_in_epoch"] in eval_points
                    if self.eval_dataset is not None and (due or step == total_steps):
                        self._evaluate_and_track(state, schedule, reporter, metric_name, greater)
                    if end_of_epoch:
                        state["epoch"] += 1
                        state["group_in_epoch"] = 0
                    state["history"] = reporter.history
                    if (args.save_steps and step % args.save_steps == 0) or step == total_steps or state["stopped_early"]:
                        self._save(state, optimizer, schedule)
                    if step >= total_steps or state["stopped_early"]:
                        break
        finally:
            bar.close()
            for handle in handles:
                handle.remove()
            self.model.decoder.gradient_checkpointing = False
        return self._finish(state, reporter, metric_name)

    def _optimizer_step(
        self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, group: list[list[int]], step: int
    ) -> tuple[float, int]:
        """Optimiser step number ``step`` over the micro-batches in ``group``; returns (mean loss, real tokens)."""
        micro = [self.collator([self.train_dataset[i] for i in batch[self.rank :: self.world_size]]) for batch in group]
        local = sum(count_targets(b["labels"]) for b in micro)
        total = torch.tensor(float(local))
        if self.world_size > 1:
            dist.all_reduce(total)
        # DDP averages gradients over ranks, hence the world_size factor.
        scale = self.world_size / max(total.item(), 1.0)
        passes = len(micro) * (2 if self.args.fgm_epsilon > 0 else 1)
        loss_sum, tokens, done = 0.0, 0, 0
        for batch in micro:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            weight = count_targets(batch["labels"]) * scale
            tokens += int(batch["attention_mask"].sum())
            if self.args.fgm_epsilon > 0:
                embeds = self.model.decoder.embed_tokens(batch["input_ids"])
                if not embeds.requires_grad:
                    embeds.requires_grad_()
                embeds.retain_grad()
                done += 1
                loss = self._backward(wrapped, batch, weight, done == passes, embeds)
                delta = fgm_perturbation(embeds.grad, self.args.fgm_epsilon)
                done += 1
                self._backward(wrapped, batch, weight, done == passes, self.model.decoder.embed_tokens(batch["input_ids"]) + delta,
                               regularize=False)
            else:
                done += 1
                loss = self._backward(wrapped, batch, weight, done == passes)
            loss_sum += loss * weight / self.world_size
        if self.world_size > 1:
            reduced = torch.tensor(loss_sum)
            dist.all_reduce(reduced)
            loss_sum = reduced.item()
        if self.args.max_grad_norm:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.args.max_grad_norm)
        optimizer.step()
        if self.hooks is not None and hasattr(self.hooks, "on_step_end"):
            self.hooks.on_step_end(step)  # before zero_grad: AdaLoRA reads the gradients
        optimizer.zero_grad(set_to_none=True)
        return loss_sum, tokens

    def _backward(self, wrapped: nn.Module, batch: dict[str, torch.Tensor], weight: float, sync: bool,
                  embeds: torch.Tensor | None = None, regularize: bool = True) -> float:
        with gradient_sync(wrapped, sync or self.world_size == 1):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
                if embeds is None:
                    loss = wrapped(**batch).loss
                else:
                    loss = wrapped(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            total = loss.float() * weight
            if regularize:
                total = total + self._regularization() * weight
            total.backward()
        return loss.item()

    def _regularization(self) -> torch.Tensor | float:
        if self.hooks is not None and hasattr(self.hooks, "regularization_loss"):
            return self.hooks.regularization_loss()
        return 0.0

    # -- evaluation ------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, dataset: Dataset | None = None) -> dict[str, Any]:
        """Loss over ``dataset`` and, for classification, probabilities, predictions and labels."""
        dataset = dataset if dataset is not None else self.eval_dataset
        was_training = self.model.training
        self.model.eval()
        loss_sum, count, probs, labels = 0.0, 0, [], []
        order = sorted(range(len(dataset)), key=self._lengths(dataset).__getitem__)  # less padding
        share = order[self.rank :: self.world_size]  # each rank scores its share; gathered below
        size = self.args.eval_batch_size
        for start in range(0, math.ceil(len(order) / self.world_size / size) * size, size):
            indices = share[start : start + size]  # every rank runs as many forwards (FSDP gathers in each)
            batch = {k: v.to(self.device) for k, v in self.collator([dataset[i] for i in indices or order[:1]]).items()}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
                out = self.model(**batch)
            if not indices:
                continue
            n = count_targets(batch["labels"])
            loss_sum, count = loss_sum + out.loss.float().item() * n, count + n
            if batch["labels"].ndim == 1:
                probs.extend(zip(indices, out.logits.float().softmax(-1).cpu()))
                labels.extend(zip(indices, batch["labels"].cpu().tolist()))
        self.model.train(was_training)
        if self.world_size > 1:
            loss_sum, count, probs, labels = self._gather_predictions(loss_sum, count, probs, labels)
        result: dict[str, Any] = {"loss": loss_sum / max(count, 1)}
        if probs:
            probs_tensor = torch.stack([p for _, p in sorted(probs, key=lambda x: x[0])])
            result["probs"] = probs_tensor
            result["preds"] = probs_tensor.argmax(-1).tolist()
            result["labels"] = [label for _, label in sorted(labels)]
        return result

    def _gather_predictions(self, loss_sum: float, count: int, probs: list, labels: list) -> tuple[float, int, list, list]:
        """Every rank's share of an evaluation, combined on every rank (so all of them agree on early stopping)."""
        shares: list[Any] = [None] * self.world_size
        dist.all_gather_object(shares, (loss_sum, count, probs, labels))
        return (sum(s[0] for s in shares), sum(s[1] for s in shares),
                [p for s in shares for p in s[2]], [y for s in shares for y in s[3]])

    def evaluate(self, dataset: Dataset | None = None) -> dict[str, Any]:
        """Validation metrics: loss (and perplexity), or accuracy, macro-F1 and the classification report."""
        if dataset is None and self.eval_dataset is None:
            raise TrainingError("no evaluation dataset; pass eval_dataset to the Trainer or a dataset here")
        prediction = self.predict(dataset)
        metrics: dict[str, Any] = {"loss": prediction["loss"]}
        if "preds" in prediction:
            names = self.label_names or [str(i) for i in range(prediction["probs"].shape[-1])]
            metrics.update(classification_summary(prediction["labels"], prediction["preds"], names))
        else:
            metrics["perplexity"] = math.exp(min(prediction["loss"], 50.0))
        return metrics

    def _evaluate_and_track(self, state: dict, schedule: LRSchedule, reporter: Reporter, metric: str, greater: bool) -> None:
        metrics = self.evaluate()
        if metric not in metrics:
            raise TrainingError(f"metric_for_best_model {metric!r} is not computed; choose one of "
                                f"{sorted(k for k, v in metrics.items() if isinstance(v, float))}")
        reporter.log(state["step"], {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)})
        value = metrics[metric]
        schedule.on_evaluate(value)
        best = state["best_metric"]
        if best is None or (value > best if greater else value < best):
            state.update(best_metric=value, best_step=state["step"], bad_evals=0)
            self._best_eval = metrics  # the final report reuses it once these weights are loaded back
            weights = trainable_state(self.model)  # on every rank: gathering FSDP shards is collective
            if self.is_main:
                ckpt.save_checkpoint(self.output_dir / "best", {"model": weights},
                                     {"step": state["step"], metric: value})
        else:
            state["bad_evals"] += 1
            patience = self.args.early_stopping_patience
            if patience is not None and state["bad_evals"] >= patience:
                state["stopped_early"] = True

    # -- checkpoints -----------------------------------------------------------------------------------

    def _save(self, state: dict, optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> None:
        weights = trainable_state(self.model)  # on every rank: gathering FSDP shards is collective
        if not self.is_main:
            return
        objects = {"model": weights, "optimizer": optimizer.state_dict(), "rng": ckpt.rng_state()}
        if self.hooks is not None and hasattr(self.hooks, "state_dict"):
            objects["hooks"] = self.hooks.state_dict()
        ckpt.save_checkpoint(self.checkpoint_dir / ckpt.checkpoint_name(state["step"]), objects,
                             {**state, "schedule": schedule.state_dict()})
        ckpt.prune_checkpoints(self.checkpoint_dir, self.args.save_total_limit)

    def _resume(self, resume_from: str | Path | bool, optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> dict:
        if self.world_size > 1 and self.args.distributed == "fsdp":
            raise TrainingError("resuming an FSDP run is not supported (its optimiser state is sharded); "
                                "resume with distributed='ddp' or start the run again")
        if resume_from is True:  # the newest that loads: a half-written or corrupt last one falls back, warning
            folder, objects, state = ckpt.load_latest_checkpoint(self.checkpoint_dir)
        else:
            folder = Path(resume_from)
            if not folder.is_dir():
                raise TrainingError(f"checkpoint {folder} does not exist; pass a folder under {self.checkpoint_dir}")
            objects, state = ckpt.load_checkpoint(folder)
        missing = {"model", "optimizer", "rng"} - set(objects)
        if missing:
            raise TrainingError(f"checkpoint {folder} lacks {sorted(missing)}; it is partial, resume from another one")
        load_trainable_state(self.model, objects["model"], folder)
        try:
            optimizer.load_state_dict(objects["optimizer"])
        except (ValueError, KeyError) as exc:
            raise TrainingError(f"checkpoint {folder} has an optimiser state for other parameters ({exc}); "
                                "resume with the same method and arguments") from exc
        schedule.load_state_dict(state.pop("schedule"))
        if "hooks" in objects and hasattr(self.hooks, "load_state_dict"):
            self.hooks.load_state_dict(objects["hooks"])
        ckpt.set_rng_state(objects["rng"])
        return state

    def _finish(self, state: dict, reporter: Reporter, metric: str) -> dict[str, Any]:
        best_dir = self.output_dir / "best"
        metrics = None
        if self.args.load_best_model_at_end and state["best_step"] is not None and best_dir.is_dir():
            objects, _ = ckpt.load_checkpoint(best_dir)
            load_trainable_state(self.model, objects["model"], best_dir)
            metrics = self._best_eval  # those weights' evaluation (None after a resume: evaluated again below)
        self.model.eval()
        result: dict[str, Any] = {"step": state["step"], "epoch": state["epoch"], "best_step": state["best_step"],
                                  f"best_{metric}": state["best_metric"], "stopped_early": state["stopped_early"]}
        if self.eval_dataset is not None:
            metrics = metrics or self.evaluate()
            result["eval"] = {k: v for k, v in metrics.items() if k not in ("report",)}
            if self.is_main and "report" in metrics:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / "classification_report.txt").write_text(metrics["report"])
                plot_confusion_matrix(metrics["confusion_matrix"], self.label_names or [], self.output_dir / "confusion_matrix.png")
                print(metrics["report"])
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            plot_training_curves(reporter.history, self.output_dir / "training_curves.png")
            write_json({**result, "history": reporter.history}, self.output_dir / "metrics.json")
        reporter.close()
        return result
