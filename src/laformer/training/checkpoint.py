"""Atomic, pickle-free training checkpoints: written into a temporary folder, checksummed, then renamed into place.

A crash mid-write leaves only a ``*.tmp`` folder that is never mistaken for a checkpoint; a checkpoint whose files
were truncated or altered later fails its checksum. Nothing loaded here can run code: tensors go to safetensors,
plain data (trainer state, random states) to JSON, and the optimiser state (tensors inside nested dicts and lists)
to ``torch.save``, read back with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from laformer.errors import TrainingError

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
PREFIX = "step-"
TENSORS, JSON, TORCH = ".safetensors", ".json", ".pt"


def rng_state() -> dict[str, Any]:
    """Every random generator's state as plain JSON data."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.array(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _write(folder: Path, name: str, obj: Any) -> None:
    """Flat tensor dicts as safetensors, JSON-able data as JSON, anything else (optimiser state) as torch.save."""
    if _is_tensor_dict(obj) and obj:
        save_file({k: v.detach().cpu().contiguous() for k, v in obj.items()}, str(folder / f"{name}{TENSORS}"))
        return
    try:
        text = json.dumps(obj)
    except TypeError:
        torch.save(obj, folder / f"{name}{TORCH}")
    else:
        (folder / f"{name}{JSON}").write_text(text)


def _read(path: Path) -> Any:
    if path.suffix == TENSORS:
        return load_file(str(path))
    if path.suffix == JSON:
        return json.loads(path.read_text())
    return torch.load(path, map_location="cpu", weights_only=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: str | Path, objects: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
    """Write ``objects`` (name -> tensors or plain data) and the JSON trainer state atomically into ``folder``."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, obj in objects.items():
        _write(tmp, name, obj)
    (tmp / STATE).write_text(json.dumps(trainer_state, indent=2))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps(files, indent=2))
    for p in tmp.iterdir():
        _fsync(p)
    _fsync(tmp)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)  # left over by a crash between the two renames below
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    _fsync(folder.parent)
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
        if STATE not in manifest:
            raise TrainingError(f"checkpoint {folder} is corrupt: its {MANIFEST} does not list {STATE}; {hint}")
        for name, meta in manifest.items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != meta["bytes"] or sha256(path) != meta["sha256"]:
                raise TrainingError(
                    f"checkpoint {folder} is corrupt: {name} is missing or does not match its checksum; {hint}")
        objects = {p.stem: _read(p) for p in sorted(folder.iterdir())
                   if p.name in manifest and p.name not in (STATE, MANIFEST)}
        state = json.loads((folder / STATE).read_text())
    except TrainingError:
        raise
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, OSError) as exc:
        raise TrainingError(f"checkpoint {folder} has a corrupt {MANIFEST} or {STATE} ({exc}); {hint}") from exc
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise TrainingError(
            f"checkpoint {folder} cannot be read safely ({type(exc).__name__}: {exc}); laformer loads only the "
            f"safetensors/JSON/weights-only files it writes itself, so an older or foreign checkpoint is refused; {hint}"
        ) from exc
    return objects, state


def load_latest_checkpoint(directory: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The newest checkpoint in ``directory`` that loads, warning about each newer one that is partial or corrupt
    (e.g. a run killed while it was being pruned, or a disk that filled up)."""
    found = list_checkpoints(directory)
    if not found:
        raise TrainingError(f"nothing to resume: no checkpoint in {directory}; train without --resume")
    problems = []
    for folder in reversed(found):
        try:
            objects, state = load_checkpoint(folder)
        except TrainingError as exc:
            problems.append(str(exc))
            warnings.warn(f"laformer: skipping checkpoint {folder.name}: {exc}; trying the previous one", stacklevel=2)
            continue
        return folder, objects, state
    raise TrainingError(f"no usable checkpoint in {directory}: {'; '.join(problems)}")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Finished checkpoints in ``directory``, oldest first (temporary folders are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit())


def prune_checkpoints(directory: str | Path, keep: int | None) -> None:
    """Delete all but the ``keep`` newest; each is renamed away first, so a crash never leaves half of one listed."""
    if keep is None:
        return
    for stale in Path(directory).glob(f"{PREFIX}*.deleting"):  # a crash interrupted an earlier prune
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else list_checkpoints(directory):
        doomed = old.with_name(old.name + ".deleting")
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
