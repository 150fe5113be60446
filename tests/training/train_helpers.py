"""Helpers for the training tests: a small synthetic corpus, a micro model geometry, and a `jetmoe` runner.

Subprocess runs get OMP_NUM_THREADS=1: with a model this small, threads only add contention on a 2-core box.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import yaml

MICRO_MODEL = dict(
    vocab_size=300,
    hidden_size=32,
    num_hidden_layers=2,
    num_key_value_heads=2,
    kv_channels=8,
    intermediate_size=32,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=64,
)

WORDS = ("the quick brown fox jumps over lazy dog python module function class returns value list dict "
         "string number file path error raise import yield").split()


def write_corpus(path, lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(lines):
            handle.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + ".\n")
    return str(path)


def micro_settings(corpus: str, cache: str, **overrides) -> dict:
    settings = dict(
        preset="tiny",
        model=dict(MICRO_MODEL),
        data=[corpus],
        cache_dir=cache,
        seq_len=32,
        batch_size=2,
        max_steps=20,
        warmup_steps=2,
        lr=0.01,
        log_every=1,
        val_every=10,
        save_every=10,
        val_batches=2,
        progress=False,
        plots=False,
    )
    settings.update(overrides)
    return settings


def write_config(path, settings: dict) -> str:
    with open(path, "w") as handle:
        yaml.safe_dump(settings, handle)
    return str(path)


def micro_config(corpus: str, cache: str, out_dir: str, **overrides):
    from jetmoe.training.config import build_config

    settings = micro_settings(corpus, cache, out_dir=str(out_dir), **overrides)
    preset = settings.pop("preset")
    return build_config(preset, None, settings)


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def jetmoe_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "jetmoe.cli", *args]


def run_jetmoe(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(jetmoe_command(*args), env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def losses(out_dir) -> dict[int, float]:
    from jetmoe.training.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(str(out_dir)) if "loss" in r}


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node NPROC -m jetmoe.cli ARGS` with this interpreter's torchrun."""
    import shutil

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    return [torchrun, "--standalone", "--nproc_per_node", str(nproc), "-m", "jetmoe.cli", *args]


def run_command(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run in its own process group, so that a hang is cleaned up whole (torchrun's workers would outlive it)."""
    import signal

    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
