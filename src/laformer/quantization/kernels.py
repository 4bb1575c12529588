"""The small-batch kernel (``qgemm.c``) as the PyTorch operator ``laformer::qgemm``, built at first use and cached.

PyTorch's own weight-only kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) measured 3-30x
slower than a float32 matmul here (bench/quantize.py), and FBGEMM's dynamic int8 linear, though fast, quantizes
the activations per tensor (+183% perplexity on SmolLM2-135M), so decode uses this small AVX2 kernel with float
activations: 6-8x faster than float32 on a SmolLM2 linear at batch 1, 1.0-1.7x at 8 rows (above that, dequantize
+ matmul). The native decode step (laformer.inference) uses the same file's int8-activation kernels.

The operator's CPU implementation is, in order of preference:
- native: ``qgemm_op.cpp`` (the C kernel plus a ``TORCH_LIBRARY_IMPL``) built with the C++ compiler against
  torch's headers (~10 s, once per torch version); a call costs ~4 us, where the next option costs ~20 us, which
  at 121 calls per decode step was 15-20% of a SmolLM2 token;
- ctypes: the plain C kernel built with the C compiler (~1 s) and called from Python;
- none: without a compiler, on a CPU without AVX2, or with ``LAFORMER_NO_KERNELS=1``, ``available()`` is False
  and the quantized layers fall back to dequantize-then-matmul (correct, slower).
``LAFORMER_NO_NATIVE_OP=1`` skips the native build (the ctypes kernel is then used).

Each C entry point takes one struct (``_Qgemm``, ``_RoundRows``, ...: mirrors of the C ones), and each ctypes
library is checked at load against its ABI version and the structs' sizes and field offsets
(``laformer.native.check_abi``): a build that disagrees with the mirrors is refused with an ``ABIMismatchError``,
never called. The native operator needs no such check: it is compiled with qgemm.c itself, and the dispatcher
compares its C++ signature with the schema defined here.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path

import torch

from laformer import native

SOURCE = Path(__file__).with_name("qgemm.c")
OP_SOURCE = Path(__file__).with_name("qgemm_op.cpp")
ROWS_SOURCE = Path(__file__).with_name("int8_rows.c")
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
HEADER = Path(__file__).with_name("abi.h")
_P, _I = ctypes.c_void_p, ctypes.c_int64


class _Qgemm(ctypes.Structure):  # qgemm.c's Qgemm
    _fields_ = [(n, _P) for n in ("x", "w", "scales", "mins", "y")] + [
        (n, _I) for n in ("bits", "m", "n", "k", "g", "threads", "int8_activations")]


class _RoundRows(ctypes.Structure):  # int8_rows.c's
    _fields_ = [(n, _P) for n in ("x", "keep", "q", "q2", "scales", "scales2", "work")] + [
        (n, _I) for n in ("m", "k", "threads")]


class _WeightsToInt8(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("weights", "scales", "mins", "out", "row_scales", "work")] + [
        (n, _I) for n in ("bits", "n", "k", "group", "threads")]


class _ScaleProducts(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("a", "b", "sa", "sb", "xo", "wo", "w", "y")] + [
        (n, _I) for n in ("outliers", "m", "n", "threads")]


# (symbol prefix, ABI version, structs) that native.check_abi compares with each library at load.
QGEMM_ABI = ("laformer_qgemm", 2, (_Qgemm,))
ROWS_ABI = ("laformer_int8_rows", 2, (_RoundRows, _WeightsToInt8, _ScaleProducts))

# The schema and shape function live here, so the operator exists (and traces) whichever implementation is loaded.
_LIBRARY = torch.library.Library("laformer", "DEF")
_LIBRARY.define("qgemm(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int bits, int group_size) -> Tensor")


@torch.library.register_fake("laformer::qgemm", lib=_LIBRARY)
def _(x, qweight, scales, mins, bits, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)


def _load_native() -> None:
    """Build ``qgemm_op.cpp`` against this torch and register it as the operator's CPU kernel."""
    # The paths torch.utils.cpp_extension gives a CPU build, without importing it: it pulls in setuptools, about a
    # second that every process's first quantized generate paid even with the operator already built.
    root = Path(torch.__file__).parent
    torch_lib, includes = root / "lib", (root / "include", root / "include" / "torch" / "csrc" / "api" / "include")
    flags = [*CFLAGS, "-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *(f"-I{path}" for path in includes), f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}",
             "-lc10", "-ltorch_cpu"]
    library = native.build(OP_SOURCE, flags, depends=(SOURCE, HEADER), cxx=True, tag=torch.__version__,
                           name="qgemm-op")
    torch.ops.load_library(str(library))


@functools.cache
def ctypes_kernel():
    """The C kernel through ctypes, as a function with the operator's signature (builds it on first call)."""
    library = ctypes.CDLL(str(native.build(SOURCE, CFLAGS, depends=(HEADER,))))
    native.check_abi(library, SOURCE.name, *QGEMM_ABI)
    fn = library.laformer_qgemm
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.POINTER(_Qgemm)]

    def qgemm_ctypes(x, qweight, scales, mins, bits, group_size, int8_activations=False):
        """``int8_activations``: the native decode step's arithmetic (activations rounded to int8 blocks)."""
        M, K = x.shape
        N = qweight.shape[0]
        y = torch.empty(M, N, dtype=torch.float32)
        call = _Qgemm(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), None if mins is None else mins.data_ptr(),
                      y.data_ptr(), bits, M, N, K, group_size, torch.get_num_threads(), int(int8_activations))
        if fn(ctypes.byref(call)):
            raise MemoryError("qgemm: out of memory for the quantized activations")
        return y

    return qgemm_ctypes


