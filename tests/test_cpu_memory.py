"""jetmoe.cpu_memory: large CPU tensors on memory advised for transparent huge pages."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from jetmoe import cpu_memory

linux_only = pytest.mark.skipif(not cpu_memory.huge_pages_supported(), reason="MADV_HUGEPAGE is Linux-only")


def _mapping_of(address: int) -> tuple[str, list[str]] | None:
    """(address range, VmFlags) of the /proc/self/smaps entry holding `address`, or None."""
    with open("/proc/self/smaps") as smaps:
        current = None
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                current = head if low <= address < high else None
            elif current and line.startswith("VmFlags:"):
                return current, line.split()[1:]
    return None


@linux_only
def test_huge_page_empty_is_aligned_advised_and_freed_with_its_last_view():
    tensor = cpu_memory.huge_page_empty((3 << 20,), torch.float32)  # 12 MiB
    assert tensor.shape == (3 << 20,) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert tensor.data_ptr() % cpu_memory.HUGE_PAGE_BYTES == 0
    tensor.fill_(1.5)
    assert tensor.sum().item() == 1.5 * (3 << 20)
    mapping = _mapping_of(tensor.data_ptr())
    assert mapping is not None and "hg" in mapping[1], mapping  # hg: MADV_HUGEPAGE
    assert cpu_memory.on_huge_pages(tensor)
    view = tensor[10:20]
    del tensor
    gc.collect()
    assert _mapping_of(view.data_ptr()) is not None and view.sum().item() == 15.0  # a view keeps it alive
    address = view.data_ptr()
    del view
    gc.collect()
    found = _mapping_of(address)
    assert found is None or "hg" not in found[1]  # unmapped (the range may since hold something else)


@linux_only
def test_a_small_tensor_leaves_its_last_block_on_ordinary_pages():
    tensor = cpu_memory.huge_page_empty((1000,), torch.bfloat16)
    assert tensor.data_ptr() % cpu_memory.HUGE_PAGE_BYTES == 0
    tensor.zero_()
    assert _mapping_of(tensor.data_ptr()) is not None
    assert "hg" not in _mapping_of(tensor.data_ptr())[1]  # under 2 MiB: nothing advised, nothing wasted


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1024, 1024)  # 4 MiB in fp32
        self.head = nn.Linear(1024, 1024, bias=False)
        self.head.weight = self.embed.weight
        self.small = nn.Parameter(torch.randn(100))
        self.register_buffer("table", torch.randn(600, 1024))  # 2.3 MiB


@linux_only
def test_place_on_huge_pages_moves_large_tensors_keeps_values_and_ties():
    module = _Tied()
    before = {name: t.clone() for name, t in module.state_dict().items()}
    # A misaligned small tensor (as a view of a mapped file would be) gets an aligned copy.
    module.small.data = torch.randn(101)[1:]
    before["small"] = module.small.detach().clone()
    assert module.small.data_ptr() % 64
    moved = cpu_memory.place_on_huge_pages(module)
    assert moved == (1024 * 1024 + 600 * 1024) * 4  # the tied weight once, and the buffer
    assert module.head.weight is module.embed.weight
    assert cpu_memory.on_huge_pages(module.embed.weight) and cpu_memory.on_huge_pages(module.table)
    assert not cpu_memory.on_huge_pages(module.small) and module.small.data_ptr() % 64 == 0
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert cpu_memory.place_on_huge_pages(module) == 0  # already there: nothing moves again
    # Still an ordinary module: trains, saves.
    loss = module.head(module.embed(torch.tensor([[1, 2]]))).square().sum()
    loss.backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert cpu_memory.on_huge_pages(module.embed.weight)


def test_without_huge_pages_only_alignment_is_fixed(monkeypatch):
    monkeypatch.setattr(cpu_memory, "huge_pages_supported", lambda: False)
    module = _Tied()
    module.small.data = torch.randn(101)[1:]
    assert cpu_memory.place_on_huge_pages(module) == 0
    assert module.small.data_ptr() % 64 == 0
    assert not cpu_memory.on_huge_pages(module.embed.weight)
    with pytest.raises(OSError, match="Linux"):
        cpu_memory.huge_page_empty((4,), torch.float32)


def test_private_copy_converts_and_owns_its_memory():
    source = torch.randn(2048, 600)  # 2.3 MiB in bf16
    copy = cpu_memory.private_copy(source, torch.bfloat16)
    assert copy.dtype == torch.bfloat16 and torch.equal(copy, source.to(torch.bfloat16))
    assert copy.data_ptr() != source.data_ptr() and copy.data_ptr() % 64 == 0
    assert cpu_memory.on_huge_pages(copy) == cpu_memory.huge_pages_supported()
    small = cpu_memory.private_copy(source[:3, 1:])  # a strided view: a contiguous copy
    assert small.is_contiguous() and torch.equal(small, source[:3, 1:]) and not cpu_memory.on_huge_pages(small)


def test_zeros_reads_as_zeros_on_huge_pages_when_large():
    large = cpu_memory.zeros((4, 1 << 18), torch.bfloat16)  # 2 MiB
    assert large.shape == (4, 1 << 18) and large.dtype == torch.bfloat16
    assert not large.any()
    assert cpu_memory.on_huge_pages(large) == cpu_memory.huge_pages_supported()
    large[1, 5] = 3.0
    assert large.sum().item() == 3.0
    small = cpu_memory.zeros((3, 5), torch.float32)
    assert torch.equal(small, torch.zeros(3, 5)) and not cpu_memory.on_huge_pages(small)
