"""Weight-only int8/int4 layers: accuracy against float, int4 packing in ggml's order, gradients for QLoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laformer.quantization import WeightOnlyInt4Linear, WeightOnlyInt8Linear
from laformer.quantization.linear import pack_int4, unpack_int4

from .helpers import random_linear, relative_error


@pytest.mark.parametrize(
    "make, tolerance",
    [
        (lambda l: WeightOnlyInt8Linear.from_float(l), 0.01),
        (lambda l: WeightOnlyInt8Linear.from_float(l, 32), 0.01),
        (lambda l: WeightOnlyInt4Linear.from_float(l, 32), 0.10),
        (lambda l: WeightOnlyInt4Linear.from_float(l, 64), 0.12),
    ],
    ids=["int8-channel", "int8-g32", "int4-g32", "int4-g64"],
)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 40])  # x is (2, rows, 128): kernel (blocks of 8, 4, 1 rows) and matmul
def test_quantized_linear_close_to_float(make, tolerance, rows):
    linear = random_linear()
    quantized = make(linear)
    x = torch.randn(2, rows, 128)
    with torch.no_grad():
        y, reference = quantized(x), linear(x)
        exact = F.linear(x, quantized.dequantize())
        quantized.int8_activations = False
        weight_only = quantized(x)
    assert y.shape == reference.shape
    assert relative_error(y, reference) < tolerance
    assert relative_error(y, exact) < 0.01  # int8 activations (per-channel int8 above 8 rows) cost ~0.4%
    torch.testing.assert_close(weight_only, exact, rtol=1e-5, atol=1e-5)  # kernel == its own dequantized weights


def test_int4_pack_roundtrip_and_ggml_order():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, 32)
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed[:, 0] & 0x0F, q[:, 0]) and torch.equal(packed[:, 0] >> 4, q[:, 16])


def test_gradients_reach_inputs_for_qlora():
    from laformer.peft.lora import LoRALinear

    base = WeightOnlyInt4Linear.from_float(random_linear(), 32)
    lora = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(3, 128, requires_grad=True)
    lora(x).square().sum().backward()
    assert x.grad is not None and lora.lora_A.weight.grad is not None and lora.lora_B.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in base.parameters())

