"""How fast can one token's weights be read on this CPU? Matrix-vector products over weights far beyond the caches.

    python benchmarks/gemv_bandwidth.py

Decoding at batch 1 multiplies each weight matrix the token touches by one vector, so its ceiling is the rate
at which a matrix-vector product streams weights. This times, on 64 distinct [2816, 1024] matrices (an expert's
input projection of the "small" config; 369 MB in bf16, so every call reads from memory):
- torch.mv and a one-row F.linear in bf16 (what decoding can call), the same in fp32;
- aten's int8 weight kernels (`_weight_int8pack_mm`, `_int_mm`);
- a hand-written AVX512-BF16 kernel (`vdpbf16ps`, OpenMP over rows, built with torch.utils.cpp_extension when
  g++ and the instruction are there): the check that torch.mv is not leaving bandwidth on the table.
Reports microseconds per product and GB/s of weights read. Prints a markdown table.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

ROWS, COLS, MATRICES, REPEATS = 2816, 1024, 64, 5

_KERNEL = r"""
#include <torch/extension.h>
#include <immintrin.h>

// y[n] = sum_k W[n, k] * x[k]: W [N, K] bf16 row-major, K a multiple of 32; fp32 accumulation, bf16 result.
torch::Tensor bf16_gemv(torch::Tensor W, torch::Tensor x) {
  const int64_t N = W.size(0), K = W.size(1);
  auto y = torch::empty({N}, x.options());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
  const uint16_t* xv = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  uint16_t* out = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  #pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; n += 4) {
    const int64_t rows = std::min<int64_t>(4, N - n);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < K; k += 32) {
      __m512bh xk = (__m512bh)_mm512_loadu_si512(xv + k);
      for (int r = 0; r < rows; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k), xk);
    }
    for (int r = 0; r < rows; ++r) out[n + r] = c10::BFloat16(_mm512_reduce_add_ps(acc[r])).x;
  }
  return y;
}
"""


def _hand_written_kernel():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            if "avx512_bf16" not in cpuinfo.read():
                return None
        from torch.utils.cpp_extension import load_inline

        module = load_inline(
            "jetmoe_bench_bf16_gemv", cpp_sources=_KERNEL, functions=["bf16_gemv"],
            extra_cflags=["-O3", "-mavx512f", "-mavx512bf16", "-fopenmp"], extra_ldflags=["-fopenmp"],
        )  # fmt: skip
        return module.bf16_gemv
    except Exception as error:  # noqa: BLE001 - no compiler, no headers: the row is skipped, with the reason
        print(f"(hand-written kernel skipped: {type(error).__name__}: {str(error)[:200]})")
        return None


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
    torch.manual_seed(0)
    bf16 = [torch.randn(ROWS, COLS, dtype=torch.bfloat16) for _ in range(MATRICES)]
    vector = torch.randn(COLS, dtype=torch.bfloat16)
    rows = []

    def measure(name, calls, bytes_per_element):
        seconds = per_call_seconds(calls)
        rows.append((name, seconds * 1e6, ROWS * COLS * bytes_per_element / seconds / 1e9))

    measure("bf16 torch.mv", [lambda w=w: torch.mv(w, vector) for w in bf16], 2)
    measure("bf16 F.linear, one row", [lambda w=w: F.linear(vector[None], w) for w in bf16], 2)
    kernel = _hand_written_kernel()
    if kernel is not None:
        expected = torch.mv(bf16[0].float(), vector.float())
        error = (kernel(bf16[0], vector).float() - expected).abs().max().item()
        measure(f"bf16 hand-written AVX512-BF16 (max error {error:.3f})", [lambda w=w: kernel(w, vector) for w in bf16], 2)
    quantized = [(torch.randint(-127, 128, (ROWS, COLS), dtype=torch.int8), torch.rand(ROWS, dtype=torch.bfloat16)) for _ in range(MATRICES)]
    measure("int8 aten._weight_int8pack_mm", [lambda q=q, s=s: torch.ops.aten._weight_int8pack_mm(vector[None], q, s) for q, s in quantized], 1)
    vector_int8 = torch.randint(-127, 128, (1, COLS), dtype=torch.int8)
    measure("int8 torch._int_mm (int8 activations)", [lambda q=q: torch._int_mm(vector_int8, q.t()) for q, _ in quantized], 1)
    del bf16, quantized
    fp32 = [torch.randn(ROWS, COLS) for _ in range(MATRICES // 2)]
    measure("fp32 torch.mv", [lambda w=w: torch.mv(w, vector.float()) for w in fp32], 4)

    print(f"\n{torch.get_num_threads()} threads, [{ROWS}, {COLS}] weights, median of {REPEATS} passes\n")
    print("| product | us per call | GB/s of weights |\n|---|---|---|")
    for name, micros, rate in rows:
        print(f"| {name} | {micros:.0f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
