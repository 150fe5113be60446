"""The engine's decoding step with jetmoe's C kernels from two revisions, swapped back and forth in one process.

    python benchmarks/kernels_ab.py BEFORE AFTER [--config small] [--batch 1] [--dtype bf16] [--rounds 16] [--steps 20]

BEFORE and AFTER are git revisions (or a directory holding gemv.c, elementwise.c, decode.c and simd.h). Each one's
kernel sources are compiled at the instruction-set level this process picks (JETMOE_CPU_ISA forces one; hold
PyTorch to AVX2 with ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS, as `make bench-avx2`
does). One random-init checkpoint (--config, "small" by default), one engine; after a warm-up of both, blocks of --steps decode steps
alternate between the two libraries (the order flips every round). The Python side, the weights and the cache
are the same objects throughout, so the ratio isolates the kernels from a shared machine's drifting bandwidth,
which moves both sides of a round alike.
Reports the median milliseconds per step of each, the part spent in the C call of the layers, and the median of
the per-round ratios (BEFORE / AFTER: above 1 means AFTER is faster).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from inference_common import add_alternation_arguments, alternation_engine

ROOT = Path(__file__).resolve().parent.parent
FILES = ("gemv.c", "elementwise.c", "decode.c", "simd.h")


def sources(revision: str, into: Path) -> Path:
    """The kernel sources of a git revision (or a directory of them) copied into `into`."""
    into.mkdir(parents=True)
    given = Path(revision)
    for name in FILES:
        if given.is_dir():
            text = (given / name).read_text()
        else:
            shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:src/jetmoe/ops/native/{name}"],
                                   capture_output=True, text=True)  # fmt: skip
            if shown.returncode != 0:
                raise SystemExit(f"{revision!r} is neither a directory of the kernel sources nor a git revision "
                                 f"that has them: {shown.stderr.strip()}")  # fmt: skip
            text = shown.stdout
        (into / name).write_text(text)
    return into


def build(directory: Path, level: str) -> ctypes.CDLL:
    from jetmoe.ops.native import build as native_build

    target = directory / "kernels.so"
    command = [native_build.compiler(), *native_build._BASE_FLAGS, *native_build.LEVEL_FLAGS[level],
               *(str(directory / name) for name in FILES[:3]), "-o", str(target), "-lm"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    library = ctypes.CDLL(str(target))
    native_build._bind(library)
    return library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    add_alternation_arguments(parser, rounds=16, steps=20)
    args = parser.parse_args()

    from jetmoe.cpu_runtime import apply_cpu_defaults
    from jetmoe.ops import native
    from jetmoe.ops.native import build as native_build
    from jetmoe.ops.native import gemv as native_gemv

    apply_cpu_defaults()
    if native.load() is None:
        raise SystemExit("jetmoe's C kernels do not run here (see `jetmoe env`)")
    level = native.level()
    call_seconds: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        libraries = {}
        for name, revision in (("before", args.before), ("after", args.after)):
            library = build(sources(revision, Path(tmp) / name), level)
            layers_call = library.jetmoe_decode_layers

            def timed(*call_args, _call=layers_call):
                start = time.perf_counter()
                status = _call(*call_args)
                call_seconds.append(time.perf_counter() - start)
                return status

            library.jetmoe_decode_layers = timed
            libraries[name] = library

    current = {"library": libraries["before"]}

    def use(name: str) -> None:  # every module that calls load() reads the library through one of these names
        current["library"] = libraries[name]

    def swapped_load():
        return current["library"]

    native.load = native_gemv.load = native_build.load = swapped_load

    _, engine = alternation_engine(args)
    for name in libraries:
        use(name)
        for _ in range(10):
            engine.step()
    times = {name: [] for name in libraries}
    in_call = {name: [] for name in libraries}
    for round_ in range(args.rounds):
        for name in list(libraries) if round_ % 2 == 0 else list(libraries)[::-1]:
            use(name)
            engine.step()  # the first step after a switch is not timed
            call_seconds.clear()
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
            in_call[name].append(sum(call_seconds) / args.steps * 1e3)
    print(f"{args.config} {args.dtype} batch {args.batch}, kernels at {level}, torch level "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.rounds} rounds of {args.steps} steps")  # fmt: skip
    for name, revision in (("before", args.before), ("after", args.after)):
        print(f"  {name} ({revision}): {statistics.median(times[name]):.2f} ms a step, "
              f"{statistics.median(in_call[name]):.2f} ms of it in the layers' C call")  # fmt: skip
    ratios = [b / a for b, a in zip(times["before"], times["after"])]
    print(f"  before / after, median of the rounds: {statistics.median(ratios):.3f} "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
