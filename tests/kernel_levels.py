"""Run the kernel tests again at every instruction-set level this CPU runs below its best (the main run's), and
with the C kernels switched off, so that no level goes untested whichever machine runs the suite.

    python tests/kernel_levels.py [pytest arguments]      (make test runs it after the whole suite)

avx2 runs with PyTorch, oneDNN and MKL held to AVX2 too, as on an AVX2-only CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

from jetmoe.ops.native import build

AVX2_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def runs() -> list[tuple[str, dict[str, str]]]:
    levels = build.supported_levels()[:-1] if build.compiler() else ()
    plans = [(level, {"JETMOE_CPU_ISA": level, **(AVX2_CPU if level == "avx2" else {})}) for level in levels]
    return [*plans, ("PyTorch paths", {"JETMOE_NATIVE_KERNELS": "0"})]


def main(arguments: list[str]) -> int:
    failed = []
    for name, variables in runs():
        print(f"\n=== kernel tests: {name} ({' '.join(f'{k}={v}' for k, v in variables.items())})", flush=True)
        result = subprocess.run([sys.executable, "-m", "pytest", *arguments], env={**os.environ, **variables})
        if result.returncode != 0:
            failed.append(name)
    if failed:
        print(f"kernel tests failed at: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
