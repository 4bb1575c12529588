"""What a run leaves behind: TensorBoard events, optional Weights & Biases, metrics.json and PNG plots."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

from laformer.errors import TrainingError
from laformer.extras import require


def require_train_extra(purpose: str, report_to: Sequence[str] = ()) -> None:
    """Check for the ``train`` extra before any work, so a missing one fails at the start, not after an epoch."""
    require("sklearn.metrics", "train", f"{purpose} (accuracy, F1 and the classification report)")
    require("matplotlib", "train", f"{purpose} (its plots)")
    if "tensorboard" in report_to:
        require("tensorboard", "train", f"{purpose} with report_to=['tensorboard']")


class Reporter:
    """Sends scalars to TensorBoard / W&B and keeps the history for the training-curve plot."""

    def __init__(self, output_dir: str | Path, report_to: Sequence[str], run_name: str | None, config: dict[str, Any]) -> None:
        self.output_dir = Path(output_dir)
        self.history: list[dict[str, Any]] = []
        self.writer = None
        self.wandb_run = None
        if "tensorboard" in report_to:
            require("tensorboard", "train", "report_to=['tensorboard']")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "runs"))
        if "wandb" in report_to:
            if importlib.util.find_spec("wandb") is None:
                raise TrainingError("report_to includes 'wandb' but wandb is not installed; `pip install wandb` or drop it")
            import wandb

            self.wandb_run = wandb.init(name=run_name, config=config, dir=str(self.output_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append({"step": step, **metrics})
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def classification_summary(labels: Sequence[int], preds: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, sklearn's text report and the confusion matrix."""
    metrics = require("sklearn.metrics", "train", "classification metrics")
    ids = list(range(len(names)))
    return {
        "accuracy": float(metrics.accuracy_score(labels, preds)),
        "macro_f1": float(metrics.f1_score(labels, preds, labels=ids, average="macro", zero_division=0)),
        "report": metrics.classification_report(labels, preds, labels=ids, target_names=list(names), digits=4,
                                                zero_division=0),
        "confusion_matrix": metrics.confusion_matrix(labels, preds, labels=ids).tolist(),
    }


def _pyplot():
    require("matplotlib", "train", "training plots").use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], names: Sequence[str], path: str | Path) -> None:
    plt = _pyplot()

    size = max(4.0, 0.35 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted", ylabel="true", title="Confusion matrix")
    ax.set_xticklabels(names, rotation=90, fontsize=7 if len(names) > 20 else 9)
    ax.set_yticklabels(names, fontsize=7 if len(names) > 20 else 9)
    if len(names) <= 20:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path) -> None:
    plt = _pyplot()

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("train/loss", ax_loss), ("eval/loss", ax_loss), ("eval/accuracy", ax_metric), ("train/lr", None)):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points and ax is not None:
            ax.plot(*zip(*points), marker="." if key.startswith("eval") else None, label=key)
    ax_loss.set(xlabel="step", title="loss")
    ax_metric.set(xlabel="step", title="validation accuracy")
    for ax in (ax_loss, ax_metric):
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(data: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
