"""Building and loading the C kernels: one source, compiled for one instruction-set level, chosen at run time.

The kernels (gemv.c, elementwise.c, decode.c, written once in simd.h's vectors) build with the system's C
compiler for the best level this CPU runs, or the level `JETMOE_CPU_ISA` names; PyTorch's own
`ATEN_CPU_CAPABILITY` caps it too, so emulating an older CPU moves both. Levels, lowest first:

    generic     plain C the compiler vectorises (aarch64 with NEON, any other CPU; on x86-64 without AVX2 and
                FMA it would not beat PyTorch, so it runs there only when JETMOE_CPU_ISA asks for it)
    avx2        x86-64 with AVX2, FMA and F16C
    avx512      + AVX-512 F/BW/VL/DQ
    avx512bf16  + AVX-512 VNNI and BF16 (bf16 and int16 dot-product instructions)

The library is cached per source, compiler, flags and level in a directory only this user can write
(`$JETMOE_CACHE_DIR`, else `$XDG_CACHE_HOME/jetmoe`, else `~/.cache/jetmoe`, then `native/`), next to a digest of
its bytes recorded at build time; a directory or file owned by someone else or writable by others, or bytes that
do not match their digest, are never loaded. Any failure gives one warning and `load()` returns None: callers
then run their PyTorch path. `JETMOE_NATIVE_KERNELS=0` switches the kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

from .signatures import SIGNATURES

try:
    import fcntl
except ImportError:  # not a POSIX system: builds are not serialised between processes
    fcntl = None

logger = logging.getLogger("jetmoe.native")

SOURCES = tuple(Path(__file__).with_name(name) for name in ("gemv.c", "elementwise.c", "decode.c"))
HEADERS = (Path(__file__).with_name("simd.h"),)
LEVELS = ("generic", "avx2", "avx512", "avx512bf16")
_BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-Wno-psabi")
_AVX2 = ("-mavx2", "-mfma", "-mf16c")
_AVX512 = (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
LEVEL_FLAGS = {"generic": (), "avx2": _AVX2, "avx512": _AVX512, "avx512bf16": (*_AVX512, "-mavx512vnni", "-mavx512bf16")}
# /proc/cpuinfo flags each x86-64 level needs.
_CPU_FLAGS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512bf16": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"},
}
# PyTorch's ATEN_CPU_CAPABILITY values, as the highest of our levels they allow.
_ATEN_CAP = {"default": "generic", "avx2": "avx2", "avx512": "avx512bf16"}


def cache_dir() -> Path:
    if os.environ.get("JETMOE_CACHE_DIR"):
        return Path(os.environ["JETMOE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jetmoe"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


# oneDNN instruction sets (ONEDNN_MAX_CPU_ISA) that multiply bf16 in hardware.
_ONEDNN_BF16_ISAS = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10")


def bf16_arithmetic() -> bool:
    """Whether bf16 is multiplied in hardware here (AVX-512 BF16 or AMX on x86-64, the bf16 extension on Arm, and
    oneDNN not held below them by ONEDNN_MAX_CPU_ISA); elsewhere bf16 matrix products are emulated and run
    slower than fp32's."""
    held = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if held and not held.startswith(_ONEDNN_BF16_ISAS):
        return False
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def supported_levels() -> tuple[str, ...]:
    """The levels this CPU runs, lowest first (x86-64 levels from /proc/cpuinfo; elsewhere generic only)."""
    if not _x86():
        return ("generic",)
    flags = _cpu_flags()
    return ("generic", *(level for level in LEVELS[1:] if _CPU_FLAGS[level] <= flags))


def chosen_level() -> str:
    """The level load() builds: JETMOE_CPU_ISA if this CPU runs it, else the best it runs (capped by
    ATEN_CPU_CAPABILITY)."""
    supported = supported_levels()
    forced = os.environ.get("JETMOE_CPU_ISA", "").strip().lower()
    if forced:
        if forced not in LEVELS:
            raise ValueError(f"JETMOE_CPU_ISA={forced!r}: expected one of {', '.join(LEVELS)}")
        if forced in supported:
            return forced
        warnings.warn(
            f"jetmoe: JETMOE_CPU_ISA={forced} needs instructions this CPU lacks; using {supported[-1]}", stacklevel=3
        )
        return supported[-1]
    cap = _ATEN_CAP.get(os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower(), LEVELS[-1])
    allowed = [level for level in supported if LEVELS.index(level) <= LEVELS.index(cap)]
    return allowed[-1]


