"""The fused AMA decode step (``kernel.c``): one C call per layer instead of ~25 small PyTorch operations.

At 8k tokens a layer's whole KV cache is a few MB, so AMA's decode is bound by per-operation overhead, not by
the tokens it reads; the kernel scores the slices, picks them, attends to them in place in the slice-blocked
cache and folds in the mediation pseudo-tokens in a single pass. ``AMAAttention._decode``'s PyTorch code is the
reference (the tests compare both) and the fallback: without a C compiler, with ``LAFORMER_NO_KERNELS=1``, for
other dtypes or devices, and for what the kernel does not do (recording, Gumbel sampling, the learned gate).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from laformer import native
from laformer.ama.cache import SliceSummaries
from laformer.ama.config import AMAConfig

SOURCE = Path(__file__).with_name("kernel.c")


def _flags() -> list[str]:
    return ["-O3", "-fopenmp-simd", *(["-mavx2", "-mfma"] if native.has_avx2() else [])]


@functools.cache
def _function():
    lib = native.load(SOURCE, _flags(), "AMA decode")
    if lib is None:
        return None
    fn = lib.laformer_ama_decode
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 7 + [ctypes.c_int] * 11
    return fn


def available() -> bool:
    """True when the fused decode can run on this machine (builds it on first call)."""
    return _function() is not None


def supports(config: AMAConfig) -> bool:
    """Whether ``config`` asks only for what the kernel does (top-k selection, mediation off or estimate,
    nothing recorded) and the kernel is built."""
    return (config.sampling == "topk" and config.mediation in ("off", "estimate") and not config.return_selection
            and available())


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Float32 CPU tensors whose token rows are contiguous (any batch/head strides, e.g. cache views)."""
    return (q.dtype == k.dtype == v.dtype == torch.float32 and q.device.type == k.device.type == "cpu"
            and k.stride(-1) == v.stride(-1) == 1 and k.stride(-2) == v.stride(-2) == k.shape[-1])


def settings(config: AMAConfig) -> tuple[int, ...]:
    """The kernel's view of ``config``, computed once per backend: slice length, sink slices, local slices,
    budget in slices, whether the score is the mean key, whether to mediate."""
    return (config.slice_len, config.sink_slices, config.local_slices, config.budget_slices,
            int(config.score == "mean"), int(config.mediation != "off"))


def decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, summaries: SliceSummaries,
    settings: tuple[int, ...],
) -> torch.Tensor:
    """AMA attention of one query per row: q (B, H, 1, D), cache k/v (B, H_kv, S, D) -> (B, H, 1, D).

    Decode is bound by fixed costs at these sizes, so the summaries' pointers are prepared once per summary
    update (in ``summaries.cache``) rather than once per layer call."""
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    L, sinks, local, budget, score_mean, mediate = settings
    pointers = summaries.cache.get("kernel")
    if pointers is None:
        fields = [x.contiguous() for x in (summaries.kmin, summaries.kmax, summaries.kmean, summaries.vmean,
                                           summaries.log_count)]
        pointers = summaries.cache["kernel"] = (fields, [x.data_ptr() for x in fields])  # fields stay alive
    q = q.contiguous()
    valid = None if valid is None else valid.to(torch.uint8).contiguous()
    out = torch.empty_like(q)
    partial_slice = int(S % L != 0)  # the unfinished last slice is always attended and pays one slice of budget
    _function()(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        None if valid is None else valid.data_ptr(), *pointers[1], out.data_ptr(), B, H, Hkv, S, D, L, sinks,
        local, budget - partial_slice, score_mean, mediate,
    )
    return out
