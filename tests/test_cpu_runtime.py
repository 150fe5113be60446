"""jetmoe.cpu_runtime: each setting checked by its effect, in a fresh process (they are process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = r"""
import json, os, sys
import torch
from jetmoe import cpu_runtime

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

applied = cpu_runtime.apply_cpu_defaults()
before = rss_mib()
block = torch.ones(256 * 2**20 // 4)  # 256 MiB, far above glibc's largest mmap threshold
del block
after_free = rss_mib()
released = cpu_runtime.release_free_memory()
after_release = rss_mib()
print(json.dumps({"applied": applied, "kept_mib": after_free - before, "released": released,
                  "left_after_release_mib": after_release - before,
                  "capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")}))
"""


def _probe(**env) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("JETMOE_CPU_DEFAULTS", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    environment.update(env)
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux-only")
def test_defaults_keep_freed_memory_and_enlarge_the_kernel_cache():
    on = _probe()
    assert on["applied"] is True
    assert on["capacity"] == "8192"
    assert on["kept_mib"] > 200  # the freed 256 MiB stay in the process for the next tensor
    assert on["released"] is True
    assert on["left_after_release_mib"] < 50  # release_free_memory() handed them back

    off = _probe(JETMOE_CPU_DEFAULTS="0")
    assert off["applied"] is False
    assert off["capacity"] is None
    assert off["kept_mib"] < 50  # glibc's default unmapped the block at once


def test_a_capacity_the_user_set_is_kept():
    assert _probe(ONEDNN_PRIMITIVE_CACHE_CAPACITY="300")["capacity"] == "300"
