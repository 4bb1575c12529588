"""laformer.native: build caching, cache keys, the build timeout, ABI checks and the fallbacks without a compiler."""

from __future__ import annotations

import ctypes
import shutil
import stat
import textwrap

import pytest

from laformer import native
from laformer.errors import LaFormerError
from laformer.quantization import kernels

needs_cc = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler")

SOURCE = "int laformer_test_abi_version(void) { return ABI; }\nint add(int a, int b) { return a + b; }\n"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test builds into its own cache, with the default compiler and kernels enabled."""
    monkeypatch.setenv("LAFORMER_CACHE", str(tmp_path / "cache"))
    for name in ("CC", "CXX", "LAFORMER_NO_KERNELS", "LAFORMER_BUILD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "add.c"
    path.write_text(SOURCE)
    return path


def fake_compiler(tmp_path, body: str, name: str = "fakecc"):
    """An executable shell script standing in for the compiler."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@needs_cc
def test_build_is_cached_by_content_and_rebuilt_when_the_source_changes(source):
    first = native.build(source, ["-O1", "-DABI=1"])
    assert first.is_file() and first.parent == native.cache_dir()
    mtime = first.stat().st_mtime_ns
    assert native.build(source, ["-O1", "-DABI=1"]) == first and first.stat().st_mtime_ns == mtime
    assert ctypes.CDLL(str(first)).add(2, 3) == 5
    source.write_text(SOURCE + "int sub(int a, int b) { return a - b; }\n")
    second = native.build(source, ["-O1", "-DABI=1"])
    assert second != first and ctypes.CDLL(str(second)).sub(7, 3) == 4


@needs_cc
def test_cache_key_changes_with_flags_and_dependencies(source, tmp_path):
    header = tmp_path / "extra.h"
    header.write_text("/* v1 */\n")
    base = native.build(source, ["-O1", "-DABI=1"], depends=(header,))
    assert native.build(source, ["-O2", "-DABI=1"], depends=(header,)) != base
    header.write_text("/* v2 */\n")
    assert native.build(source, ["-O1", "-DABI=1"], depends=(header,)) != base


@needs_cc
def test_cache_key_changes_with_the_compiler_version(source, tmp_path, monkeypatch):
    """The same compiler path reporting another ``--version`` (an upgrade) builds anew."""
    real = shutil.which("gcc") or shutil.which("cc")
    version = tmp_path / "version.txt"
    version.write_text("fakecc 1.0\n")
    compiler = fake_compiler(tmp_path, f"""\
        if [ "$1" = "--version" ]; then cat {version}; exit 0; fi
        exec {real} "$@"
        """)
    monkeypatch.setenv("CC", compiler)
    old = native.build(source, ["-DABI=1"])
    native.compiler_version.cache_clear()
    assert native.build(source, ["-DABI=1"]) == old
    version.write_text("fakecc 2.0\n")
    assert native.build(source, ["-DABI=1"]) == old, "the version is read once per process"
    native.compiler_version.cache_clear()
    new = native.build(source, ["-DABI=1"])
    native.compiler_version.cache_clear()
    assert new != old and new.is_file()


def test_a_hanging_compiler_is_stopped_with_a_clear_error(source, tmp_path, monkeypatch):
    compiler = fake_compiler(tmp_path, """\
        if [ "$1" = "--version" ]; then echo slowcc; exit 0; fi
        exec sleep 30
        """)
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("LAFORMER_BUILD_TIMEOUT", "0.5")
    with pytest.raises(native.KernelError, match=r"did not finish building add\.c within 0\.5 s.*"
                                                 r"LAFORMER_BUILD_TIMEOUT.*LAFORMER_NO_KERNELS=1") as info:
        native.build(source, [])
    assert compiler in str(info.value) and isinstance(info.value, LaFormerError)
    assert not list(native.cache_dir().glob("*.so")), "no partial library is left in the cache"
    native.compiler_version.cache_clear()


def test_a_failing_compiler_names_itself_and_the_source(source, tmp_path, monkeypatch):
    compiler = fake_compiler(tmp_path, """\
        if [ "$1" = "--version" ]; then echo badcc; exit 0; fi
        echo "add.c:1: error: broken" >&2; exit 1
        """)
    monkeypatch.setenv("CC", compiler)
    with pytest.raises(native.KernelError, match=r"fakecc failed on add\.c: add\.c:1: error: broken"):
        native.build(source, [])
    native.compiler_version.cache_clear()


