"""Shared fixtures. The helpers they use live in oracle_pair.py (importable from every test module)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # explicit, whatever pytest's import mode

from oracle_pair import ATTN_IMPLEMENTATIONS, TINY, WIDE  # noqa: E402

# The models here are tiny: intra-op threads only add contention (CI runs 2 workers on 2 cores, and a
# shared machine can make a multi-threaded tiny matmul 30x slower).
torch.set_num_threads(1)


@pytest.fixture(params=ATTN_IMPLEMENTATIONS)
def attn_implementation(request):
    """Both attention backends the reference supports on CPU."""
    return request.param


@pytest.fixture(params=["tiny", "wide"])
def geometry(request):
    """The issue's tiny config (E=4, k=2) and a wider one (E=6, k=3)."""
    return {"tiny": TINY, "wide": WIDE}[request.param]