def _private_dir(path: Path) -> bool:
    """Whether `path` is a real directory of this user that nobody else can write."""
    info = os.lstat(path)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def _private_file(path: Path) -> bool:
    info = os.lstat(path)
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def _build_dir() -> Path:
    """The cache's native/ directory, made private; a fresh private temporary directory where it cannot be."""
    directory = cache_dir() / "native"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if _private_dir(directory):
            return directory
        reason = "it is not a directory owned by this user, or others can write to it"
    except OSError as error:
        reason = str(error)
    fallback = Path(tempfile.mkdtemp(prefix="jetmoe-native-"))
    warnings.warn(f"jetmoe: not using the kernel cache {directory} ({reason}); building in {fallback}", stacklevel=4)
    return fallback


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def compile_library(compiler: str, level: str, target: Path) -> None:
    """Compile the sources for `level` into `target` (atomically) and record its digest beside it."""
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".partial")
    os.close(handle)
    try:
        command = [compiler, *_BASE_FLAGS, *LEVEL_FLAGS[level], *map(str, SOURCES), "-o", partial, "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            names = ", ".join(source.name for source in SOURCES)
            raise RuntimeError(f"{compiler} failed on {names} ({level}):\n{result.stderr.strip()[-2000:]}")
        os.chmod(partial, 0o700)
        digest = _digest(Path(partial))
        os.replace(partial, target)
        _atomic_write(target.with_suffix(".sha256"), digest.encode())
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _verified(target: Path) -> bool:
    """Whether the cached library is ours, private, and has the bytes recorded when it was built."""
    record = target.with_suffix(".sha256")
    try:
        return (
            _private_file(target)
            and _private_file(record)
            and record.read_text().strip() == _digest(target)
        )
    except OSError:
        return False


@contextlib.contextmanager
def _locked(directory: Path):
    """One process at a time checks and builds in `directory`."""
    with open(directory / ".lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _bind(library: ctypes.CDLL) -> None:
    for name, (restype, argtypes) in SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = restype, argtypes


def compiler() -> str | None:
    """The C compiler: $CC, else cc, else gcc."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def library_name(compiler: str, level: str) -> str:
    """The cached library's file name: one per source text, compiler, flags and level."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [source.read_text() for source in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\n".join([*texts, compiler, version, level, *_BASE_FLAGS]).encode()).hexdigest()[:16]
    return f"kernels-{level}-{key}.so"


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels for this CPU, or None where they cannot run here (with one warning on a failure)."""
    if os.environ.get("JETMOE_NATIVE_KERNELS", "1") == "0":
        return None
    cc = compiler()
    if cc is None:
        return None
    try:
        level = chosen_level()
        if level == "generic" and _x86() and not os.environ.get("JETMOE_CPU_ISA"):
            logger.debug("jetmoe native kernels: an x86-64 CPU without AVX2 and FMA runs PyTorch's paths")
            return None
        directory = _build_dir()
        target = directory / library_name(cc, level)
        with _locked(directory):
            if not _verified(target):
                if target.exists():
                    warnings.warn(f"jetmoe: {target} does not match its recorded digest or owner; rebuilding", stacklevel=2)
                compile_library(cc, level, target)
                if not _verified(target):
                    raise RuntimeError(f"{target} changed right after it was built")
        library = ctypes.CDLL(str(target))
        _bind(library)
        built = library.jetmoe_level().decode()
        if built != level:
            raise RuntimeError(f"{target} was built for {built}, not {level}")
    except (OSError, RuntimeError, ValueError, AttributeError, subprocess.SubprocessError) as error:
        warnings.warn(f"jetmoe: native CPU kernels unavailable, using PyTorch's ({error})", stacklevel=2)
        return None
    logger.debug("jetmoe native kernels: %s level from %s", level, target)
    return library
