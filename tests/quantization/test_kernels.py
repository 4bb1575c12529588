"""The native kernels against the arithmetic they implement, and against the dequantize-then-matmul fallback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laformer import native
from laformer.quantization import (
    WeightOnlyInt4Linear,
    WeightOnlyInt8Linear,
    kernels,
    quantize_model,
    set_int8_activations,
)
from laformer.quantization.linear import PEAKED_ROWS

from .helpers import QUANTIZABLE, random_linear, relative_error, require_kernel

TESTS = Path(__file__).resolve().parents[1]


def per_channel_weights(layer) -> torch.Tensor:
    """The weights ``int8_matmul`` multiplies: a per-channel int8 layer's own; a grouped layer's dequantized and
    rounded to one int8 scale per output row."""
    w = layer.dequantize()
    if layer.bits == 8 and layer.group_size == layer.in_features:
        return w
    scale = w.abs().amax(1, keepdim=True) / 127
    return torch.round(w * (1 / scale)) * scale


def int8_matmul_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``int8_matmul``'s arithmetic in float: the 16 largest input channels exact, the rest rounded per row to
    int8, and the rounding residual rounded again when the rows are peaked."""

    def round_rows(v: torch.Tensor) -> torch.Tensor:
        scale = v.abs().amax(1, keepdim=True) / 127
        return torch.round(v * torch.where(scale > 0, 1 / scale, 0)) * scale

    outliers = x.abs().amax(0).topk(16).indices
    inner = x.clone()
    inner[:, outliers] = 0
    rounded = round_rows(inner)
    square_mean = inner.square().mean(1)
    peak = torch.where(square_mean > 0, inner.abs().amax(1).square() / square_mean, 0).mean()
    if peak > PEAKED_ROWS**2:
        rounded += round_rows(inner - rounded)
    rounded[:, outliers] = x[:, outliers]
    return F.linear(rounded, weight)


@pytest.mark.parametrize("kind", ["int8-channel", "int8-g32", "int4-g32"])
@pytest.mark.parametrize("peaked", [False, True], ids=["one-product", "with-residual"])
@pytest.mark.parametrize("rows", [9, 64])
def test_int8_matmul_for_many_rows(kind, rows, peaked):
    """Above 8 rows quantized layers multiply int8 activations by per-channel int8 weights with torch._int_mm,
    outlier channels in float; gradients and set_int8_activations(False) keep the float path."""
    require_kernel(kernels.int8_rows_available)
    in_features = 260 if kind == "int8-channel" else 256  # 260: a tail after 8-wide rows
    linear = random_linear(in_features, 83)  # 83: a tail after the 8-wide columns
    layer = {"int8-channel": lambda: WeightOnlyInt8Linear.from_float(linear),
             "int8-g32": lambda: WeightOnlyInt8Linear.from_float(linear, 32),
             "int4-g32": lambda: WeightOnlyInt4Linear.from_float(linear, 32)}[kind]()
    torch.manual_seed(1)
    x = torch.randn(rows, in_features)
    if peaked:  # a few large values per row beyond the outlier channels, as the SwiGLU product entering down_proj
        x = torch.where(torch.rand(rows, in_features) < 0.02, 60 * x, x)
    x[:, [3, 77, 200]] *= 40  # outlier channels, as in LLaMA activations
    x[1] = 0  # an all-zero row: scale 0, no division by zero
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y, int8_matmul_reference(x, per_channel_weights(layer)), rtol=1e-4, atol=1e-4)
        exact = F.linear(x, layer.dequantize())
        assert relative_error(y, exact) < (1e-4 if peaked and kind == "int8-channel" else 0.01)
        assert torch.equal(y[1], torch.zeros(83))
        assert set_int8_activations(nn.Sequential(layer), False) == 1
        torch.testing.assert_close(layer(x), exact, rtol=1e-5, atol=1e-5)
    layer.int8_activations = True
    x.requires_grad_(True)
    layer(x).sum().backward()  # training keeps the differentiable float path (QLoRA)
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(rows, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 8])
def test_kernel_matches_fallback(monkeypatch, rows):
    """The kernel (which must run) against the dequantize-then-matmul fallback (which must run too)."""
    require_kernel()
    linear = random_linear(256, 80)
    layers = [WeightOnlyInt8Linear.from_float(linear), WeightOnlyInt8Linear.from_float(linear, 64),
              WeightOnlyInt4Linear.from_float(linear, 64), WeightOnlyInt4Linear.from_float(linear, 32)]
    x = torch.randn(rows, 256)
    calls = []
    qgemm = kernels.qgemm
    monkeypatch.setattr(kernels, "qgemm", lambda *args: calls.append(args[4]) or qgemm(*args))
    with torch.no_grad():
        fast = [layer(x) for layer in layers]
        assert calls == [8, 8, 4, 4], "every layer must have gone through the kernel"
        monkeypatch.setattr(kernels, "available", lambda: False)
        slow = [layer(x) for layer in layers]
    assert len(calls) == 4, "the fallback must not call the kernel"
    for layer, a, b in zip(layers, fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, F.linear(x, layer.dequantize()))


