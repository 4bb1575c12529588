"""A 4-layer cut of the default model (its first layers and real embeddings), saved once: fast enough to fine-tune
in a test, and still a real tokenizer and chat template."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory, default_gguf_path):
    from laformer import LaFormerForCausalLM, LaFormerTokenizer

    folder = tmp_path_factory.mktemp("small_model")
    LaFormerForCausalLM.from_pretrained(default_gguf_path, num_hidden_layers=4).save_pretrained(folder)
    LaFormerTokenizer.from_pretrained(default_gguf_path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def load_example():
    """Import an example script (``"recommender/recommend.py"``) as a module, as the one-command run sees it."""
    import importlib.util
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"

    def load(relative: str):
        path = examples / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module

    return load
