"""Hugging Face model folders: ``config.json`` plus one or many ``*.safetensors`` files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from laformer.config import LaFormerConfig
from laformer.errors import CheckpointError
from laformer.formats.checkpoint import Checkpoint
from laformer.validation import read_json

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
QUANTIZATION_SCALES = (".scales", ".mins")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and name and Path(name).name == name for name in weight_map.values()
        ):
            raise CheckpointError(f"{index} is not a valid safetensors index: its weight_map must map tensor names to "
                                  "file names in the same folder; re-save the model")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    elif (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {folder}; expected {WEIGHTS_NAME} or {INDEX_NAME}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{folder} lists weight shards that are missing: {', '.join(missing)}")
    return files


def load_hf_folder(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Read config and weights, casting each tensor as it is read (one copy of the weights in memory)."""
    folder = Path(folder)
    config = LaFormerConfig.load(folder)
    state_dict: dict[str, torch.Tensor] = {}
    tensor_types: dict[str, str] = {}
    for file in _weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    tensor_types[name] = str(tensor.dtype).removeprefix("torch.")
                    # A quantized layer's scales keep their dtype whatever dtype is asked for (laformer.quantization).
                    keep = not tensor.is_floating_point() or name.endswith(QUANTIZATION_SCALES)
                    state_dict[name] = tensor if keep else tensor.to(dtype)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {file}: {exc}; the file is corrupt or truncated") from exc
    return Checkpoint(config, state_dict, folder, "huggingface", tensor_types)


def save_hf_folder(
    state_dict: dict[str, torch.Tensor], config: LaFormerConfig, folder: str | Path, architecture: str
) -> None:
    """Write ``config.json`` and ``model.safetensors`` that ``transformers`` loads as ``architecture``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous() for name, t in state_dict.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # transformers re-ties it from the embedding
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    data = {"architectures": [architecture], **config.to_dict(),
            "torch_dtype": str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"}
    if "quantization_config" in config.extra:  # also at the top level, where Hugging Face tools look for it
        data["quantization_config"] = config.extra["quantization_config"]
    (folder / "config.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
