"""jetmoe's C kernels for the CPU, compiled on first use for the CPU's instruction-set level.

PyTorch has no kernel for what these do fast: matrix-vector products for decoding (gemv.c), fused element-wise
steps of a layer (elementwise.c) and a whole decoding step of a layer (decode.c), all written once in simd.h's
vectors. The modules here, one job each:

    build.py        compiling, caching and loading the library for one instruction-set level
    signatures.py   the C functions' signatures, declared once
    gemv.py         matrix-vector products and their torch operators
    elementwise.py  the element-wise kernels
    decode.py       the decoding-step kernels

`load()` returns None where the kernels cannot run (no compiler, `JETMOE_NATIVE_KERNELS=0`, a failed build), and
callers use their PyTorch path.
"""

from __future__ import annotations

from .build import LEVELS, cache_dir, chosen_level, load, supported_levels
from .gemv import (
    DTYPE_CODES,
    available,
    ends_groups,
    gemv,
    gemv_combine,
    gemv_ok,
    gemv_silu_mul,
    int8_gemv,
    int8_ok,
    slot_groups,
)


def level() -> str | None:
    """The instruction-set level of the loaded kernels, or None where they do not run."""
    library = load()
    return library.jetmoe_level().decode() if library is not None else None


__all__ = [
    "DTYPE_CODES",
    "LEVELS",
    "available",
    "cache_dir",
    "chosen_level",
    "ends_groups",
    "gemv",
    "gemv_combine",
    "gemv_ok",
    "gemv_silu_mul",
    "int8_gemv",
    "int8_ok",
    "level",
    "load",
    "slot_groups",
    "supported_levels",
]
