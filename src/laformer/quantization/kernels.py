"""The compiled small-batch kernel (``qgemm.c``), built with the system C compiler at first use and cached.

PyTorch's own weight-only kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) measured 3-30x
slower than a float32 matmul here (bench/quantize.py), and FBGEMM's dynamic int8 linear, though fast, quantizes
the activations per tensor (+183% perplexity on SmolLM2-135M), so decode uses this ~100-line AVX2 kernel: 6-8x
faster than float32 on a SmolLM2 linear at batch 1, 1.0-1.7x at 8 rows (above that, dequantize + matmul).
It is plain C called through ctypes (no torch headers), so the build takes about a second. Without a compiler,
on a CPU without AVX2, or with ``LAFORMER_NO_KERNELS=1``, ``available()`` is False and the quantized layers fall
back to dequantize-then-matmul (correct, slower).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("qgemm.c")
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]


def cache_dir() -> Path:
    root = os.environ.get("LAFORMER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "laformer"
    )
    return Path(root) / "kernels"


def _cpu_supported() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _build() -> Path:
    source = SOURCE.read_bytes()
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise OSError("no C compiler (gcc or cc) on PATH")
    digest = hashlib.sha256(source + " ".join([compiler, *CFLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"qgemm-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent processes (test workers) never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as exc:
        raise OSError(f"{compiler} failed: {exc.stderr.strip()[:500]}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library():
    if os.environ.get("LAFORMER_NO_KERNELS") or not _cpu_supported():
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except OSError as exc:
        warnings.warn(f"laformer: quantized kernel unavailable ({exc}); using the slower dequantize fallback",
                      stacklevel=3)
        return None
    fn = lib.laformer_qgemm
    fn.restype = None
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    return fn


@torch.compiler.assume_constant_result  # read once while tracing, so a compiled step never calls ctypes here
def available() -> bool:
    """True when the compiled kernel can be used on this machine (builds it on first call)."""
    return _library() is not None


# A custom op, not a bare ctypes call, so torch.compile keeps the kernel as one opaque node in the graph.
@torch.library.custom_op("laformer::qgemm", mutates_args=())
def qgemm(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """(M, K) float32 @ dequantized (N, K) weights^T -> (M, N) float32; all inputs contiguous, on the CPU."""
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    _library()(
        bits, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), None if mins is None else mins.data_ptr(),
        y.data_ptr(), M, N, K, group_size, torch.get_num_threads(),
    )
    return y


@qgemm.register_fake
def _(x, qweight, scales, mins, bits, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)
