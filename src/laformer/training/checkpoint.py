"""Atomic training checkpoints: written into a temporary folder, checksummed, then renamed into place.

A crash mid-write leaves only a ``*.tmp`` folder that is never mistaken for a checkpoint; a checkpoint
whose files were truncated or altered later fails its checksum on resume with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from laformer.errors import TrainingError

MANIFEST = "manifest.json"
PREFIX = "step-"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(folder: str | Path, objects: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
    """Write ``objects`` (name -> torch-saveable) and the JSON trainer state atomically into ``folder``."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, obj in objects.items():
        torch.save(obj, tmp / f"{name}.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps(files, indent=2))
    for p in tmp.iterdir():
        with p.open("rb") as f:
            os.fsync(f.fileno())
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The objects and trainer state saved by ``save_checkpoint``, verified against the manifest."""
    folder = Path(folder)
    hint = "delete it and resume from an earlier checkpoint, or train without --resume"
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise TrainingError(f"checkpoint {folder} is partial (no {MANIFEST}; it was never finished); {hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise TrainingError(f"checkpoint {folder} has a corrupt {MANIFEST}; {hint}") from exc
    for name, meta in manifest.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["bytes"] or sha256(path) != meta["sha256"]:
            raise TrainingError(f"checkpoint {folder} is corrupt: {name} is missing or does not match its checksum; {hint}")
    objects = {
        p.stem: torch.load(p, map_location="cpu", weights_only=False) for p in folder.glob("*.pt")
    }
    return objects, json.loads((folder / "trainer_state.json").read_text())


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Finished checkpoints in ``directory``, oldest first (temporary folders are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit())


def prune_checkpoints(directory: str | Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else list_checkpoints(directory):
        shutil.rmtree(old, ignore_errors=True)
