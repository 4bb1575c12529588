"""The fused AMA decode step (``kernel.c``): one C call per layer instead of ~25 small PyTorch operations.

At 8k tokens a layer's whole KV cache is a few MB, so AMA's decode is bound by per-operation overhead, not by
the tokens it reads; the kernel scores the slices, picks them, attends to them in place in the slice-blocked
cache and folds in the mediation pseudo-tokens in a single pass. ``AMAAttention._decode``'s PyTorch code is the
reference (the tests compare both) and the fallback: without a C compiler, with ``LAFORMER_NO_KERNELS=1``, for
other dtypes or devices, and for what the kernel does not do (recording, Gumbel sampling, the learned gate).
The same library scores prefill query blocks for the ``scan`` score (``scan``), whose PyTorch reference is
``scan.slice_mass``, and serves the engine's native decode step (``ama/step.py``).

Arguments cross into C as the structs below, mirrors of kernel.c's; at load the library's ABI version and struct
layout (every size and field offset) must equal these, or it is refused with ``native.ABIMismatchError``.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from laformer import native
from laformer.ama.cache import SliceSummaries
from laformer.ama.config import AMAConfig
from laformer.errors import LaFormerError

SOURCE = Path(__file__).with_name("kernel.c")
ABI_VERSION = 2  # kernel.c's AMA_ABI_VERSION
SCORES = {"bound": 0, "mean": 1, "scan": 2}  # kernel.c's SCORE_ values
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class Settings(ctypes.Structure):
    _fields_ = [(name, _i64) for name in ("batch", "heads", "kv_heads", "head_dim", "slice_len", "sink_slices",
                                          "local_slices", "budget_slices", "score", "mediate")]


class Layer(ctypes.Structure):
    _fields_ = ([("keys", _ptr), ("values", _ptr)]
                + [(name, _i64) for name in ("key_batch_stride", "key_head_stride", "value_batch_stride",
                                             "value_head_stride")]
                + [(name, _ptr) for name in ("kmean", "vmean", "kmin", "kmax", "log_count", "key_scales",
                                             "key_codes")]
                + [(name, _i64) for name in ("capacity", "count_batch_stride", "count_head_stride")]
                + [("summarised", _ptr)])


class Scan(ctypes.Structure):
    _fields_ = ([(name, _ptr) for name in ("q", "key_codes", "key_scales", "own", "valid", "mass")]
                + [(name, _i64) for name in ("batch", "kv_heads", "queries", "rows", "head_dim", "slices",
                                             "slice_len", "valid_stride")])


class Step(ctypes.Structure):
    _fields_ = [("settings", ctypes.POINTER(Settings)), ("layers", ctypes.POINTER(Layer)), ("scratch", _ptr),
                ("scratch_floats", _i64), ("threads", _i64)]


STRUCTS = (Settings, Layer, Scan, Step)


class KernelMemoryError(LaFormerError, MemoryError):
    """The prefill scan could not allocate its work buffer."""


def _flags() -> list[str]:
    return ["-O3", "-fopenmp-simd", *(["-mavx2", "-mfma"] if native.has_avx2() else [])]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built library (None without a compiler or with ``LAFORMER_NO_KERNELS``); builds it on first call."""
    lib = native.load(SOURCE, _flags(), "AMA kernels", depends=(SOURCE.parent.parent / "quantization" / "abi.h",),
                      abi=("laformer_ama", ABI_VERSION, STRUCTS))
    if lib is None:
        return None
    lib.laformer_ama_decode.restype = None
    lib.laformer_ama_decode.argtypes = [ctypes.POINTER(Settings), ctypes.POINTER(Layer), _ptr, _i64, _ptr, _i64,
                                        _i64, _ptr, _ptr, ctypes.c_int, ctypes.c_int]
    lib.laformer_ama_scan.restype = ctypes.c_int
    lib.laformer_ama_scan.argtypes = [ctypes.POINTER(Scan)]
    lib.laformer_ama_scratch_floats.restype = _i64
    lib.laformer_ama_scratch_floats.argtypes = [ctypes.POINTER(Settings), _i64]
    return lib


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def scan(q_rows: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, own: torch.Tensor,
         valid: torch.Tensor | None) -> torch.Tensor | None:
    """``scan.slice_log_mass``'s masses (B, H_kv, Q, N), not yet logged, in C; None where it cannot run (no
    compiler, not float32 on the CPU), for the PyTorch code to do it."""
    lib = library()
    if lib is None or q_rows.dtype != torch.float32 or q_rows.device.type != "cpu":
        return None
    B, Hkv, Q, R, D = q_rows.shape
    N, L = codes.shape[2], codes.shape[3]
    q_rows, codes, scales = q_rows.contiguous(), codes.contiguous(), scales.contiguous()
    own = own.to(torch.int64).contiguous()
    valid = None if valid is None else valid.to(torch.uint8).contiguous()
    mass = torch.empty(B, Hkv, Q, N)
    args = Scan(q_rows.data_ptr(), codes.data_ptr(), scales.data_ptr(), own.data_ptr(), _address(valid),
                mass.data_ptr(), B, Hkv, Q, R, D, N, L, 0 if valid is None else valid.shape[1])
    if lib.laformer_ama_scan(ctypes.byref(args)):
        raise KernelMemoryError(f"the AMA prefill scan could not allocate {R * N * L * 4} bytes; prefill in "
                                "shorter chunks or free memory")
    return mass


