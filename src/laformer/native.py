"""Small native kernels built with the system compiler at first use and cached by content hash.

Plain C sources called through ctypes need only ``gcc`` or ``cc`` and build in about a second; a C++ source
built against torch's headers (a PyTorch operator) needs ``g++`` and takes ~10 s, once. The library lands in
``$LAFORMER_CACHE/kernels`` (default ``~/.cache/laformer``) under a name derived from the sources, the compiler
and the flags, so an edited source or another flag set never loads a stale build.
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


def build(source: Path, flags: list[str], *, depends: tuple[Path, ...] = (), cxx: bool = False, tag: str = "",
          name: str | None = None) -> Path:
    """Compile ``source`` into a shared library (once per content) and return its path.

    ``depends`` are files ``source`` includes (part of the cache key), ``tag`` anything else the build depends on
    (a torch version), ``cxx`` selects the C++ compiler.
    """
    env_var, names = ("CXX", ("g++", "c++")) if cxx else ("CC", ("gcc", "cc"))
    compiler = os.environ.get(env_var) or next(filter(None, map(shutil.which, names)), None)
    if compiler is None:
        raise OSError(f"no compiler ({' or '.join(names)}) on PATH")
    key = b"".join(path.read_bytes() for path in (source, *depends)) + " ".join([compiler, *flags, tag]).encode()
    target = cache_dir() / f"{name or source.stem}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent processes (test workers) never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        # The source before the flags: libraries named by -l must follow the objects that use them.
        subprocess.run([compiler, str(source), *flags, "-shared", "-fPIC", "-o", tmp], check=True,
                       capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as exc:
        raise OSError(f"{compiler} failed: {exc.stderr.strip()[-500:]}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: Path, flags: list[str], what: str, depends: tuple[Path, ...] = ()) -> ctypes.CDLL | None:
    """The built library, or None (with a warning naming ``what`` falls back) when it cannot be built or
    ``LAFORMER_NO_KERNELS`` is set."""
    if os.environ.get("LAFORMER_NO_KERNELS"):
        return None
    try:
        return ctypes.CDLL(str(build(source, flags, depends=depends)))
    except OSError as exc:
        warnings.warn(f"laformer: {source.name} unavailable ({exc}); {what} uses the slower PyTorch path",
                      stacklevel=3)
        return None