def test_cc_false_falls_back_with_a_warning(source, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.warns(UserWarning, match=r"add\.c unavailable \(.*false --version.*\); a test uses the slower"):
        assert native.load(source, ["-DABI=1"], "a test") is None
    native.compiler_version.cache_clear()


def test_no_kernels_skips_the_build_entirely(source, monkeypatch):
    monkeypatch.setenv("LAFORMER_NO_KERNELS", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")  # would warn if it were tried
    assert native.load(source, ["-DABI=1"], "a test") is None
    assert not native.cache_dir().exists()


@needs_cc
def test_load_checks_the_abi_version(source):
    library = native.load(source, ["-DABI=3"], "a test", abi=("laformer_test", 3))
    assert library.add(1, 1) == 2
    with pytest.raises(native.ABIMismatchError, match=r"add\.c has ABI version 3 but laformer expects 4"):
        native.load(source, ["-DABI=3"], "a test", abi=("laformer_test", 4))
    with pytest.raises(native.ABIMismatchError, match=r"add\.c exports no laformer_missing_abi_version\(\)"):
        native.load(source, ["-DABI=3"], "a test", abi=("laformer_missing", 3))


needs_kernels = pytest.mark.skipif(not native.has_avx2() or shutil.which("gcc") is None and shutil.which("cc") is None,
                                   reason="the quantized kernels need AVX2 and a C compiler")


def mirror(name: str, pointers: str, ints: str) -> type[ctypes.Structure]:
    """A ctypes struct standing for the C struct ``name``: pointer fields, then int64 ones."""
    return type(f"_{name}", (ctypes.Structure,), {"_fields_": [(n, ctypes.c_void_p) for n in pointers.split()] + [
        (n, ctypes.c_int64) for n in ints.split()]})


# qgemm.c's Qgemm with two int64 fields swapped (same size: only the offsets tell), int8_rows.c's RoundRows
# without its last field (another size).
SWAPPED_QGEMM = mirror("Qgemm", "x w scales mins y", "bits n m k g threads int8_activations")
SHORT_ROUND_ROWS = mirror("RoundRows", "x keep q q2 scales scales2 work", "m k")


@pytest.fixture
def fresh_kernels():
    """The kernels' loaders forget their libraries before and after (so a corrupted mirror is seen, then undone)."""
    for loader in (kernels._rows_library, kernels.ctypes_kernel):
        loader.cache_clear()
    yield
    for loader in (kernels._rows_library, kernels.ctypes_kernel):
        loader.cache_clear()


@needs_kernels
def test_the_shipped_kernels_match_their_ctypes_mirrors():
    library = ctypes.CDLL(str(native.build(kernels.SOURCE, kernels.CFLAGS, depends=(kernels.HEADER,))))
    assert native.check_abi(library, "qgemm.c", *kernels.QGEMM_ABI) is None
    assert "Qgemm:96 .x@0" in native.layout(kernels.QGEMM_ABI[2])


@needs_kernels
@pytest.mark.parametrize("name, corrupt, match", [
    ("QGEMM_ABI", lambda abi: (abi[0], abi[1] + 1, abi[2]), r"qgemm\.c has ABI version 2 but laformer expects 3"),
    ("QGEMM_ABI", lambda abi: (abi[0], abi[1], (SWAPPED_QGEMM,)), r"qgemm\.c lays out its structs as .*\.m@48.* but "
                                                                  r"laformer's ctypes mirror is .*\.m@56"),
    ("ROWS_ABI", lambda abi: (abi[0], abi[1] + 1, abi[2]), r"int8_rows\.c has ABI version 2 but laformer expects 3"),
    ("ROWS_ABI", lambda abi: (abi[0], abi[1], (SHORT_ROUND_ROWS, *abi[2][1:])), r"RoundRows:80 .* mirror is 'RoundRows:72"),
])
def test_quantized_kernels_refuse_a_library_of_another_abi(monkeypatch, fresh_kernels, name, corrupt, match):
    """A mirror that disagrees with the C code (version, size or an offset) is refused at load, never called."""
    monkeypatch.setattr(kernels, name, corrupt(getattr(kernels, name)))
    with pytest.raises(native.ABIMismatchError, match=match) as info:
        kernels.ctypes_kernel() if name == "QGEMM_ABI" else kernels.int8_rows_available()
    assert isinstance(info.value, LaFormerError) and "reinstall laformer" in str(info.value)