@functools.cache
def backend() -> str | None:
    """Which implementation backs ``laformer::qgemm`` here: "native", "ctypes" or None (none could be built)."""
    if native.kernels_disabled() or not native.has_avx2():
        return None
    problems = []
    if not os.environ.get("LAFORMER_NO_NATIVE_OP"):
        try:
            _load_native()
            return "native"
        except native.ABIMismatchError:
            raise
        except (OSError, RuntimeError) as exc:
            problems.append(f"native operator: {exc}")
    try:
        _LIBRARY.impl("qgemm", ctypes_kernel(), "CPU")
    except native.ABIMismatchError:
        raise
    except OSError as exc:
        warnings.warn(f"laformer: quantized kernel unavailable ({'; '.join([*problems, str(exc)])}); using the "
                      "slower dequantize fallback", stacklevel=3)
        return None
    if problems:
        warnings.warn(f"laformer: {problems[0]}; using the ctypes kernel (slower per call)", stacklevel=3)
    return "ctypes"


def available() -> bool:
    """True when the kernel can be used on this machine (builds and registers it on first call)."""
    return backend() is not None


def mark_constant_for_compile() -> None:
    """Let ``torch.compile`` read ``available()`` and ``int8_rows_available()`` once while tracing, so a compiled
    step never calls them. Whoever compiles calls this first (the engine does): marking imports ``torch._dynamo``,
    seconds that importing the kernels (every quantized model, the first ``generate``) should not pay."""
    for check in (available, int8_rows_available):
        torch.compiler.assume_constant_result(check)


def qgemm(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """(M, K) float32 @ dequantized (N, K) weights^T -> (M, N) float32; all inputs contiguous, on the CPU.

    Call only when ``available()``; torch.compile keeps the operator as one opaque node in its graph.
    """
    return torch.ops.laformer.qgemm.default(x, qweight, scales, mins, bits, group_size)


@functools.cache
def _rows_library() -> ctypes.CDLL | None:
    if not native.has_avx2():
        return None
    library = native.load(ROWS_SOURCE, CFLAGS, "prefill through int8 layers", depends=(SOURCE, HEADER),
                          abi=ROWS_ABI)
    if library is not None:
        for name, struct, result in (("round_rows", _RoundRows, ctypes.c_double),
                                     ("weights_to_int8", _WeightsToInt8, None),
                                     ("scale_products", _ScaleProducts, None)):
            fn = getattr(library, f"laformer_{name}")
            fn.restype, fn.argtypes = result, [ctypes.POINTER(struct)]
    return library


def int8_rows_available() -> bool:
    """True when ``round_rows`` and ``scale_products`` can run here (builds ``int8_rows.c`` on first call)."""
    return _rows_library() is not None


def round_rows(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                             float]:
    """Each row of ``x * keep`` ((M, K) float32 times (K,) ones and zeros) rounded to int8 with its own scale, then
    the rows' rounding residuals rounded the same way. Returns (int8 rows, scales (M, 1), residual int8 rows,
    residual scales (M, 1), mean over rows of max(x^2) / mean(x^2))."""
    M, K = x.shape
    threads = torch.get_num_threads()
    q, q2 = torch.empty(M, K, dtype=torch.int8), torch.empty(M, K, dtype=torch.int8)
    scales, scales2, work = torch.empty(M, 1), torch.empty(M, 1), torch.empty(threads, 2, K)
    peaks = _rows_library().laformer_round_rows(ctypes.byref(_RoundRows(
        x.data_ptr(), keep.data_ptr(), q.data_ptr(), q2.data_ptr(), scales.data_ptr(), scales2.data_ptr(),
        work.data_ptr(), M, K, threads)))
    return q, scales, q2, scales2, peaks / M


def weights_to_int8(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int,
                    group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A grouped int8 or 4-bit weight matrix (a quantized linear's buffers, float16 scales) dequantized and rounded
    to int8 with one scale per output row: ((N, K) int8, (N,) float32 scales)."""
    N, K = qweight.shape[0], scales.shape[1] * group_size
    threads = torch.get_num_threads()
    out, row_scales, work = torch.empty(N, K, dtype=torch.int8), torch.empty(N), torch.empty(threads, K)
    _rows_library().laformer_weights_to_int8(ctypes.byref(_WeightsToInt8(
        qweight.data_ptr(), scales.data_ptr(), None if mins is None else mins.data_ptr(), out.data_ptr(),
        row_scales.data_ptr(), work.data_ptr(), bits, N, K, group_size, threads)))
    return out, row_scales


def scale_products(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor | None, b_scales: torch.Tensor,
                   outlier_x: torch.Tensor, outlier_w: torch.Tensor, column_scales: torch.Tensor) -> torch.Tensor:
    """(a * a_scales + b * b_scales + outlier_x @ outlier_w) * column_scales: int32 (M, N) products, (M, 1) row
    scales, float32 (M, J) @ (J, N) outliers and (N,) column scales; all contiguous."""
    M, N = a.shape
    y = torch.empty(M, N)
    _rows_library().laformer_scale_products(ctypes.byref(_ScaleProducts(
        a.data_ptr(), None if b is None else b.data_ptr(), a_scales.data_ptr(), b_scales.data_ptr(),
        outlier_x.data_ptr(), outlier_w.data_ptr(), column_scales.data_ptr(), y.data_ptr(), outlier_x.shape[1], M, N,
        torch.get_num_threads())))
    return y
