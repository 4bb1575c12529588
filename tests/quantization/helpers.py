"""What the quantization tests share: random layers, a relative error, and the rule for when a kernel must run."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from laformer import native
from laformer.quantization import kernels

# widths every tested group size (32, 64) divides, over the 128-token vocabulary the tests draw ids from; a tied head
QUANTIZABLE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, tie_word_embeddings=True)


def require_kernel(available=kernels.available) -> None:
    """Skip where a kernel cannot exist (no AVX2, no C compiler, LAFORMER_NO_KERNELS); fail where it could but
    did not build, so a broken build never passes as a skip."""
    if available():
        return
    if native.kernels_disabled():
        pytest.skip("LAFORMER_NO_KERNELS is set: the fallback is tested alone")
    if not native.has_avx2():
        pytest.skip("no AVX2 on this CPU: the kernel cannot run here")
    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no C compiler: the kernel cannot be built here")
    pytest.fail("a C compiler and AVX2 are here, yet the kernel did not build (see the warning above)")


def random_linear(in_features: int = 128, out_features: int = 96, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(linear.weight, std=0.05)
    return linear


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()

