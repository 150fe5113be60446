"""How fast can one token's weights be read on this CPU? Matrix-vector products over weights far beyond the caches.

    python benchmarks/gemv_bandwidth.py [--rows 32000 --cols 1024 --matrices 8]

Decoding at batch 1 multiplies each weight matrix the token touches by one vector, so its ceiling is the rate
at which a matrix-vector product streams weights. This times, on 64 distinct [2816, 1024] matrices by default
(an expert's input projection of the "small" config; 369 MB in bf16, so every call reads from memory):
- torch.mv and a one-row F.linear in bf16 (what decoding can call), the same in fp32;
- aten's int8 weight kernels (`_weight_int8pack_mm`, `_int_mm`);
- jetmoe's own C kernels (jetmoe.ops.native, at the best instruction-set level this CPU runs unless
  JETMOE_CPU_ISA says otherwise), bf16, fp32 and int8;
- 8 activation rows (a decoding batch): F.linear against jetmoe's kernel, bf16 and fp32.
The weights sit on huge-page memory where the platform has it, as a loaded model's do (jetmoe.cpu_memory).
Reports microseconds per product and GB/s of weights read. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from jetmoe import cpu_memory
from jetmoe.ops import native

ROWS, COLS, MATRICES, REPEATS = 2816, 1024, 64, 5


def placed(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor where a loaded model keeps its weights: on huge pages where the platform has them."""
    if not cpu_memory.huge_pages_supported():
        return tensor
    return cpu_memory.huge_page_empty(tuple(tensor.shape), tensor.dtype).copy_(tensor)


def per_call_seconds(calls) -> float:
    for call in calls:  # warm-up: every matrix once, every kernel built
        call()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for call in calls:
            call()
        times.append((time.perf_counter() - start) / len(calls))
    return statistics.median(times)


def main() -> None:
    global ROWS, COLS, MATRICES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--cols", type=int, default=COLS, help="a multiple of 32")
    parser.add_argument("--matrices", type=int, default=MATRICES, help="distinct weights cycled through")
    args = parser.parse_args()
    if args.cols % 32 or min(args.rows, args.cols, args.matrices) < 1:
        parser.error("--rows, --cols and --matrices must be positive, --cols a multiple of 32")
    ROWS, COLS, MATRICES = args.rows, args.cols, args.matrices
    torch.manual_seed(0)
    bf16 = [placed(torch.randn(ROWS, COLS, dtype=torch.bfloat16)) for _ in range(MATRICES)]
    vector = torch.randn(COLS, dtype=torch.bfloat16)
    rows = []

    def measure(name, calls, bytes_per_element):
        seconds = per_call_seconds(calls)
        rows.append((name, seconds * 1e6, ROWS * COLS * bytes_per_element / seconds / 1e9))

    measure("bf16 torch.mv", [lambda w=w: torch.mv(w, vector) for w in bf16], 2)
    measure("bf16 F.linear, one row", [lambda w=w: F.linear(vector[None], w) for w in bf16], 2)
    row = vector[None]
    if native.available():
        measure("bf16 jetmoe.ops.native", [lambda w=w: native.gemv(row, w) for w in bf16], 2)
        batch16 = torch.randn(8, COLS, dtype=torch.bfloat16)
        measure("bf16 F.linear, 8 rows", [lambda w=w: F.linear(batch16, w) for w in bf16], 2)
        measure("bf16 jetmoe.ops.native, 8 rows", [lambda w=w: native.gemv(batch16, w) for w in bf16], 2)
    else:
        print("(jetmoe's native kernels do not build here: no C compiler or no AVX-512 BF16/VNNI)")
    quantized = [(placed(torch.randint(-127, 128, (ROWS, COLS), dtype=torch.int8)), torch.rand(ROWS, dtype=torch.bfloat16)) for _ in range(MATRICES)]
    measure("int8 aten._weight_int8pack_mm", [lambda q=q, s=s: torch.ops.aten._weight_int8pack_mm(vector[None], q, s) for q, s in quantized], 1)
    if native.available():
        measure("int8 jetmoe.ops.native", [lambda q=q, s=s: native.int8_gemv(row, q, s) for q, s in quantized], 1)
    vector_int8 = torch.randint(-127, 128, (1, COLS), dtype=torch.int8)
    measure("int8 torch._int_mm (int8 activations)", [lambda q=q: torch._int_mm(vector_int8, q.t()) for q, _ in quantized], 1)
    del bf16, quantized
    fp32 = [placed(torch.randn(ROWS, COLS)) for _ in range(max(MATRICES // 2, 1))]
    vector32, batch32 = vector.float(), torch.randn(8, COLS)
    measure("fp32 torch.mv", [lambda w=w: torch.mv(w, vector32) for w in fp32], 4)
    measure("fp32 F.linear, one row", [lambda w=w: F.linear(vector32[None], w) for w in fp32], 4)
    measure("fp32 F.linear, 8 rows", [lambda w=w: F.linear(batch32, w) for w in fp32], 4)
    if native.available():
        measure("fp32 jetmoe.ops.native", [lambda w=w: native.gemv(vector32[None], w) for w in fp32], 4)
        measure("fp32 jetmoe.ops.native, 8 rows", [lambda w=w: native.gemv(batch32, w) for w in fp32], 4)

    print(f"\n{torch.get_num_threads()} threads, [{ROWS}, {COLS}] weights, median of {REPEATS} passes\n")
    print("| product | us per call | GB/s of weights |\n|---|---|---|")
    for name, micros, rate in rows:
        print(f"| {name} | {micros:.0f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
