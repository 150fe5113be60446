"""Fixtures: a tiny random JetMoE checkpoint with a locally trained tokenizer (see toy_checkpoint.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from toy_checkpoint import build_toy_checkpoint, load_toy


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    return build_toy_checkpoint(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="session")
def toy_tokenizer(toy_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_dir)


@pytest.fixture(scope="session")
def toy_model(toy_dir):
    return load_toy(toy_dir)
