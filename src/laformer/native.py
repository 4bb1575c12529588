"""Small C kernels built with the system compiler at first use and cached by content hash.

The sources are plain C called through ctypes (no torch headers), so a build takes about a second and needs
only ``gcc`` or ``cc``. The library lands in ``$LAFORMER_CACHE/kernels`` (default ``~/.cache/laformer``) under a
name derived from the source and the flags, so an edited source or another flag set never loads a stale build.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch


def cache_dir() -> Path:
    root = os.environ.get("LAFORMER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "laformer"
    )
    return Path(root) / "kernels"


def has_avx2() -> bool:
    """x86-64 with AVX2 and FMA, so ``-mavx2 -mfma`` code runs here."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build(source: Path, flags: list[str]) -> Path:
    """Compile ``source`` into a shared library (once per source and flags) and return its path."""
    code = source.read_bytes()
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise OSError("no C compiler (gcc or cc) on PATH")
    digest = hashlib.sha256(code + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent processes (test workers) never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-shared", "-fPIC", str(source), "-o", tmp], check=True,
                       capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as exc:
        raise OSError(f"{compiler} failed: {exc.stderr.strip()[:500]}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: Path, flags: list[str], what: str) -> ctypes.CDLL | None:
    """The built library, or None (with a warning naming ``what`` falls back) when it cannot be built or
    ``LAFORMER_NO_KERNELS`` is set."""
    if os.environ.get("LAFORMER_NO_KERNELS"):
        return None
    try:
        return ctypes.CDLL(str(build(source, flags)))
    except OSError as exc:
        warnings.warn(f"laformer: {source.name} unavailable ({exc}); {what} uses the slower PyTorch path",
                      stacklevel=3)
        return None
