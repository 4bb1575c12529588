"""What AMA chose, per call and layer (``ama/recorder.py``), recorded through ``generate``."""

from __future__ import annotations

import torch

from laformer.ama import AMAConfig, SelectionRecorder


def test_generate_records_one_prefill_and_one_record_per_decode_step_and_layer(tiny_model):
    cfg = AMAConfig(slice_len=8, budget=32, local_window=16, return_selection=True)
    assert isinstance(cfg.recorder, SelectionRecorder)
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(8))
    tiny_model.generate(ids, max_new_tokens=12, attention=cfg)
    assert cfg.recorder.layers() == [0, 1]
    prefill = [r for r in cfg.recorder.records if r.layer == 1 and not r.is_decode]
    assert len(prefill) == 1 and prefill[0].chosen.shape == (1, 2, 8, 8)  # 8 query blocks of 8 over 8 slices
    steps = cfg.recorder.decode_steps(layer=1)
    assert len(steps) == 11 and [s.key_len for s in steps] == list(range(61, 72))
    for step in steps:
        assert step.chosen.shape[:3] == (1, 2, 1)
        assert int(step.chosen[0, 0, 0].sum()) <= cfg.budget_slices  # whole slices within the budget
        assert bool((step.probs[~step.chosen] >= 0).all())
    cfg.recorder.clear()
    assert cfg.recorder.records == [] and cfg.recorder.layers() == []


def test_selections_are_recorded_only_when_asked_for():
    assert AMAConfig(budget=64, slice_len=8).recorder is None
    mine = SelectionRecorder()
    assert AMAConfig(budget=64, slice_len=8, return_selection=True, recorder=mine).recorder is mine
