"""Fixtures of the engine and native-step tests: a tiny model, a padded batch, the native step's arithmetic."""

from __future__ import annotations

import pytest
import torch

from laformer import LaFormerForCausalLM

from ._helpers import CONFIG


@pytest.fixture(scope="module")
def tiny(tiny_model) -> LaFormerForCausalLM:
    return tiny_model(**CONFIG)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 11, 7 and 9 tokens, left-padded."""
    ids = torch.randint(0, CONFIG["vocab_size"], (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :2] = 0
    return ids, mask


@pytest.fixture
def int8_activations(monkeypatch):
    """Make the PyTorch path's quantized products use the native step's arithmetic for any number of rows
    (activations rounded to int8 blocks of 32, as llama.cpp does), so the two paths compute the same numbers."""
    from laformer.quantization import kernels, linear

    def qgemm(x, qweight, scales, mins, bits, group_size):
        return kernels.ctypes_kernel()(x, qweight, scales, mins, bits, group_size, int8_activations=True)

    monkeypatch.setattr(kernels, "qgemm", qgemm)
    monkeypatch.setattr(linear, "KERNEL_MAX_ROWS", 1 << 30)  # no int8_matmul above 8 rows: the same kernel always