def available() -> bool:
    """True when the fused decode can run on this machine (builds it on first call)."""
    return library() is not None


def supports(config: AMAConfig) -> bool:
    """Whether ``config`` asks only for what the kernel does (top-k selection, mediation off or estimate,
    nothing recorded) and the kernel is built."""
    return (config.sampling == "topk" and config.mediation in ("off", "estimate") and not config.return_selection
            and available())


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Float32 CPU tensors whose token rows are contiguous (any batch/head strides, e.g. cache views)."""
    return (q.dtype == k.dtype == v.dtype == torch.float32 and q.device.type == k.device.type == "cpu"
            and k.stride(-1) == v.stride(-1) == 1 and k.stride(-2) == v.stride(-2) == k.shape[-1])


def settings(config: AMAConfig, heads: int, kv_heads: int, head_dim: int, batch: int) -> Settings:
    """The kernel's view of ``config`` for a model's attention shapes."""
    return Settings(batch, heads, kv_heads, head_dim, config.slice_len, config.sink_slices, config.local_slices,
                    config.budget_slices, SCORES[config.score], int(config.mediation != "off"))


def scratch_floats(settings: Settings, slices: int) -> int:
    """Floats of scratch one thread's decode needs for rows of up to ``slices`` full slices."""
    return library().laformer_ama_scratch_floats(ctypes.byref(settings), slices)


def decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, summaries: SliceSummaries,
    config: AMAConfig,
) -> torch.Tensor:
    """AMA attention of one query per row: q (B, H, 1, D), cache k/v (B, H_kv, S, D) -> (B, H, 1, D).

    Decode is bound by fixed costs at these sizes, so the summaries' struct and the scratch are prepared once per
    summary update (in ``summaries.cache``) rather than once per layer call."""
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    prepared = summaries.cache.get("kernel")
    if prepared is None:
        held = [None if x is None else x.contiguous() for x in (
            summaries.kmean, summaries.vmean, summaries.kmin, summaries.kmax, summaries.log_count,
            summaries.key_scales, summaries.key_codes)]
        N = summaries.num_slices
        layer = Layer(0, 0, 0, 0, 0, 0, *map(_address, held), N, N, 0, None)
        s = settings(config, H, Hkv, D, B)
        scratch = torch.empty(scratch_floats(s, N))
        prepared = summaries.cache["kernel"] = (held, layer, s, scratch)
    _, layer, s, scratch = prepared
    layer.keys, layer.values = k.data_ptr(), v.data_ptr()
    layer.key_batch_stride, layer.key_head_stride = k.stride(0), k.stride(1)
    layer.value_batch_stride, layer.value_head_stride = v.stride(0), v.stride(1)
    q = q.contiguous()
    valid = None if valid is None else valid.to(torch.uint8).contiguous()
    out = torch.empty_like(q)
    library().laformer_ama_decode(ctypes.byref(s), ctypes.byref(layer), q.data_ptr(), H * D, _address(valid),
                                   S if valid is None else valid.stride(0), S, out.data_ptr(),
                                   scratch.data_ptr(), 0, 1)
    return out
