"""Weight-only quantized replacements for ``nn.Linear``: int8 (symmetric) and int4 (asymmetric, group-wise).

The weights live in buffers (``qweight``, ``scales``, ``mins``) under the linear's own name, so a quantized
model's ``state_dict`` is its checkpoint. Scales and minimums are float16, as in ggml's blocks: at group size 32,
float32 ones would add half as many bytes again as the 4-bit values themselves, and decode reads every byte of
the weights per token. Small batches (decode) use the compiled kernel with float activations. Larger ones
(prefill) multiply int8 activations by per-channel int8 weights with ``torch._int_mm`` (``int8_matmul``); without
the kernels, or in training, the matrix is dequantized once per call for the float matmul, which is faster there
than the small-batch kernel. There is deliberately no ``weight`` attribute: code that
would modify ``weight`` in place (merging an adapter, say) must fail rather than write into a temporary copy;
``dequantize()`` gives the matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from laformer.errors import ConfigError
from laformer.quantization import kernels

CHUNK = 32  # values per packed chunk; group sizes and the kernel's K are multiples of it
KERNEL_MAX_ROWS = 8  # above this many rows, dequantize + float matmul measured faster (bench/quantize.py)
# Input channels kept in float by ``int8_matmul``: SmolLM2-135M's perplexity with int8 activations went +1.7% at 4,
# +0.3% at 8, -0.2% at 16 (the weight rounding alone: -0.3%).
OUTLIER_CHANNELS = 16
# When its rows' mean (max|x| / rms(x))^2 exceeds this squared, ``int8_matmul`` adds a second product for the
# rounding residual. On SmolLM2 every down_proj input's rows measured max/rms 10-24 (their rounding alone: +0.37%
# perplexity; with the residual +0.00%), every other layer's 4-7.
PEAKED_ROWS = 8.5


def check_group_size(group_size: int, in_features: int, name: str = "linear", bits: int = 4) -> None:
    """Raise a ConfigError unless ``group_size`` is a positive multiple of 32 dividing ``in_features``."""
    if not isinstance(group_size, int) or group_size <= 0 or group_size % CHUNK or in_features % group_size:
        valid = [g for g in range(CHUNK, in_features + 1, CHUNK) if in_features % g == 0][:6]
        raise ConfigError(
            f"group_size {group_size!r} cannot be used for the int{bits} layer {name} with in_features "
            f"{in_features}: it must be a multiple of {CHUNK} that divides in_features; use one of {valid}"
            + ("" if bits == 4 else " or None (one scale per output channel)")
        )


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in 0..15 -> (N, K/2) uint8, value j and j+16 of each 32-chunk sharing a byte (ggml order)."""
    N, K = q.shape
    chunks = q.to(torch.uint8).view(N, K // CHUNK, 2, CHUNK // 2)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: (N, K/2) uint8 -> (N, K) uint8 values in 0..15."""
    N, half = packed.shape
    chunks = packed.view(N, half // (CHUNK // 2), CHUNK // 2)
    return torch.stack((chunks & 0x0F, chunks >> 4), dim=2).reshape(N, half * 2)


MIN_SCALE = 2.0**-14  # float16's smallest normal number: constant groups get a usable scale, never 0


def _half_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to float16 values (kept in float32 for the quantization arithmetic)."""
    return t.to(torch.float16).float()


class QuantizedLinear(nn.Module):
    """Shared by both widths: shapes, the float fallback and the kernel dispatch.

    ``int8_activations`` (default True) lets the fast paths round activations to int8: ``int8_matmul`` here and
    the native decode step (``laformer.inference``). ``laformer.quantization.set_int8_activations(model, False)``
    keeps every product weight-only (float activations: exact up to float rounding, slower).
    """

    bits: int
    int8_activations: bool = True

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def _mins(self) -> torch.Tensor | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        training = x.requires_grad and torch.is_grad_enabled()
        fast = (x.dtype == torch.float32 and x.device.type == "cpu" and not training and self.qweight.is_contiguous()
                and self.scales.dtype == torch.float16)  # not after a model.to(dtype)
        if fast and rows > KERNEL_MAX_ROWS and self.int8_activations and kernels.int8_rows_available():
            y = int8_matmul(x.reshape(rows, self.in_features), *self._int8_weights())
        elif fast and rows <= KERNEL_MAX_ROWS and self.in_features % CHUNK == 0 and kernels.available():
            mins = self._mins()
            y = kernels.qgemm(x.reshape(rows, self.in_features).contiguous(), self.qweight, self.scales.contiguous(),
                              None if mins is None else mins.contiguous(), self.bits, self.group_size)
        else:  # gradients flow to x (QLoRA) through F.linear; the quantized weights are buffers and stay frozen
            return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _int8_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights as (N, K) int8 with one float32 scale per output channel, for ``int8_matmul``. Grouped
        layers are dequantized and rounded to that grid at each call: 0.3 ms for a 3072x576 matrix, against 10 ms
        for its 512-row float32 product. The grid's steps are ~17x finer than 4-bit ones; SmolLM2's Q4_1 layers
        scored -0.3% to +0.4% perplexity this way (activations included) against their exact float products."""
        mins = self._mins()
        return kernels.weights_to_int8(self.qweight, self.scales.contiguous(),
                                       None if mins is None else mins.contiguous(), self.bits, self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class WeightOnlyInt8Linear(QuantizedLinear):
    """int8 weights, one float scale per output channel (``group_size=None``) or per group of inputs.

    value = qweight * scale. ggml's Q8_0 is exactly this with group_size 32.
    """

    bits = 8

    def __init__(self, in_features: int, out_features: int, group_size: int | None = None, bias: bool = False,
                 device=None) -> None:
        super().__init__(in_features, out_features, group_size or in_features, bias, device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))

    @classmethod
    @torch.no_grad()
    def from_float(
        cls, linear: nn.Linear, group_size: int | None = None, name: str = "linear"
    ) -> "WeightOnlyInt8Linear":
        N, K = linear.out_features, linear.in_features
        if group_size is not None:
            check_group_size(group_size, K, name, bits=8)
        G = group_size or K
        module = cls(K, N, group_size, linear.bias is not None, device=linear.weight.device)
        w = linear.weight.detach().float().view(N, K // G, G)
        scales = _half_precision((w.abs().amax(-1) / 127).clamp_min(MIN_SCALE))  # rounded before use: q matches it
        module.qweight.copy_(torch.round(w / scales[..., None]).clamp_(-127, 127).view(N, K))
        module.scales.copy_(scales)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K, G = self.out_features, self.in_features, self.group_size
        w = self.qweight.view(N, K // G, G).float() * self.scales.float()[..., None]
        return w.view(N, K).to(dtype)

    def _int8_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.group_size == self.in_features:  # already per channel
            return self.qweight, self.scales.float().view(-1)
        return super()._int8_weights()


class WeightOnlyInt4Linear(QuantizedLinear):
    """4-bit weights in groups of ``group_size`` inputs, each with a float scale and minimum.

    value = q * scale + min, q in 0..15, two values per byte (see ``pack_int4``). ggml's Q4_1 is exactly this
    with group_size 32, and Q4_0 too (min = -8 * scale).
    """

    bits = 4

    def __init__(self, in_features: int, out_features: int, group_size: int = 64, bias: bool = False,
                 device=None) -> None:
        check_group_size(group_size, in_features)
        super().__init__(in_features, out_features, group_size, bias, device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("mins", torch.zeros(out_features, in_features // group_size, dtype=torch.float16,
                                                 device=device))

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, group_size: int = 64, name: str = "linear") -> "WeightOnlyInt4Linear":
        N, K, G = linear.out_features, linear.in_features, group_size
        check_group_size(G, K, name)
        module = cls(K, N, G, linear.bias is not None, device=linear.weight.device)
        w = linear.weight.detach().float().view(N, K // G, G)
        low = _half_precision(w.amin(-1))
        scales = _half_precision(((w.amax(-1) - low) / 15).clamp_min(MIN_SCALE))
        q = torch.round((w - low[..., None]) / scales[..., None]).clamp_(0, 15)
        module.qweight.copy_(pack_int4(q.view(N, K)))
        module.scales.copy_(scales)
        module.mins.copy_(low)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def _mins(self) -> torch.Tensor:
        return self.mins

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K, G = self.out_features, self.in_features, self.group_size
        q = unpack_int4(self.qweight).view(N, K // G, G).float()
        # Multiply then add (no fused multiply-add), as ggml's reference dequantization does: bit-exact with it.
        w = q * self.scales.float()[..., None] + self.mins.float()[..., None]
        return w.view(N, K).to(dtype)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, column_scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 @ (weight (N, K) int8 * column_scales (N,))^T with int8 activations and ``torch._int_mm``.

    ~3.5x faster than the float32 matmul at 512 rows on this AVX2 CPU. Each row is rounded to int8 with its own
    scale (max|x| / 127), except the ``OUTLIER_CHANNELS`` input channels of largest magnitude in this call, which
    go through a small float product instead (LLM.int8()'s decomposition, with the channels picked per call):
    LLaMA activations carry a few channels far larger than the rest, and rounding them into a row's scale would
    flatten every other channel to a few levels (+3.2% perplexity on SmolLM2). Rows peaked even without those
    channels (the SwiGLU product entering down_proj) get a second product for their rounding residual
    (``PEAKED_ROWS``): ~14-bit activations.
    """
    x = x.contiguous()
    K = x.shape[1]
    outliers = x.abs().amax(0).topk(min(OUTLIER_CHANNELS, K)).indices
    keep = torch.ones(K).index_fill_(0, outliers, 0.0)
    rows, row_scales, residual, residual_scales, peak = kernels.round_rows(x, keep)
    weight_t = weight.t()
    return kernels.scale_products(
        torch._int_mm(rows, weight_t), row_scales,
        torch._int_mm(residual, weight_t) if peak > PEAKED_ROWS**2 else None, residual_scales,
        x.index_select(1, outliers), weight_t.index_select(0, outliers).float(), column_scales)
