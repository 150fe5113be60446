"""Real `jetmoe serve` processes on localhost, over a tiny random checkpoint built for the session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generation"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import API_KEY, MODEL, Server
from toy_checkpoint import build_toy_checkpoint


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_toy_checkpoint(tmp_path_factory.mktemp("serving") / MODEL)


@pytest.fixture(scope="module")
def server(model_dir):
    """Four slots, a context of 4096 tokens, max_tokens up to 4000."""
    srv = Server(model_dir, "--max-batch", "4", "--max-len", "4096", "--max-tokens-limit", "4000")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tight_server(model_dir):
    """One slot, one queue place, four seconds of patience: every limit is easy to reach."""
    srv = Server(
        model_dir,
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--queue-timeout",
        "4",
        "--max-len",
        "30000",
        "--max-tokens-limit",
        "29000",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def guarded_server(model_dir):
    """An API key (from the environment), small request limits and short timeouts."""
    srv = Server(
        model_dir,
        "--max-len",
        "4096",
        "--max-request-bytes",
        "65536",
        "--body-timeout",
        "1",
        "--max-connections",
        "6",
        env={"JETMOE_API_KEY": API_KEY},
        api_key=API_KEY,
    )
    yield srv
    srv.stop()
