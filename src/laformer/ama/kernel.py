"""The fused AMA decode step (``kernel.c``): one C call per layer instead of ~25 small PyTorch operations.

At 8k tokens a layer's whole KV cache is a few MB, so AMA's decode is bound by per-operation overhead, not by
the tokens it reads; the kernel scores the slices, picks them, attends to them in place in the slice-blocked
cache and folds in the mediation pseudo-tokens in a single pass. ``AMAAttention._decode``'s PyTorch code is the
reference (the tests compare both) and the fallback: without a C compiler, with ``LAFORMER_NO_KERNELS=1``, for
other dtypes or devices, and for what the kernel does not do (recording, Gumbel sampling, the learned gate).
The same library scores prefill query blocks for the ``scan`` score (``scan``), whose PyTorch reference is
``scan.slice_mass``.
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
def _library():
    lib = native.load(SOURCE, _flags(), "AMA kernels")
    if lib is None:
        return None
    lib.laformer_ama_decode.restype = lib.laformer_ama_scan.restype = None
    lib.laformer_ama_decode.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 9
                                        + [ctypes.c_int] * 11)
    lib.laformer_ama_scan.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 8
    return lib


def scan(q_rows: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, own: torch.Tensor,
         valid: torch.Tensor | None) -> torch.Tensor | None:
    """``scan.slice_log_mass``'s masses (B, H_kv, Q, N), not yet logged, in C; None where it cannot run (no
    compiler, not float32 on the CPU), for the PyTorch code to do it."""
    lib = _library()
    if lib is None or q_rows.dtype != torch.float32 or q_rows.device.type != "cpu":
        return None
    B, Hkv, Q, R, D = q_rows.shape
    N, L = codes.shape[2], codes.shape[3]
    q_rows, codes, scales = q_rows.contiguous(), codes.contiguous(), scales.contiguous()
    own = own.to(torch.int64).contiguous()
    valid = None if valid is None else valid.to(torch.uint8).contiguous()
    mass = torch.empty(B, Hkv, Q, N)
    lib.laformer_ama_scan(q_rows.data_ptr(), codes.data_ptr(), scales.data_ptr(), own.data_ptr(),
                          None if valid is None else valid.data_ptr(), mass.data_ptr(), B, Hkv, Q, R, D, N, L,
                          0 if valid is None else valid.shape[1])
    return mass


def available() -> bool:
    """True when the fused decode can run on this machine (builds it on first call)."""
    return _library() is not None


def supports(config: AMAConfig) -> bool:
    """Whether ``config`` asks only for what the kernel does (top-k selection, mediation off or estimate,
    nothing recorded) and the kernel is built."""
    return (config.sampling == "topk" and config.mediation in ("off", "estimate") and not config.return_selection
            and available())


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Float32 CPU tensors whose token rows are contiguous (any batch/head strides, e.g. cache views)."""
    return (q.dtype == k.dtype == v.dtype == torch.float32 and q.device.type == k.device.type == "cpu"
            and k.stride(-1) == v.stride(-1) == 1 and k.stride(-2) == v.stride(-2) == k.shape[-1])


SCORES = {"bound": 0, "mean": 1, "scan": 2}  # kernel.c's SCORE_ values


def settings(config: AMAConfig) -> tuple[int, ...]:
    """The kernel's view of ``config``, computed once per backend: slice length, sink slices, local slices,
    budget in slices, the score, whether to mediate."""
    return (config.slice_len, config.sink_slices, config.local_slices, config.budget_slices,
            SCORES[config.score], int(config.mediation != "off"))


def decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, summaries: SliceSummaries,
    settings: tuple[int, ...],
) -> torch.Tensor:
    """AMA attention of one query per row: q (B, H, 1, D), cache k/v (B, H_kv, S, D) -> (B, H, 1, D).

    Decode is bound by fixed costs at these sizes, so the summaries' pointers are prepared once per summary
    update (in ``summaries.cache``) rather than once per layer call."""
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    L, sinks, local, budget, score, mediate = settings
    pointers = summaries.cache.get("kernel")
    if pointers is None:
        fields = [None if x is None else x.contiguous() for x in (
            summaries.kmin, summaries.kmax, summaries.kmean, summaries.vmean, summaries.log_count,
            summaries.key_codes, summaries.key_scales)]
        pointers = summaries.cache["kernel"] = (fields, [None if x is None else x.data_ptr() for x in fields])
    q = q.contiguous()
    valid = None if valid is None else valid.to(torch.uint8).contiguous()
    out = torch.empty_like(q)
    partial_slice = int(S % L != 0)  # the unfinished last slice is always attended and pays one slice of budget
    _library().laformer_ama_decode(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        None if valid is None else valid.data_ptr(), *pointers[1], out.data_ptr(), B, H, Hkv, S, D, L, sinks,
        local, budget - partial_slice, score, mediate,
    )
    return out
