"""Checkpoints: atomic (written under a temporary name, renamed when complete), resumable exactly.

A checkpoint folder `OUT/checkpoints/step-00000100/` holds
  - the model in HF format (config.json, model.safetensors via save_pretrained) and the tokenizer, so
    `JetMoeForCausalLM.from_pretrained(folder)` (and transformers) load it; with LoRA, the merged model plus
    the adapter in `adapter/` (peft format);
  - optimizer/ (torch.distributed.checkpoint: each process writes its own shard, resharding on load),
    scheduler.pt, rng-rank{N}.pt (every process's RNG states), trainer_state.json (step, data position, ...),
    train_config.yaml;
  - manifest.json, written last: every file with its size and sha256.
A folder is complete only once renamed from `.tmp-step-...` and holding a manifest that matches its files;
anything else is reported and skipped when resuming, which falls back to the previous good checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


from torch.distributed.checkpoint.api import CheckpointException

# torch.distributed.checkpoint reports its writers' failures as a CheckpointException (a BaseException).
_WRITE_ERRORS = (Exception, CheckpointException)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (nothing half-written is left where resume would take it)."""


@dataclass
class Found:
    path: str
    step: int


def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ----------------------------------------------------------------------------------------------- writing


def save_checkpoint(
    *,
    out_dir: str,
    step: int,
    model,
    optimizer,
    scheduler,
    tokenizer,
    trainer_state: dict,
    config_yaml: str,
    runtime,
    lora_scaling: float | None = None,
    keep: int = 2,
    log=print,
) -> str:
    """Write the checkpoint for `step` (a collective call: every process takes part). Returns its folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    root = checkpoint_root(out_dir)
    final = os.path.join(root, step_dir_name(step))
    temp = os.path.join(root, f".tmp-{step_dir_name(step)}")
    error: BaseException | None = None
    try:
        if runtime.is_main:
            shutil.rmtree(temp, ignore_errors=True)
            os.makedirs(temp)
    except _WRITE_ERRORS as caught:
        error = caught
    _agree(runtime, error, temp, step)

    try:
        full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        optim_state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        with _single_process_ok():
            dcp.save(optim_state, checkpoint_id=os.path.join(temp, "optimizer"))
        torch.save(_rng_state(), os.path.join(temp, f"rng-rank{runtime.rank}.pt"))
        if runtime.is_main:
            _save_model(model, full_state, temp, lora_scaling)
            tokenizer.save_pretrained(temp)
            torch.save(scheduler.state_dict(), os.path.join(temp, "scheduler.pt"))
            _write_text(os.path.join(temp, "trainer_state.json"), json.dumps(trainer_state, indent=2))
            _write_text(os.path.join(temp, "train_config.yaml"), config_yaml)
    except _WRITE_ERRORS as caught:  # disk full, quota, I/O error: whatever the writer (torch, safetensors) raised
        error = caught
    _agree(runtime, error, temp, step)

    try:
        if runtime.is_main:
            _write_text(os.path.join(temp, MANIFEST), json.dumps(_manifest(temp), indent=1))
            _fsync_tree(temp)
            if os.path.exists(final):  # the same step saved before (e.g. a resumed run): replace it
                shutil.rmtree(final)
            os.rename(temp, final)
            _fsync_dir(root)
            _prune(root, keep, log)
    except _WRITE_ERRORS as caught:
        error = caught
    _agree(runtime, error, temp, step)
    return final


@contextlib.contextmanager
def _single_process_ok():
    """One process saving or loading a torch.distributed checkpoint is what we mean; torch warns each time."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
        yield


def _agree(runtime, error: BaseException | None, temp: str, step: int) -> None:
    """All processes learn whether any failed; then all raise the same clear error and the temp folder goes."""
    failed = runtime.sum([1.0 if error is not None else 0.0])[0] if runtime.distributed else (1.0 if error else 0.0)
    if not failed:
        return
    if runtime.is_main:
        shutil.rmtree(temp, ignore_errors=True)
    reason = _root_reason(error) if error is not None else "another process failed to write its part"
    disk_full = getattr(error, "errno", None) == 28 or "No space left" in reason
    hint = " (the disk is full: free space or point out_dir elsewhere)" if disk_full else ""
    raise CheckpointError(
        f"could not write the checkpoint of step {step}{hint}: {reason}. "
        "The partial checkpoint was removed; earlier checkpoints are intact."
    ) from error


