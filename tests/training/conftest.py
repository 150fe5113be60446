"""Fixtures for the training tests (helpers live in train_helpers.py)."""

from __future__ import annotations

import pytest
from train_helpers import write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> str:
    """One token cache for the session: the BPE and token files are built once and reused, as in real use."""
    return str(tmp_path_factory.mktemp("token-cache"))
