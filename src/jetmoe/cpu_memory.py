"""Where a model's large CPU tensors live: private memory advised for transparent huge pages.

Decoding streams every weight a token uses from memory, so how fast a weight can be read decides the speed,
and that depends on where its pages landed in physical memory. A tensor allocated on the heap gets whatever
4 KiB pages the kernel has free: on a machine that has run for a while, scattered ones, which a model decodes
from measurably slower (docs/performance.md). Memory advised with MADV_HUGEPAGE is backed by 2 MiB pages
wherever the kernel allows it (`/sys/kernel/mm/transparent_hugepage/enabled` set to `madvise` or `always`):
contiguous in blocks of 2 MiB whatever the state of the machine, and 512 times fewer TLB entries.

`huge_page_empty` allocates such a tensor (an anonymous private mapping, started on a 2 MiB boundary and freed
when its last view goes); `place_on_huge_pages` gives a module's CPU parameters and buffers private copies one
at a time, the large ones there (elsewhere than Linux, ordinary memory).
"""

from __future__ import annotations

import bisect
import mmap
import sys

import torch
from torch import nn

HUGE_PAGE_BYTES = 2 << 20
# Below one huge page there is nothing to gain: such tensors get ordinary (64-byte aligned) private copies.
MIN_TENSOR_BYTES = HUGE_PAGE_BYTES


def huge_pages_supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")


def huge_page_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in a private anonymous mapping advised for huge pages, starting on a 2 MiB
    boundary. Its last 2 MiB block stays on ordinary pages unless the tensor fills it (nothing is wasted)."""
    if not huge_pages_supported():
        raise OSError("transparent huge pages are a Linux feature (madvise MADV_HUGEPAGE)")
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # the tensor's storage keeps the mapping alive
    start = -whole.data_ptr() % HUGE_PAGE_BYTES
    advised = nbytes // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if advised:
        mapping.madvise(mmap.MADV_HUGEPAGE, start, advised)
    return whole[start : start + nbytes].view(dtype).view(shape)


def zeros(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.zeros, on huge-page memory for a CPU tensor of at least MIN_TENSOR_BYTES where supported. A fresh
    anonymous mapping reads as zeros, so nothing is written: pages are only allocated when first touched."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type == "cpu" and nbytes >= MIN_TENSOR_BYTES and huge_pages_supported():
        return huge_page_empty(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


def private_copy(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous private copy of `tensor` (converted to `dtype`): on huge-page memory for a CPU tensor of
    at least MIN_TENSOR_BYTES where that is supported, else an ordinary (64-byte aligned) tensor."""
    dtype = dtype or tensor.dtype
    nbytes = tensor.numel() * torch.empty((), dtype=dtype).element_size()
    if tensor.device.type == "cpu" and nbytes >= MIN_TENSOR_BYTES and huge_pages_supported():
        return huge_page_empty(tensor.shape, dtype).copy_(tensor)
    return tensor.to(dtype, copy=True, memory_format=torch.contiguous_format)


def on_huge_pages(tensor: torch.Tensor) -> bool:
    """Whether `tensor` looks like one from `huge_page_empty`: a CPU tensor starting on a 2 MiB boundary in a
    fixed-size (mapped) storage."""
    return (
        tensor.device.type == "cpu"
        and tensor.data_ptr() % HUGE_PAGE_BYTES == 0
        and not tensor.untyped_storage().resizable()
    )


def available_memory_bytes() -> int | None:
    """The kernel's estimate of memory available without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def file_backed_bytes(module: nn.Module) -> int | None:
    """Bytes of the module's CPU tensors that are views of mapped files (a checkpoint read with mmap): what
    private copies of them would add to the process's memory. None where /proc/self/maps is unreadable."""
    try:
        with open("/proc/self/maps") as maps:
            ranges = []
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):  # inode, path
                    low, high = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((low, high))
    except OSError:
        return None
    ranges.sort()
    starts = [low for low, _ in ranges]
    total, seen = 0, set()
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "cpu" or not tensor.numel() or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        i = bisect.bisect_right(starts, tensor.data_ptr()) - 1
        if i >= 0 and tensor.data_ptr() < ranges[i][1]:
            total += tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def place_on_huge_pages(module: nn.Module) -> int:
    """Give every CPU parameter and buffer a private copy: on huge-page memory for those of at least
    MIN_TENSOR_BYTES (where supported), ordinary 64-byte aligned memory for the others. Tensors already on
    huge pages stay. Copying the small ones too lets go of a checkpoint's file mappings: a single small view
    would otherwise keep a whole mapped shard counted in the process's resident memory. Tied parameters stay
    tied: the Parameter objects are kept, only their data is replaced. The peak is the module plus one
    tensor. Returns the number of bytes moved to huge pages (0 where they are not supported)."""
    moved, seen = 0, set()
    big_ok = huge_pages_supported()
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "cpu" or not tensor.numel() or id(tensor) in seen or on_huge_pages(tensor):
            continue
        seen.add(id(tensor))
        tensor.data = private_copy(tensor.data)
        if big_ok and tensor.numel() * tensor.element_size() >= MIN_TENSOR_BYTES:
            moved += tensor.numel() * tensor.element_size()
    return moved