def test_kernel_is_built_on_x86():
    require_kernel()
    if shutil.which("g++") or shutil.which("c++"):
        assert kernels.backend() == "native"  # the C++ operator, not the slower-to-call ctypes one


@pytest.mark.parametrize("bits", [8, 4])
def test_ctypes_kernel_equals_the_operator(bits):
    """The ctypes build is the fallback when the C++ operator cannot be built: same kernel, same numbers."""
    require_kernel()
    layer = (WeightOnlyInt8Linear.from_float(random_linear(256, 80), 64) if bits == 8
             else WeightOnlyInt4Linear.from_float(random_linear(256, 80), 64))
    args = (torch.randn(6, 256), layer.qweight, layer.scales, getattr(layer, "mins", None), bits, 64)
    assert torch.equal(kernels.qgemm(*args), kernels.ctypes_kernel()(*args))


def int8_activation_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """The native decode step's arithmetic: activations rounded to ggml Q8_0 blocks (per 32 values, scale
    max |x| / 127, round half to even) times the dequantized weights, 4-bit minimums applied to the float x."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    rounded = (torch.round(blocks * inverse) * (amax / 127)).reshape(x.shape)
    y = F.linear(rounded, layer.dequantize())
    if layer.bits == 4:
        y = y + F.linear(x - rounded, layer.mins.float().repeat_interleave(layer.group_size, dim=1))
    return y


@pytest.mark.parametrize("rows", [1, 3, 4, 8])  # the kernel's row blocks: 8, 4 and single rows
@pytest.mark.parametrize("bits, group_size", [(8, 32), (8, None), (4, 32), (4, 64)])
def test_int8_activation_kernels(bits, group_size, rows):
    """The native decode step's kernels (ggml Q8_0 activations, as llama.cpp) against their arithmetic in torch."""
    require_kernel()
    linear = random_linear(256, 80)
    layer = (WeightOnlyInt8Linear.from_float(linear, group_size) if bits == 8
             else WeightOnlyInt4Linear.from_float(linear, group_size))
    x = torch.randn(rows, 256)
    x[0, :32] = 0  # an all-zero block: scale 0, no division by zero
    y = kernels.ctypes_kernel()(x, layer.qweight, layer.scales, getattr(layer, "mins", None), bits, layer.group_size,
                                int8_activations=True)
    torch.testing.assert_close(y, int8_activation_reference(layer, x), rtol=1e-4, atol=1e-5)
    assert relative_error(y, F.linear(x, layer.dequantize())) < 0.015  # the rounding's cost: ~0.5%



FALLBACK_RUN = """
import json, sys, warnings
import torch
sys.path.append(sys.argv[1])
from tiny import tiny_model
from laformer.quantization import kernels, quantize_model
QUANTIZABLE = json.loads(sys.argv[3])
warnings.simplefilter("always")
model = quantize_model(tiny_model(seed=4, **QUANTIZABLE), "int4", 32)
with torch.no_grad():
    logits = model(torch.arange(6)[None] * 7 % 128).logits
assert not kernels.available() and kernels.backend() is None, "no kernel may load here"
torch.save(logits, sys.argv[2])
"""


@pytest.mark.parametrize("overrides", [{"CC": "false", "CXX": "false"}, {"LAFORMER_NO_KERNELS": "1"}],
                         ids=["cc-false", "no-kernels"])
def test_without_kernels_a_quantized_model_runs_on_the_fallback(tmp_path, tiny_model, overrides):
    """No working compiler, or kernels turned off, in a fresh process with an empty kernel cache: a quantized model
    still runs (dequantize-then-matmul), with the logits of this process's path, and warns only when a build failed."""
    env = {**os.environ, "LAFORMER_CACHE": str(tmp_path / "cache"), **overrides}
    command = [sys.executable, "-c", FALLBACK_RUN, str(TESTS), str(tmp_path / "logits.pt"), json.dumps(QUANTIZABLE)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    build_tried = "CC" in overrides and native.has_avx2() and not native.kernels_disabled()
    assert ("unavailable" in done.stderr) == build_tried, done.stderr[-3000:]
    model = quantize_model(tiny_model(seed=4, **QUANTIZABLE), "int4", 32)
    with torch.no_grad():
        expected = model(torch.arange(6)[None] * 7 % 128).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)
