"""CPU kernels in C, compiled on first use with the system's C compiler and loaded with ctypes.

PyTorch has no kernel for what these do fast on x86-64 (see each source's header). The shared library is
built once per source, compiler and flags into a cache directory (`$JETMOE_CACHE_DIR`, else
`$XDG_CACHE_HOME/jetmoe`, else `~/.cache/jetmoe`) and written atomically, so concurrent processes never load a
half-written file. Where there is no compiler, the CPU lacks the instructions, or `JETMOE_NATIVE_KERNELS=0`,
`load()` returns None (with one warning when a build fails) and callers use their PyTorch path.
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

_SOURCE = Path(__file__).with_name("int8_gemv.c")
# Instruction sets the kernels use, as gcc/clang flags and as /proc/cpuinfo names.
_ISA_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mf16c")
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "f16c")
_CFLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", *_ISA_FLAGS)

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def cache_dir() -> Path:
    if os.environ.get("JETMOE_CACHE_DIR"):
        return Path(os.environ["JETMOE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jetmoe"


def _cpu_supported() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    present = set(flags.split(":", 1)[1].split())
    return all(flag in present for flag in _CPU_FLAGS)


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".partial")
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *_CFLAGS, str(_SOURCE), "-o", partial, "-lm"], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {_SOURCE.name}:\n{result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here."""
    if os.environ.get("JETMOE_NATIVE_KERNELS", "1") == "0" or not _cpu_supported():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\n".join([_SOURCE.read_text(), compiler, version, *_CFLAGS]).encode()).hexdigest()[:16]
        target = cache_dir() / "native" / f"int8_gemv-{key}.so"
        if not target.exists():
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"jetmoe: native CPU kernels unavailable, using PyTorch's ({error})", stacklevel=2)
        return None
    function = library.jetmoe_int8_gemv
    function.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    function.restype = ctypes.c_int
    return library


@torch.compiler.assume_constant_result  # under torch.compile, a constant of the trace (no build inside it)
def available() -> bool:
    return load() is not None


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, in] (fp32/bf16/fp16, few rows) @ (q [out, in] int8 * scale [out, 1]).T -> [M, out] in x's dtype.

    Needs `available()`, CPU tensors and `in` a multiple of 32. The activations are put on a 16-bit grid per
    row (see the kernel's source): results differ from the dequantised product by rounding only."""
    rows, cols = q.shape
    if cols % 32 or x.shape[-1] != cols or x.dim() != 2 or scale.shape != (rows,):
        raise ValueError(f"int8_gemv: x {tuple(x.shape)}, q {tuple(q.shape)}, scale {tuple(scale.shape)}")
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    out = torch.empty(x.shape[0], rows, dtype=x.dtype)
    status = load().jetmoe_int8_gemv(
        q.data_ptr(), scale.data_ptr(), DTYPE_CODES[scale.dtype], rows, cols,
        x.data_ptr(), DTYPE_CODES[x.dtype], x.shape[0], out.data_ptr(), DTYPE_CODES[out.dtype],
    )  # fmt: skip
    if status != 0:
        raise MemoryError("jetmoe_int8_gemv: out of memory for the quantised activations")
    return out
