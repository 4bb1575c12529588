"""Training checkpoints: atomic, pickle-free, resumable after a corrupt last one and after kill -9."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

from laformer.errors import TrainingError
from laformer.training import checkpoint as ckpt
from training import kill9


def _save(folder, step):
    objects = {"model": {"w": torch.full((3,), float(step))}, "optimizer": {"state": {0: {"step": torch.tensor(1.0)}}},
               "rng": ckpt.rng_state()}
    return ckpt.save_checkpoint(folder / ckpt.checkpoint_name(step), objects, {"step": step})


def test_checkpoint_files_hold_no_pickled_code(tmp_path):
    folder = _save(tmp_path, 1)
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.pt", "rng.json", "trainer_state.json"]
    objects, state = ckpt.load_checkpoint(folder)
    assert state == {"step": 1} and torch.equal(objects["model"]["w"], torch.ones(3))
    assert objects["optimizer"]["state"][0]["step"].item() == 1.0


def test_random_states_round_trip_through_json(tmp_path):
    random.seed(3), torch.manual_seed(3)
    objects, _ = ckpt.load_checkpoint(_save(tmp_path, 1))
    expected = (random.random(), torch.rand(2))
    random.seed(0), torch.manual_seed(0)
    ckpt.set_rng_state(objects["rng"])
    got = (random.random(), torch.rand(2))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    folder = _save(tmp_path, 1)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, folder / "optimizer.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["optimizer.pt"] = {"bytes": (folder / "optimizer.pt").stat().st_size,
                                "sha256": ckpt.sha256(folder / "optimizer.pt")}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainingError, match="cannot be read safely"):
        ckpt.load_checkpoint(folder)


def test_resume_skips_a_corrupt_or_half_written_last_checkpoint(tmp_path):
    _save(tmp_path, 2)
    corrupt = _save(tmp_path, 4)
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    half = tmp_path / ckpt.checkpoint_name(6)
    half.mkdir()  # a folder without a manifest, as a crash could leave it
    (tmp_path / (ckpt.checkpoint_name(8) + ".tmp")).mkdir()  # a write in progress is never listed
    with pytest.warns(UserWarning, match="skipping checkpoint") as caught:
        folder, objects, state = ckpt.load_latest_checkpoint(tmp_path)
    assert folder.name == ckpt.checkpoint_name(2) and state == {"step": 2} and len(caught) == 2
    (folder / "manifest.json").unlink()
    with warnings.catch_warnings(), pytest.raises(TrainingError, match="no usable checkpoint"):
        warnings.simplefilter("ignore")
        ckpt.load_latest_checkpoint(tmp_path)


def test_pruning_never_leaves_a_listed_half_deleted_checkpoint(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    ckpt.prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.checkpoint_name(3)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return kill9.run_to_end(tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_at_random_points_resumes_to_identical_weights(tmp_path, uninterrupted, seed):
    result = kill9.trial(tmp_path, uninterrupted, random.Random(seed), kills=2)
    assert result.identical, result
    assert result.max_lost <= kill9.SAVE_STEPS, result
