"""Finding and loading a checkpoint for generation: the bundled tiny model by default, any HF-format
JetMoE directory otherwise, bf16/fp32 or int8 (a saved int8 checkpoint, or quantised on load)."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def bundled_model_dir() -> Path | None:
    """The tiny model shipped with the package, if this build has it."""
    try:
        from jetmoe.assets import TINY_MODEL_DIR
    except ImportError:
        return None
    path = Path(TINY_MODEL_DIR)
    return path if (path / "config.json").is_file() else None


def resolve_model_dir(model: str | Path | None) -> Path:
    if model is None:
        path = bundled_model_dir()
        if path is None:
            raise FileNotFoundError(
                "the bundled tiny model is not in this build; pass --model DIR (an HF-format checkpoint)"
            )
        return path
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json there)")
    return path


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(path: Path, dtype: str | torch.dtype = "bfloat16", int8: bool = False, device: str = "cpu"):
    """A JetMoeForCausalLM in eval mode. Saved int8 checkpoints load as int8 whatever `int8` says."""
    from jetmoe import JetMoeForCausalLM
    from jetmoe.cpu_memory import place_on_huge_pages
    from jetmoe.cpu_runtime import release_free_memory
    from jetmoe.environment import warn_if_bf16_emulated

    from .quantize import is_quantized_checkpoint, load_quantized, quantize_model

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    warn_if_bf16_emulated(torch_dtype, device)
    if is_quantized_checkpoint(path):
        model = load_quantized(path, dtype=torch_dtype, device=device).eval()
        release_free_memory()
        return model
    # from_pretrained maps the safetensors files and gives the weights private copies on huge-page memory one
    # tensor at a time: one copy in RAM. Weights about to be quantised stay mapped (their copies would be
    # thrown away); the quantised model then gets the same placement.
    model = JetMoeForCausalLM.from_pretrained(path, dtype=torch_dtype, align_cpu_weights=not int8).to(device).eval()
    if int8:
        quantize_model(model)
        place_on_huge_pages(model)
    release_free_memory()  # loading's temporaries (2.9 GB of them when quantising jetmoe-8b on load)
    return model


def load(model: str | Path | None = None, dtype: str = "bfloat16", int8: bool = False, device: str = "cpu"):
    """(model, tokenizer, directory) for `model` (a directory) or the bundled tiny model."""
    path = resolve_model_dir(model)
    return load_model(path, dtype, int8, device), load_tokenizer(path), path
