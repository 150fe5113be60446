"""Learning-rate schedules as a multiplier of the peak lr, step -> factor (a LambdaLR function).

warmup-stable-decay (what JetMoE used): linear warmup to the peak, constant, then in the last
`decay_fraction` of the steps an exponential or linear decay to `min_lr_ratio`. Cosine: warmup then a
cosine from the peak down to `min_lr_ratio`. Constant: warmup then flat.
"""

from __future__ import annotations

import math
from functools import partial

import torch


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "wsd",
    decay_fraction: float = 0.2,
    decay_type: str = "exponential",
    min_lr_ratio: float = 0.1,
) -> float:
    """The factor for the update made at `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule != "wsd":
        raise ValueError(f"unknown schedule {schedule!r}; choose wsd, cosine or constant")
    decay_steps = int(round(decay_fraction * total_steps))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start or decay_steps == 0:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
    if decay_type == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if decay_type == "exponential":
        # Geometric interpolation from 1 to min_lr_ratio (a ratio of 0 would never be reached: floor it).
        return max(min_lr_ratio, 1e-8) ** progress
    raise ValueError(f"unknown decay_type {decay_type!r}; choose exponential or linear")


def build_scheduler(optimizer: torch.optim.Optimizer, config) -> torch.optim.lr_scheduler.LambdaLR:
    factor = partial(
        lr_factor,
        total_steps=config.max_steps,
        warmup_steps=config.warmup_steps,
        schedule=config.schedule,
        decay_fraction=config.decay_fraction,
        decay_type=config.decay_type,
        min_lr_ratio=config.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
