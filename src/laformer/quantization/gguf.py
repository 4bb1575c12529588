"""ggml blocks straight into quantized linears: Q8_0 -> int8 and Q4_0/Q4_1 -> int4, both with group size 32.

The packed values and the float16 block scales are copied as they are, so the layer's ``dequantize()`` equals
ggml's dequantization exactly: no float round trip, no second rounding.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from laformer.errors import CheckpointError
from laformer.quantization.linear import QuantizedLinear, WeightOnlyInt4Linear, WeightOnlyInt8Linear

GGML_GROUP = 32
DIRECT_TYPES = {  # quantization mode -> ggml types that map onto it without loss
    "int8": (GGMLQuantizationType.Q8_0,),
    "int4": (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1),
}


def _blocks(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    data = np.ascontiguousarray(data).view(np.uint8)
    if not data.flags.writeable:  # torch wants writable memory; we only read it
        data = data.copy()
    return torch.from_numpy(data).view(rows, cols // block_size, type_size)


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, :, start:start + 2].contiguous().view(torch.float16).squeeze(-1)


def linear_from_ggml(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> QuantizedLinear:
    """A quantized linear holding the (out_features, in_features) ggml tensor ``data`` (rows of raw blocks)."""
    out_features, in_features = shape
    blocks = _blocks(data, qtype, shape)
    if qtype == GGMLQuantizationType.Q8_0:
        module = WeightOnlyInt8Linear(in_features, out_features, GGML_GROUP)
        module.qweight.copy_(blocks[:, :, 2:].contiguous().view(torch.int8).reshape(out_features, in_features))
        module.scales.copy_(_half(blocks, 0))
        return module
    module = WeightOnlyInt4Linear(in_features, out_features, GGML_GROUP)
    if qtype == GGMLQuantizationType.Q4_0:  # (q - 8) * d  ==  q * d + (-8 d), exactly (a power of two times d)
        scales = _half(blocks, 0)
        module.scales.copy_(scales)
        module.mins.copy_(-8 * scales)
        qs = blocks[:, :, 2:]
    elif qtype == GGMLQuantizationType.Q4_1:  # q * d + m
        module.scales.copy_(_half(blocks, 0))
        module.mins.copy_(_half(blocks, 2))
        qs = blocks[:, :, 4:]
    else:
        raise CheckpointError(
            f"ggml type {qtype.name} has no direct quantized form; dequantize it and use quantize_model"
        )
    module.qweight.copy_(qs.reshape(out_features, in_features // 2))  # ggml's nibble order is ours
    return module