def _root_reason(error: BaseException) -> str:
    """A one-line reason: the original error inside torch's CheckpointException (whose text is a traceback)."""
    while isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    while error.__cause__ is not None and not isinstance(error, OSError):
        error = error.__cause__
    return f"{type(error).__name__}: {error}".strip()


def _save_model(model, full_state: dict, folder: str, lora_scaling: float | None) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = full_state
    if lora_scaling is not None:
        state = merge_lora_state(full_state, lora_scaling)
        _save_adapter(model, full_state, os.path.join(folder, "adapter"))
    if getattr(base.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    base.save_pretrained(folder, state_dict=state)


def merge_lora_state(state: dict, scaling: float) -> dict:
    """peft's state dict -> the plain model's, with each LoRA update folded in: W + scaling * B @ A."""
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key or "lora_dropout" in key:
            continue
        plain = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if ".base_layer." in key:
            stem = key.rsplit(".base_layer.", 1)[0]
            a = next(v for k, v in state.items() if k.startswith(stem + ".lora_A.") and k.endswith(".weight"))
            b = next(v for k, v in state.items() if k.startswith(stem + ".lora_B.") and k.endswith(".weight"))
            value = value + scaling * (b.float() @ a.float()).to(value.dtype)
        merged[plain] = value
    return merged


def _save_adapter(model, full_state: dict, folder: str) -> None:
    from peft import get_peft_model_state_dict

    os.makedirs(folder, exist_ok=True)
    adapter = get_peft_model_state_dict(model, state_dict=full_state)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in adapter.items()}, os.path.join(folder, "adapter_model.safetensors"))
    model.peft_config["default"].save_pretrained(folder)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(folder: str, rank: int) -> None:
    path = os.path.join(folder, f"rng-rank{rank}.pt")
    if not os.path.exists(path):  # resumed with more processes than saved: the new ranks start fresh
        return
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _files(folder: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(directory, name), folder)
        for directory, _, names in os.walk(folder)
        for name in names
        if name != MANIFEST
    )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: str) -> dict:
    return {
        name: {"size": os.path.getsize(os.path.join(folder, name)), "sha256": _sha256(os.path.join(folder, name))}
        for name in _files(folder)
    }


def _fsync_tree(folder: str) -> None:
    for directory, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(directory)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: str, keep: int, log) -> None:
    complete = sorted(_step_dirs(root), key=lambda found: found.step)
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old.path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- reading


def _step_dirs(root: str) -> list[Found]:
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match:
            found.append(Found(path=os.path.join(root, name), step=int(match.group(1))))
    return found


def check_checkpoint(folder: str) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.exists(manifest_path):
        return "incomplete: it has no manifest.json (the write did not finish)"
    try:
        with open(manifest_path) as handle:
            manifest = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        return f"corrupt manifest.json ({error})"
    for name, expected in manifest.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            return f"file {name} is missing"
        size = os.path.getsize(path)
        if size != expected["size"]:
            return f"file {name} has {size} bytes, the manifest says {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"file {name} does not match its checksum (corrupted)"
    return None


def find_latest(out_dir: str, log=print) -> Found | None:
    """The newest complete and intact checkpoint; each newer broken one is reported and skipped."""
    root = checkpoint_root(out_dir)
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if name.startswith(".tmp-"):
                log(f"warning: ignoring {os.path.join(root, name)}: an unfinished checkpoint write (interrupted run)")
    for found in sorted(_step_dirs(root), key=lambda f: f.step, reverse=True):
        problem = check_checkpoint(found.path)
        if problem is None:
            return found
        log(f"warning: checkpoint {found.path} is unusable, {problem}; falling back to the previous checkpoint")
    return None


def load_training_state(folder: str, model, optimizer, scheduler, runtime) -> dict:
    """Restore optimizer, scheduler and RNG from a checkpoint (the model weights were loaded when it was built)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=os.path.join(folder, "optimizer"))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(torch.load(os.path.join(folder, "scheduler.pt"), weights_only=False))
    restore_rng(folder, runtime.rank)
    with open(os.path.join(folder, "trainer_state.json")) as handle:
        return json.load(handle)
