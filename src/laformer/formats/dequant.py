"""Vectorised torch dequantizers for llama.cpp's block formats.

Each ``_dequant_<type>`` turns ``(n_blocks, type_size)`` uint8 blocks into ``(n_blocks, block_size)`` float32,
following ggml's reference layout (``ggml-quants.c``; ``gguf.quants`` is the numpy reference the tests compare
against). They are written in torch, in place and with uint8 temporaries only, because that dequantizes the default
model in about a second where ``gguf.quants`` takes several (bench/bench_gguf_load.py).
Types without a torch version here fall back to ``gguf.quants.dequantize`` (slow but correct).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256
_CHUNK_ELEMENTS = 1 << 20  # dequantize ~1M values at a time: temporaries stay small and are reused


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 scale stored at byte ``start`` of every block, as (n_blocks, 1) float32."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Packed bytes -> values along ``dim``: the low nibbles first, then the high ones (ggml's order)."""
    qs = qs.contiguous()
    return torch.cat((qs & 0x0F, qs >> 4), dim=dim)


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """(n, count/8) little-endian bytes -> (n, count) bits, bit i of the bitfield at position i."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed[:, :, None] >> shifts) & 1).reshape(packed.shape[0], count)


# Each dequantizer writes (n_blocks, block_size) float32 values into ``out``. They work in place on ``out`` and keep
# their temporaries uint8 (one contiguous uint8 -> float copy is the fastest conversion); allocating fresh float
# tensors costs more (page faults) than the arithmetic itself.


def _dequant_q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks[:, 2:].view(torch.int8)).mul_(_f16(blocks, 0))


def _dequant_q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_nibbles(blocks[:, 2:])).sub_(8.0).mul_(_f16(blocks, 0))


def _dequant_q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_nibbles(blocks[:, 4:])).mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _dequant_q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_nibbles(blocks[:, 6:]) | (_bits(blocks[:, 2:6], 32) << 4)).sub_(16.0).mul_(_f16(blocks, 0))


def _dequant_q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(blocks[:, 8:]) | (_bits(blocks[:, 4:8], 32) << 4)
    out.copy_(q).mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: per sub-block scale and offset, (n, 8, 1) each, from d, dmin and 12 bytes of 6-bit pairs."""
    d, m, md = blocks[:, 4:8], blocks[:, 8:12], blocks[:, 12:16]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return (_f16(blocks, 0) * sc)[..., None], (_f16(blocks, 2) * mn)[..., None]


def _q4_k_values(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes -> (n, 8, 32) uint8: each 32-byte group holds two sub-blocks (low nibbles, then high)."""
    return _nibbles(qs.reshape(-1, 4, 1, 32), dim=2).view(-1, 8, 32)


def _dequant_q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    scale, offset = _k_scales(blocks)
    out.view(-1, 8, 32).copy_(_q4_k_values(blocks[:, 16:])).mul_(scale).sub_(offset)


def _dequant_q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    scale, offset = _k_scales(blocks)
    high = (blocks[:, 16:48][:, None, :] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1  # (n, 8, 32)
    out.view(-1, 8, 32).copy_(_q4_k_values(blocks[:, 48:]) | (high << 4)).mul_(scale).sub_(offset)


def _dequant_q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # Value order follows ggml's loops: (half, nibble, 32-byte group, 32); qh holds 2 bits per value at shift
    # 2 * (2 * nibble + group).
    low = _nibbles(blocks[:, :128].reshape(-1, 2, 1, 2, 32), dim=2)  # (n, 2, 2, 2, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(2, 2, 1)
    high = (blocks[:, 128:192].reshape(-1, 2, 1, 1, 32) >> shifts) & 3
    scale = blocks[:, 192:208].contiguous().view(torch.int8).float() * _f16(blocks, 208)  # (n, 16)
    out.copy_((low | (high << 4)).view(out.shape)).sub_(32.0)
    out.view(-1, 16, 16).mul_(scale[..., None])


def _dequant_bf16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.contiguous().view(torch.bfloat16).view(out.shape))


def _dequant_f16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.contiguous().view(torch.float16).view(out.shape))


def _dequant_f32(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.contiguous().view(torch.float32).view(out.shape))


T = GGMLQuantizationType
TORCH_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor, torch.Tensor], None]] = {
    T.F32: _dequant_f32,
    T.F16: _dequant_f16,
    T.BF16: _dequant_bf16,
    T.Q8_0: _dequant_q8_0,
    T.Q4_0: _dequant_q4_0,
    T.Q4_1: _dequant_q4_1,
    T.Q5_0: _dequant_q5_0,
    T.Q5_1: _dequant_q5_1,
    T.Q4_K: _dequant_q4_k,
    T.Q5_K: _dequant_q5_k,
    T.Q6_K: _dequant_q6_k,
}
# Further float types gguf.quants can dequantize (in numpy); integer types are never weights.
NUMPY_FALLBACK = frozenset({T.Q2_K, T.Q3_K, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M,
                            T.IQ4_NL, T.IQ4_XS, T.TQ1_0, T.TQ2_0})


def can_dequantize(qtype: GGMLQuantizationType) -> bool:
    return qtype in TORCH_DEQUANTIZERS or qtype in NUMPY_FALLBACK


def dequantize(
    raw: np.ndarray,
    qtype: GGMLQuantizationType,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw GGUF bytes of one tensor, ``(rows, bytes_per_row)`` uint8, -> a ``shape`` tensor of ``dtype`` (or ``out``).

    Works in row chunks written into the result, so the peak extra memory is one small chunk, not a float32 copy
    of the whole tensor.
    """
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(-1, raw.shape[-1])
    result = torch.empty(shape, dtype=dtype) if out is None else out
    dtype = result.dtype
    out = result.view(rows.shape[0], -1)  # (rows, values per row)
    step = max(1, _CHUNK_ELEMENTS // out.shape[1])
    torch_fn = TORCH_DEQUANTIZERS.get(qtype)
    scratch = None if dtype == torch.float32 else torch.empty(min(step, rows.shape[0]) * out.shape[1])
    for start in range(0, rows.shape[0], step):
        chunk, target = rows[start:start + step], out[start:start + step]
        if torch_fn is None:
            from gguf.quants import dequantize as numpy_dequantize

            target.copy_(torch.from_numpy(numpy_dequantize(np.ascontiguousarray(chunk), qtype)))
            continue
        values = target if scratch is None else scratch[:target.numel()].view(target.shape)
        blocks = torch.from_numpy(np.ascontiguousarray(chunk)).view(-1, type_size)
        torch_fn(blocks, values.view(-1, block_size))
        if scratch is not None:
            target.copy_(values)
    return result
