"""Small native kernels built with the system compiler at first use and cached by content hash.

Plain C sources called through ctypes need only ``gcc`` or ``cc`` and build in about a second; a C++ source
built against torch's headers (a PyTorch operator) needs ``g++`` and takes ~10 s, once. The library lands in
``$LAFORMER_CACHE/kernels`` (default ``~/.cache/laformer``) under a name derived from the sources, the compiler
(its path and ``--version`` output) and the flags, so an edited source, an upgraded compiler or another flag set
never loads a stale build. A build that outlives ``$LAFORMER_BUILD_TIMEOUT`` seconds (default 300) is stopped.

Each library exports an ABI version (``int <prefix>_abi_version(void)``) and the layout of the structs its
functions take (``<prefix>_layout``, see ``quantization/abi.h``); ``check_abi`` compares both with the ctypes side,
so a mismatched pair is refused with an ``ABIMismatchError`` instead of run.
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

from laformer.errors import LaFormerError

DEFAULT_BUILD_TIMEOUT = 300.0


class KernelError(LaFormerError, OSError):
    """A native kernel cannot be built (callers fall back to PyTorch)."""


class ABIMismatchError(KernelError):
    """A built kernel does not match the Python code that calls it: never called, never silently replaced."""


def cache_dir() -> Path:
    root = os.environ.get("LAFORMER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "laformer"
    )
    return Path(root) / "kernels"


def kernels_disabled() -> bool:
    """True when ``LAFORMER_NO_KERNELS`` is set (non-empty): every native kernel is skipped."""
    return bool(os.environ.get("LAFORMER_NO_KERNELS"))


def has_avx2() -> bool:
    """x86-64 with AVX2 and FMA, so ``-mavx2 -mfma`` code runs here."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build_timeout() -> float:
    value = os.environ.get("LAFORMER_BUILD_TIMEOUT", "")
    try:
        return float(value) if value else DEFAULT_BUILD_TIMEOUT
    except ValueError:
        raise KernelError(f"LAFORMER_BUILD_TIMEOUT={value!r} is not a number of seconds; set it to e.g. 600") from None


@functools.cache
def compiler_version(compiler: str) -> str:
    """``compiler --version``'s output (once per process): part of the cache key, so an upgrade rebuilds."""
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"cannot run the compiler {compiler!r} ({exc}); install gcc or point CC/CXX at a "
                          "working compiler") from exc
    if result.returncode != 0:
        raise KernelError(f"`{compiler} --version` exited with status {result.returncode}; install gcc or point "
                          "CC/CXX at a working compiler")
    return result.stdout


def build(source: Path, flags: list[str], *, depends: tuple[Path, ...] = (), cxx: bool = False, tag: str = "",
          name: str | None = None) -> Path:
    """Compile ``source`` into a shared library (once per content) and return its path.

    ``depends`` are files ``source`` includes (part of the cache key), ``tag`` anything else the build depends on
    (a torch version), ``cxx`` selects the C++ compiler. Raises ``KernelError`` when no compiler works, the build
    fails or it outlives ``$LAFORMER_BUILD_TIMEOUT``.
    """
    env_var, names = ("CXX", ("g++", "c++")) if cxx else ("CC", ("gcc", "cc"))
    compiler = os.environ.get(env_var) or next(filter(None, map(shutil.which, names)), None)
    if compiler is None:
        raise KernelError(f"no compiler ({' or '.join(names)}) on PATH; install gcc or set {env_var}")
    identity = " ".join([compiler, *flags, tag]) + "\n" + compiler_version(compiler)
    key = b"".join(path.read_bytes() for path in (source, *depends)) + identity.encode()
    target = cache_dir() / f"{name or source.stem}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    timeout = build_timeout()
    # Build under a temporary name and rename: concurrent processes (test workers) never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        # The source before the flags: libraries named by -l must follow the objects that use them.
        subprocess.run([compiler, str(source), *flags, "-shared", "-fPIC", "-o", tmp], check=True,
                       capture_output=True, text=True, timeout=timeout)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as exc:
        raise KernelError(f"{compiler} failed on {source.name}: {exc.stderr.strip()[-500:]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise KernelError(f"{compiler} did not finish building {source.name} within {timeout:g} s; set "
                          "LAFORMER_BUILD_TIMEOUT to a longer time in seconds, or LAFORMER_NO_KERNELS=1 to use the "
                          "PyTorch path") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def layout(structs: tuple[type[ctypes.Structure], ...]) -> str:
    """The ctypes mirror's layout in the C side's format (``quantization/abi.h``): each struct's size, then each
    field's name and offset. A struct named ``_Linear`` here stands for ``Linear`` there."""
    parts = []
    for struct in structs:
        parts.append(f"{struct.__name__.lstrip('_')}:{ctypes.sizeof(struct)}")
        parts += [f".{field[0]}@{getattr(struct, field[0]).offset}" for field in struct._fields_]
    return " ".join(parts)


def check_abi(library: ctypes.CDLL, source: str, prefix: str, expected: int,
              structs: tuple[type[ctypes.Structure], ...] = ()) -> None:
    """Refuse ``library`` unless ``<prefix>_abi_version()`` returns ``expected`` and ``<prefix>_layout`` describes
    ``structs`` exactly as ctypes lays them out: the C side's functions and structs are the ones the Python side
    declares, so no argument is ever read at the wrong place."""
    fix = f"reinstall laformer (or delete {cache_dir()}) so both come from the same version"
    try:
        version_fn = getattr(library, f"{prefix}_abi_version")
    except AttributeError:
        raise ABIMismatchError(f"{source} exports no {prefix}_abi_version(); {fix}") from None
    version_fn.restype, version_fn.argtypes = ctypes.c_int, []
    found = version_fn()
    if found != expected:
        raise ABIMismatchError(f"{source} has ABI version {found} but laformer expects {expected}: its C code and "
                               f"the Python that calls it are from different versions; {fix}")
    if not structs:
        return
    try:
        layout_fn = getattr(library, f"{prefix}_layout")
    except AttributeError:
        raise ABIMismatchError(f"{source} exports no {prefix}_layout(); {fix}") from None
    layout_fn.restype, layout_fn.argtypes = ctypes.c_int, [ctypes.c_char_p, ctypes.c_int]
    buffer = ctypes.create_string_buffer(4096)
    theirs, ours = buffer.value.decode() if layout_fn(buffer, len(buffer)) < len(buffer) else "?", layout(structs)
    if theirs != ours:
        raise ABIMismatchError(f"{source} lays out its structs as {theirs!r} but laformer's ctypes mirror is "
                               f"{ours!r}; {fix}")


def load(source: Path, flags: list[str], what: str, depends: tuple[Path, ...] = (),
         abi: tuple | None = None) -> ctypes.CDLL | None:
    """The built library, or None (with a warning naming ``what`` falls back) when it cannot be built or
    ``LAFORMER_NO_KERNELS`` is set. ``abi`` = (prefix, expected version[, structs]) for ``check_abi``: a mismatch
    raises ``ABIMismatchError`` rather than falling back, since it means the installed sources disagree."""
    if kernels_disabled():
        return None
    try:
        library = ctypes.CDLL(str(build(source, flags, depends=depends)))
    except OSError as exc:
        warnings.warn(f"laformer: {source.name} unavailable ({exc}); {what} uses the slower PyTorch path",
                      stacklevel=3)
        return None
    if abi is not None:
        check_abi(library, source.name, *abi)
    return library
