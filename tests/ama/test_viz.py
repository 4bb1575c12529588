"""Recorded selections drawn as a heatmap (``ama/viz.py``)."""

from __future__ import annotations

import pytest
import torch

from laformer import ConfigError
from laformer.ama import AMAConfig, SelectionRecorder


def test_return_selection_through_generate_and_heatmap(tiny_model, tmp_path):
    pytest.importorskip("matplotlib")
    from laformer.ama.viz import selection_heatmap

    cfg = AMAConfig(slice_len=8, budget=32, local_window=16, return_selection=True)
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(8))
    tiny_model.generate(ids, max_new_tokens=12, attention=cfg)
    path = selection_heatmap(cfg.recorder, tmp_path / "selection.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_recorder_without_decode_steps_is_refused(tmp_path):
    pytest.importorskip("matplotlib")
    from laformer.ama.viz import selection_heatmap

    with pytest.raises(ConfigError, match="return_selection=True"):
        selection_heatmap(SelectionRecorder(), tmp_path / "empty.png")
