"""Two process-wide CPU settings that an MoE model needs and PyTorch's defaults get wrong.

1. Freed memory goes back to the kernel (glibc). glibc serves every allocation above its mmap threshold
   (at most 32 MiB) with a fresh `mmap` and unmaps it when freed, so each large tensor a step creates (expert
   activations, gradients, logits) starts as untouched pages the kernel must fault in and zero, 4 KiB at a
   time, several times slower than filling reused memory (docs/performance.md). `retain_freed_memory()`
   makes glibc serve everything from its heap (`M_MMAP_MAX = 0`) and never trim it (`M_TRIM_THRESHOLD`): the
   process then keeps its peak heap, the trade jemalloc and tcmalloc make too. (A 2 GiB trim threshold was not enough:
   a reference model's training step freed more than that at once, and ours then faulted it back in.)

2. oneDNN keeps 1024 compiled matmul kernels, one per shape. An expert's row count changes with every routing
   decision, and a new shape costs a JIT compilation (ops/grouped_matmul.py buckets row counts to keep the set
   small). Once more shapes than the cache holds are in play (a training run with prefill and decode, or two
   models in one process), kernels are evicted and compiled again (docs/performance.md).
   `enlarge_kernel_cache()` raises the capacity to 8192 through `ONEDNN_PRIMITIVE_CACHE_CAPACITY`, which
   oneDNN reads when it builds its first kernel, so it must run before the first bf16 matmul; a value the
   user set is kept.

Both are process-wide, so importing jetmoe changes nothing: the `jetmoe` command line applies them (unless
`JETMOE_CPU_DEFAULTS=0`), and programs opt in with `apply_cpu_defaults()` at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = -1  # glibc stores the threshold as a size_t: -1 becomes SIZE_MAX, i.e. never
KERNEL_CACHE_CAPACITY = 8192
ENV_SWITCH = "JETMOE_CPU_DEFAULTS"

_retained = False


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it: other C libraries have no such mallopt knobs
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def retain_freed_memory() -> bool:
    """Make freed memory stay in the process for reuse. Returns whether it is in effect (glibc on Linux)."""
    global _retained
    if not _retained:
        libc = _glibc()
        _retained = libc is not None and bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
        )
    return _retained


def release_free_memory() -> bool:
    """Hand the heap's free memory back to the kernel now (glibc's `malloc_trim`), once, after a phase that freed
    a lot that the process will not need again, such as loading a model: with `retain_freed_memory` in effect
    nothing is returned otherwise. Quantising jetmoe-8b on load left 2.9 GB of freed temporaries on the heap.
    Returns whether it ran (glibc only)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    libc.malloc_trim(0)
    return True


def enlarge_kernel_cache(capacity: int = KERNEL_CACHE_CAPACITY) -> int:
    """Ask oneDNN to keep `capacity` compiled kernels (unless the environment sets it); returns the setting."""
    return int(os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity)))


def apply_cpu_defaults() -> bool:
    """Both settings, unless JETMOE_CPU_DEFAULTS is 0 / false / no / off. Returns whether they were applied."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    enlarge_kernel_cache()
    return retain_freed_memory()
