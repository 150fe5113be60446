"""What this machine gives jetmoe: the CPU's instruction sets, PyTorch's kernels, jetmoe's C kernel level.

`jetmoe env` prints it (as `python -m torch.utils.collect_env` does for PyTorch); `warn_if_bf16_emulated` tells
a user once when bf16 arithmetic would run emulated.
"""

from __future__ import annotations

import platform
import sys
import warnings

import torch

from .ops.native import build
from .ops.native.build import bf16_arithmetic  # noqa: F401 - part of this module's interface

_warned = False


def warn_if_bf16_emulated(dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
    """One warning per process when a bf16 model is about to run on a CPU without bf16 arithmetic."""
    global _warned
    if _warned or dtype != torch.bfloat16 or torch.device(device).type != "cpu" or bf16_arithmetic():
        return
    _warned = True
    warnings.warn(
        "jetmoe: this CPU has no bf16 arithmetic, so bf16 training runs emulated and slower than fp32 (train "
        "without --bf16); bf16 inference stays fast: prompts are multiplied in fp32 and decoding reads bf16 weights",
        stacklevel=3,
    )


def report() -> dict[str, str]:
    """The facts `jetmoe env` prints."""
    from . import ops
    from .modeling.backends import selected_backend

    native = ops.native
    kernel_level = native.level()
    if kernel_level is None:
        kernel_level = "off (JETMOE_NATIVE_KERNELS=0, no C compiler, or a failed build: see the warning)"
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "torch CPU capability": torch.backends.cpu.get_cpu_capability(),
        "bf16 arithmetic": "yes" if bf16_arithmetic() else "no (emulated: fp32 is faster for training; bf16 prompts are multiplied in fp32)",
        "jetmoe kernel levels this CPU runs": ", ".join(build.supported_levels()),
        "jetmoe kernel level in use": kernel_level,
        "C compiler": build.compiler() or "none",
        "kernel cache": str(build.cache_dir() / "native"),
        "CUDA": torch.version.cuda if torch.cuda.is_available() else "not available",
        "jetmoe backend for cpu tensors": selected_backend("cpu"),
    } | ({"jetmoe backend for cuda tensors": selected_backend("cuda")} if torch.cuda.is_available() else {})


def register(subparsers) -> None:
    parser = subparsers.add_parser("env", help="show the CPU, PyTorch and jetmoe kernel paths this machine uses")
    parser.set_defaults(run=_run)


def _run(args) -> int:
    facts = report()
    width = max(map(len, facts))
    for name, value in facts.items():
        print(f"{name:<{width}}  {value}")
    return 0
