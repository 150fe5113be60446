"""The machine's limits, measured: matmul peak (FLOP/s) per dtype and memory bandwidth (bytes/s)."""

from __future__ import annotations

import os
import platform
import subprocess
import time

import torch

from jetmoe import cpu_memory
from jetmoe.environment import bf16_arithmetic

# Nominal dense bf16 tensor-core peak of the GPUs this project is lent (H100 SXM and H200 share it).
NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device: torch.device, repeats: int, inner: int) -> float:
    """Best (not median: a limit is what the machine can reach) time of one call, over `repeats` timings
    of `inner` back-to-back calls each. The first call is a warm-up (oneDNN / cuBLAS pick kernels then)."""
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def matmul_peak(dtype: torch.dtype, device: torch.device, quick: bool = False) -> dict:
    """FLOP/s of square torch.matmul, the best over a few sizes (2*n^3 FLOPs each)."""
    if quick:
        sizes, repeats, inner = [256], 2, 2
    elif device.type == "cuda":
        sizes, repeats, inner = [4096, 8192], 5, 20
    elif dtype == torch.bfloat16 and not bf16_arithmetic():  # emulated bf16: far slower, one smaller size does
        sizes, repeats, inner = [1024], 3, 1
    else:
        sizes, repeats, inner = [2048, 4096], 5, 1
    best = {"flops_per_s": 0.0, "n": 0}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds = _best_seconds(lambda: torch.matmul(a, b), device, repeats, inner)
        rate = 2 * n**3 / seconds
        if rate > best["flops_per_s"]:
            best = {"flops_per_s": rate, "n": n}
        del a, b
    return best


def memory_bandwidth(device: torch.device, quick: bool = False) -> dict:
    """Bytes/s of (a) a tensor copy, counting the read and the write, and (b) a sum, which only reads.

    Buffers are far larger than the last-level cache, so this is main memory. On CPU each is measured on
    ordinary heap memory and on huge-page memory (jetmoe.cpu_memory, where the models' weights live): heap
    pages may be physically scattered, and a matrix-vector product read them up to 2.7x slower. The roofline
    uses the highest figure (conservative: a higher bandwidth means a higher roofline and a lower fraction).
    """
    if quick:
        size_bytes, repeats = 32 * 2**20, 2
    elif device.type == "cuda":
        size_bytes, repeats = 4 * 2**30, 10
    else:
        size_bytes, repeats = 2 * 2**30, 5
    return BandwidthProbe(device, size_bytes, repeats, keep_buffers=False).measure()


class BandwidthProbe:
    """memory_bandwidth's figures, to be measured again next to each timed run of a benchmark: a shared VM's
    bandwidth moves with its neighbours within minutes, so a roofline fraction is fairest against the bandwidth
    measured around the run it judges. With `keep_buffers` the buffers are allocated once (measuring again
    then costs only the copies and sums)."""

    def __init__(self, device: torch.device, size_bytes: int = 512 * 2**20, repeats: int = 3,
                 keep_buffers: bool = True):  # fmt: skip
        self.device, self.size_bytes, self.repeats = device, size_bytes, repeats
        numel = size_bytes // 4
        self.placements = {"heap": lambda: torch.empty(numel, dtype=torch.float32, device=device)}
        if device.type == "cpu" and cpu_memory.huge_pages_supported():
            self.placements["huge pages"] = lambda: cpu_memory.huge_page_empty((numel,), torch.float32)
        self.buffers = {name: self._buffers(name) for name in self.placements} if keep_buffers else None

    def _buffers(self, placement: str) -> tuple[torch.Tensor, torch.Tensor]:
        allocate = self.placements[placement]
        return allocate().fill_(1.0), allocate().fill_(0.0)

    def measure(self) -> dict:
        """{"bytes_per_s": the highest figure, placement: {"copy_bytes_per_s", "read_bytes_per_s"}, ...}"""
        result = {"buffer_bytes": self.size_bytes}
        for name in self.placements:
            src, dst = self.buffers[name] if self.buffers is not None else self._buffers(name)
            copy_s = _best_seconds(lambda: dst.copy_(src), self.device, self.repeats, 1)
            sum_s = _best_seconds(lambda: src.sum(), self.device, self.repeats, 1)
            del src, dst
            result[name] = {"copy_bytes_per_s": 2 * self.size_bytes / copy_s,
                            "read_bytes_per_s": self.size_bytes / sum_s}  # fmt: skip
        result["bytes_per_s"] = max(bw for name in self.placements for bw in result[name].values())
        first = result[next(iter(self.placements))]  # the keys earlier callers read: the heap buffers' figures
        result["copy_bytes_per_s"], result["read_bytes_per_s"] = first["copy_bytes_per_s"], first["read_bytes_per_s"]
        return result


def _lscpu() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _git_revision() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "src"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" (src/ has uncommitted changes)" if dirty else "")


def describe(device: torch.device) -> dict:
    """What the results were measured on, as name -> text."""
    import transformers

    cpu = _lscpu()
    cores = cpu.get("Core(s) per socket", "?").strip()
    sockets = cpu.get("Socket(s)", "1").strip()
    try:
        physical = str(int(cores) * int(sockets))
    except ValueError:
        physical = "?"
    info = {
        "CPU": cpu.get("Model name", platform.processor() or "unknown").strip(),
        "cores": f"{physical} physical, {os.cpu_count()} logical, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "jetmoe revision": _git_revision(),
    }
    if device.type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(device)
        info["CUDA"] = str(torch.version.cuda)
    return info


def nominal_bf16_peak(device: torch.device) -> float | None:
    """The vendor's dense bf16 peak for known GPUs, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in NOMINAL_BF16_PEAK.items() if key in name), None)
