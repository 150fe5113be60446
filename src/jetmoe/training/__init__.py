"""Training JetMoE models: `jetmoe train` / `jetmoe eval`, from one CPU to many GPUs (torchrun + FSDP2).

Modules, one job each: config (run settings, presets), corpus (the embedded default corpus), sources (reading
data files), tokenizer, data (token files, packing, split, order), objective, schedule, optim, distributed,
materialize (meta-device start-up: each process allocates only its shards), checkpoint, metrics, trainer (the
loop), evaluate (perplexity), cli.
"""

from __future__ import annotations


def bundled_model_path() -> str:
    """The folder of the tiny model shipped inside the package (HF format, with its tokenizer)."""
    from ..assets import TINY_MODEL_DIR

    return TINY_MODEL_DIR


def train(config, resume: bool = False, start_if_none: bool = False) -> dict:
    from .trainer import train as _train

    return _train(config, resume=resume, start_if_none=start_if_none)


__all__ = ["bundled_model_path", "train"]
