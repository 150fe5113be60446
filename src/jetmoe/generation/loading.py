"""Finding and loading a checkpoint for generation: the bundled tiny model by default, any HF-format
JetMoE directory otherwise, bf16/fp32 or int8 (a saved int8 checkpoint, or quantised on load).

A directory is checked before its weights load: config.json must be JSON naming model_type "jetmoe" (unless
forced) and every safetensors file must have a whole header. Problems are a ModelLoadError naming the file."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded; the message names the file and what is wrong with it."""


def check_model_dir(path: Path, force_model_type: bool = False) -> None:
    """Refuse a directory whose config is not a JetMoE one (unless forced) or whose safetensors are damaged."""
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelLoadError(f"{config_file}: not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{config_file}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file}: not a JSON object of settings")
    model_type = config.get("model_type")
    if model_type != "jetmoe" and not force_model_type:
        raise ModelLoadError(
            f"{config_file}: model_type is {model_type!r}, not 'jetmoe': not a JetMoE model "
            "(--force-model-type, or force_model_type=True, loads it as JetMoE anyway)"
        )
    from safetensors import safe_open

    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors' SafetensorError: a truncated or overwritten file
            raise ModelLoadError(f"{weights}: not a valid safetensors file, truncated or damaged ({error})") from None


def _refused_pickle(path: Path, error: pickle.UnpicklingError) -> ModelLoadError:
    """torch's weights_only loader refused a .bin checkpoint: say which file, in one line."""
    files = ", ".join(str(p) for p in sorted(path.glob("*.bin"))) or str(path)
    found = re.search(r"unsupported GLOBAL (\S+)", str(error))
    what = f" (it would call {found.group(1)})" if found else ""
    return ModelLoadError(
        f"{files}: refused: the pickle holds more than tensors{what}, and loading it could run code; "
        "use a safetensors copy from a trusted source"
    )


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


def load_model(path: Path, dtype: str | torch.dtype = "bfloat16", int8: bool = False, device: str = "cpu",
               force_model_type: bool = False):
    """A JetMoeForCausalLM in eval mode. Saved int8 checkpoints load as int8 whatever `int8` says.

    Raises ModelLoadError (a ValueError) naming the file for a directory that is not a loadable JetMoE model."""
    from jetmoe import JetMoeForCausalLM
    from jetmoe.cpu_memory import place_on_huge_pages
    from jetmoe.cpu_runtime import release_free_memory
    from jetmoe.environment import warn_if_bf16_emulated

    from .quantize import is_quantized_checkpoint, load_quantized, quantize_model

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    check_model_dir(Path(path), force_model_type)
    if is_quantized_checkpoint(path):
        model = load_quantized(path, dtype=torch_dtype, device=device).eval()
        release_free_memory()
        warn_if_bf16_emulated(torch_dtype, device)
        return model
    # from_pretrained maps the safetensors files and gives the weights private copies on huge-page memory one
    # tensor at a time: one copy in RAM. Weights about to be quantised stay mapped (their copies would be
    # thrown away); the quantised model then gets the same placement.
    try:
        model = JetMoeForCausalLM.from_pretrained(path, dtype=torch_dtype, align_cpu_weights=not int8)
    except pickle.UnpicklingError as error:
        raise _refused_pickle(Path(path), error) from None
    model = model.to(device).eval()
    if int8:
        quantize_model(model)
        place_on_huge_pages(model)
    release_free_memory()  # loading's temporaries (2.9 GB of them when quantising jetmoe-8b on load)
    warn_if_bf16_emulated(torch_dtype, device)  # once the model loaded: a refused directory says only why
    return model


def load(model: str | Path | None = None, dtype: str = "bfloat16", int8: bool = False, device: str = "cpu",
         force_model_type: bool = False):
    """(model, tokenizer, directory) for `model` (a directory) or the bundled tiny model.

    A directory that cannot be loaded raises ModelLoadError naming the file and the problem; one whose
    config.json names another model_type is refused unless `force_model_type`."""
    path = resolve_model_dir(model)
    return load_model(path, dtype, int8, device, force_model_type), load_tokenizer(path), path
