"""`jetmoe env` and the bf16-emulation warning: what a user sees about this machine's kernel paths."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from jetmoe import environment
from jetmoe.ops import native


def _jetmoe_env(**variables: str) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "jetmoe.cli", "env"], capture_output=True, text=True, check=True,
        env={**os.environ, **variables},
    )  # fmt: skip
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in result.stdout.splitlines())


def test_jetmoe_env_shows_the_kernel_level_in_use_and_the_levels_this_cpu_runs():
    facts = _jetmoe_env()
    assert facts["jetmoe kernel level in use"].startswith(native.level() or "off")
    assert facts["jetmoe kernel levels this CPU runs"] == ", ".join(native.supported_levels())
    assert facts["torch CPU capability"] == torch.backends.cpu.get_cpu_capability()


def test_a_forced_level_is_what_jetmoe_env_reports(tmp_path):
    if native.load() is None:
        pytest.skip("jetmoe's C kernels do not run here")
    facts = _jetmoe_env(JETMOE_CPU_ISA="generic", JETMOE_CACHE_DIR=str(tmp_path))
    assert facts["jetmoe kernel level in use"] == "generic"
    facts = _jetmoe_env(JETMOE_NATIVE_KERNELS="0")
    assert facts["jetmoe kernel level in use"].startswith("off")


def test_bf16_on_a_cpu_without_bf16_arithmetic_warns_once(monkeypatch):
    monkeypatch.setattr(environment, "_warned", False)
    monkeypatch.setattr(environment, "bf16_arithmetic", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 arithmetic.*training runs emulated and slower than fp32"):
        environment.warn_if_bf16_emulated(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        environment.warn_if_bf16_emulated(torch.bfloat16)  # once per process
    monkeypatch.setattr(environment, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        environment.warn_if_bf16_emulated(torch.float32)  # fp32: nothing to say
        monkeypatch.setattr(environment, "bf16_arithmetic", lambda: True)
        environment.warn_if_bf16_emulated(torch.bfloat16)  # a CPU with bf16 arithmetic: nothing to say


def test_onednn_held_below_bf16_instructions_counts_as_emulated(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 (emulating an AVX2-only CPU) takes bf16 arithmetic away whatever the CPU has."""
    monkeypatch.setattr(environment.build, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not environment.bf16_arithmetic()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert environment.bf16_arithmetic()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert environment.bf16_arithmetic()
    monkeypatch.setattr(environment.build, "_cpu_flags", lambda: {"avx2", "fma"})
    assert not environment.bf16_arithmetic()
