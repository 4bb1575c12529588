"""A picture of what AMA chose: one panel per layer, decoding steps down, slices across."""

from __future__ import annotations

from pathlib import Path

import torch

from laformer.ama.recorder import SelectionRecorder
from laformer.errors import ConfigError
from laformer.extras import require


def selection_matrix(recorder: SelectionRecorder, layer: int, batch: int = 0, value: str = "chosen") -> torch.Tensor:
    """(steps, slices) for one layer's decode steps: the fraction of KV heads that chose each slice
    (``value="chosen"``) or their mean sampling probability (``value="probs"``); later slices pad with 0."""
    steps = recorder.decode_steps(layer)
    width = max((r.chosen.shape[-1] for r in steps), default=0)
    matrix = torch.zeros(len(steps), width)
    for i, record in enumerate(steps):
        data = record.chosen if value == "chosen" else record.probs
        row = data[batch, :, 0].float().mean(0)  # averaged over KV heads
        matrix[i, : row.shape[0]] = row
    return matrix


def selection_heatmap(
    recorder: SelectionRecorder, path: str | Path, batch: int = 0, layers: list[int] | None = None,
    value: str = "chosen",
) -> Path:
    """Draw the decode-time selections of ``layers`` (default: every recorded one) into a PNG at ``path``."""
    require("matplotlib", "train", "drawing AMA selections").use("Agg")
    import matplotlib.pyplot as plt
    if value not in ("chosen", "probs"):
        raise ConfigError(f"value {value!r} is not drawable; use 'chosen' or 'probs'")
    layers = layers if layers is not None else recorder.layers()
    layers = [layer for layer in layers if recorder.decode_steps(layer)]
    if not layers:
        raise ConfigError("the recorder holds no decode steps; generate with AMAConfig(return_selection=True) first")
    cols = min(6, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 1, 2.4 * rows), squeeze=False, sharey=True,
                             layout="constrained")
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        image = ax.imshow(selection_matrix(recorder, layer, batch, value).numpy(), aspect="auto",
                          interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("slice", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("decode step", fontsize=8)
    label = "share of KV heads choosing the slice" if value == "chosen" else "slice sampling probability"
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=label)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
