"""Checkpoints: atomic (written under a temporary name, renamed when complete), resumable exactly.

A checkpoint folder `OUT/checkpoints/step-00000100/` holds
  - the model in HF format (config.json, model.safetensors, or model-0000i-of-0000n.safetensors and an index,
    written from any layout by save_hf_weights) and the tokenizer, so `JetMoeForCausalLM.from_pretrained(folder)`
    (and transformers) load it, and a resume with any layout reads its slices (materialize.CheckpointSlices);
    with LoRA, the merged model plus the adapter in `adapter/` (peft format);
  - optimizer/ (torch.distributed.checkpoint: each process writes its own shard, resharding on load),
    scheduler.json, rng-rank{N}.json (every process's RNG states), trainer_state.json (step, data position,
    ...), train_config.yaml: plain data, so resuming never unpickles what lies in the output folder;
  - manifest.json, written last: every file with its size and sha256.
A folder is complete only once renamed from `.tmp-step-...` and holding a manifest that lists exactly its files
with matching sizes and checksums, and whose own files parse. Anything else is reported and skipped when
resuming, which falls back to the previous good checkpoint; a checkpoint that fails to load is skipped the same
way (see trainer.py). A run deletes or replaces only checkpoints it wrote or the ones of the run it resumed:
another checkpoint in the way of a new one is moved aside to `step-N.replaced`, never deleted.
"""

from __future__ import annotations

import base64
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
_RNG_FILE = re.compile(r"^rng-rank(\d+)\.(json|pt)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MANIFEST = "manifest.json"
SCHEDULER = "scheduler.json"
TRAINER_STATE = "trainer_state.json"
# What every checkpoint holds besides its model weights (model.safetensors, or shards and their index).
REQUIRED = ("config.json", TRAINER_STATE, SCHEDULER, "rng-rank0.json", "train_config.yaml", "optimizer/.metadata")
# Checkpoints of jetmoe <= 0.1.0 hold these two as torch.save pickles instead: read with weights_only=True.
LEGACY = {SCHEDULER: "scheduler.pt", "rng-rank0.json": "rng-rank0.pt"}


from torch.distributed.checkpoint.api import CheckpointException

# torch.distributed.checkpoint reports its writers' failures as a CheckpointException (a BaseException).
_WRITE_ERRORS = (Exception, CheckpointException)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (nothing half-written is left where resume would take it), or a resume
    found none to resume from."""


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be resumed from; the message says what is wrong with it."""


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
    owned: set[str] | None = None,
    log=print,
) -> str:
    """Write the checkpoint for `step` (a collective call: every process takes part). Returns its folder.

    `owned`: the checkpoint folders this run may replace or prune (its own, and those of the run it resumed);
    the new folder is added to it."""
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
        full_state = None
        gather = getattr(model, "full_state_dict", None)
        if gather is not None:  # pipeline stages: gathered from every stage onto rank 0
            full_state = gather()
        elif lora_scaling is None:  # the weights, gathered one tensor at a time and written by their file's process
            save_hf_weights(model, temp, runtime)
        else:
            full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        optim_state = {"optimizer": get_optimizer_state_dict(model, optimizer, options=_flat_optimizer_state())}
        with _single_process_ok():
            dcp.save(optim_state, checkpoint_id=os.path.join(temp, "optimizer"))
        _write_text(os.path.join(temp, f"rng-rank{runtime.rank}.json"), json.dumps(_rng_state()))
        if runtime.is_main:
            if full_state is None:
                _save_model_config(model, temp)
            else:
                _save_model(model, full_state, temp, lora_scaling)
            tokenizer.save_pretrained(temp)
            _write_text(os.path.join(temp, SCHEDULER), json.dumps(scheduler.state_dict(), indent=1))
            _write_text(os.path.join(temp, TRAINER_STATE), json.dumps(trainer_state, indent=2))
            _write_text(os.path.join(temp, "train_config.yaml"), config_yaml)
    except _WRITE_ERRORS as caught:  # disk full, quota, I/O error: whatever the writer (torch, safetensors) raised
        error = caught
    _agree(runtime, error, temp, step)

    owned = set() if owned is None else owned
    try:
        if runtime.is_main:
            _write_text(os.path.join(temp, MANIFEST), json.dumps(_manifest(temp), indent=1))
            _fsync_tree(temp)
            if os.path.exists(final):  # the same step saved before (e.g. a resumed run redoing steps)
                if final in owned:
                    shutil.rmtree(final)
                else:
                    aside = _free_name(final + ".replaced")
                    os.rename(final, aside)
                    log(f"moved {final} (not written by this run) aside to {aside}")
            os.rename(temp, final)
            _fsync_dir(root)
            owned.add(final)
            _prune(keep, owned)
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


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
MAX_FILE_BYTES = 5 << 30  # weights per safetensors file (more: files named model-0000i-of-0000n + an index)


def save_hf_weights(model, folder: str, runtime) -> list[str]:
    """Write the model's weights in HF format (safetensors) from any layout, holding one whole tensor at a time.

    A collective call: every sharded tensor (DTensor) is gathered in turn on every process, and the process
    that writes its file (files go round the processes) streams it out. Tied weights are written once. Returns
    the file names."""
    from torch.distributed.tensor import DTensor

    from .materialize import canonical_name

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tied = getattr(base.config, "tie_word_embeddings", False)
    entries, seen = [], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        name = canonical_name(name)
        if id(tensor) in seen or (tied and name == "lm_head.weight"):
            continue
        seen.add(id(tensor))
        entries.append((name, tensor))
    files: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in entries:
        nbytes = tensor.numel() * tensor.element_size()
        if files[-1] and size + nbytes > MAX_FILE_BYTES:
            files.append([])
            size = 0
        files[-1].append((name, tensor))
        size += nbytes
    names = (["model.safetensors"] if len(files) == 1
             else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    for index, (file_name, members) in enumerate(zip(names, files)):
        writer = index % runtime.world == runtime.rank
        handle = open(os.path.join(folder, file_name), "wb") if writer else None
        try:
            if handle:
                handle.write(_safetensors_header(members))
            for _, tensor in members:
                with torch.no_grad():
                    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                if handle:
                    data = full.detach().to("cpu").contiguous()
                    handle.write(data.reshape(-1).view(torch.uint8).numpy().data if data.numel() else b"")
                del full
            if handle:
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            if handle:
                handle.close()
    if len(files) > 1 and runtime.is_main:
        weight_map = {name: file_name for file_name, members in zip(names, files) for name, _ in members}
        total = sum(t.numel() * t.element_size() for _, t in entries)
        _write_text(os.path.join(folder, "model.safetensors.index.json"),
                    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def _safetensors_header(members: list) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in members:
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors name here")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _save_model_config(model, folder: str) -> None:
    """config.json (and generation_config.json) beside weights written by save_hf_weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.save_pretrained(folder)
    generation = getattr(base, "generation_config", None)
    if generation is not None and base.can_generate():
        generation.save_pretrained(folder)


def merge_lora_state(state: dict, scaling: float) -> dict:
    """peft's state dict -> the plain model's, with each LoRA update folded in: W + scaling * B @ A.

    An expert weight [E, out, in] (peft's ParamWrapper) has A [E*r, in] (expert e's rows e*r..e*r+r-1) and
    B [out, r*E] (expert e's columns e, E+e, 2E+e, ...): W[e] + scaling * B[:, e::E] @ A[e*r:(e+1)*r]."""
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key or "lora_dropout" in key:
            continue
        plain = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if ".base_layer." in key:
            stem = key.rsplit(".base_layer.", 1)[0]
            a = next(v for k, v in state.items() if k.startswith(stem + ".lora_A.") and k.endswith(".weight"))
            b = next(v for k, v in state.items() if k.startswith(stem + ".lora_B.") and k.endswith(".weight"))
            if value.dim() == 3:
                experts = value.shape[0]
                a = a.float().reshape(experts, -1, a.shape[-1])  # [E, r, in]
                b = b.float().reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # [E, out, r]
                value = value + scaling * torch.bmm(b, a).to(value.dtype)
            else:
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


def _free_name(path: str) -> str:
    candidate, number = path, 1
    while os.path.exists(candidate):
        number += 1
        candidate = f"{path}-{number}"
    return candidate


def _rng_state() -> dict:
    """This process's RNG states as JSON data: torch's byte states in base64, numpy's and Python's as lists."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": _b64(torch.get_rng_state()),
             "numpy": [name, key.tolist(), int(pos), int(has_gauss), float(cached)],
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _rng_setters(folder: str, name: str) -> list:
    """The RNG states of one rng-rank file, parsed and checked, as calls that apply them (or DamagedCheckpoint)."""
    state = _read_legacy(folder, name) if name.endswith(".pt") else _read_json(folder, name)
    try:
        if name.endswith(".pt"):
            state = _legacy_rng(state)
        setters = [(torch.set_rng_state, _byte_state(state["torch"]))]
        kind, key, pos, has_gauss, cached = state["numpy"]
        numpy_state = (kind, np.array(key, dtype=np.uint32), pos, has_gauss, cached)
        np.random.RandomState().set_state(numpy_state)  # checks it without touching the global generator
        setters.append((np.random.set_state, numpy_state))
        version, internal, gauss_next = state["python"]
        python_state = (version, tuple(internal), gauss_next)
        random.Random().setstate(python_state)
        setters.append((random.setstate, python_state))
        if "cuda" in state and torch.cuda.is_available():
            setters.append((torch.cuda.set_rng_state, _byte_state(state["cuda"])))
        probe = torch.Generator()
        probe.set_state(setters[0][1])
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise DamagedCheckpoint(f"{name} does not hold valid RNG states ({type(error).__name__}: {error})") from None
    return setters


def _legacy_rng(state: dict) -> dict:
    """A torch.save'd RNG state (jetmoe <= 0.1.0) in the JSON layout."""
    name, key, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    converted = {"torch": _b64(state["torch"]), "numpy": [name, key.tolist(), pos, has_gauss, cached],
                 "python": [version, list(internal), gauss_next]}
    if "cuda" in state:
        converted["cuda"] = _b64(state["cuda"])
    return converted


def _read_legacy(folder: str, name: str):
    """A torch.save file of plain data (tensors, numbers, numpy arrays): weights_only=True runs no code."""
    multiarray = getattr(np, "_core", None) or np.core
    allowed = [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(os.path.join(folder, name), weights_only=True, map_location="cpu")
    except Exception as error:  # pickle's and torch's errors: damaged, or more than plain data (refused)
        reason = " ".join(str(error).split())[:300]
        raise DamagedCheckpoint(f"{name} does not load as plain data ({type(error).__name__}: {reason})") from None


def _byte_state(text) -> torch.Tensor:
    if not isinstance(text, str):
        raise TypeError("a byte state must be a base64 string")
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def restore_rng(folder: str, rank: int) -> None:
    name = next((n for n in (f"rng-rank{rank}.json", f"rng-rank{rank}.pt") if os.path.exists(os.path.join(folder, n))),
                None)
    if name is None:  # resumed with more processes than saved: the new ranks start fresh
        return
    for setter, value in _rng_setters(folder, name):
        setter(value)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _read_json(folder: str, name: str):
    """A checkpoint file's JSON (UTF-8); DamagedCheckpoint naming the file if it cannot be read or parsed."""
    try:
        with open(os.path.join(folder, name), "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except OSError as error:
        raise DamagedCheckpoint(f"{name} cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise DamagedCheckpoint(f"{name} is not UTF-8 text ({error})") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise DamagedCheckpoint(f"{name} is not valid JSON ({error})") from None


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


def _prune(keep: int, owned: set[str]) -> None:
    """Keep the newest `keep` of the checkpoints this run owns; delete its older ones (never anyone else's)."""
    mine = sorted((p for p in owned if os.path.isdir(p) and _STEP_DIR.match(os.path.basename(p))),
                  key=lambda p: int(_STEP_DIR.match(os.path.basename(p)).group(1)))
    for old in mine[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
        owned.discard(old)


def lineage(found: Found | None) -> set[str]:
    """The checkpoints a run resumed from `found` owns: that one and the older ones it continues."""
    if found is None:
        return set()
    return {f.path for f in _step_dirs(os.path.dirname(found.path)) if f.step <= found.step}


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
    if not os.path.exists(os.path.join(folder, MANIFEST)):
        return "incomplete: it has no manifest.json (the write did not finish)"
    try:
        _check_files(folder, _read_manifest(folder))
        _check_contents(folder)
    except DamagedCheckpoint as problem:
        return str(problem)
    return None


def _read_manifest(folder: str) -> dict:
    manifest = _read_json(folder, MANIFEST)
    if not isinstance(manifest, dict):
        raise DamagedCheckpoint(f"corrupt manifest.json (a JSON {type(manifest).__name__}, not an object of files)")
    for name, entry in manifest.items():
        if not (isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])):
            raise DamagedCheckpoint(f"corrupt manifest.json (the entry of {name!r} is not "
                                    '{"size": bytes, "sha256": hex digest})')
    return manifest


def _check_files(folder: str, manifest: dict) -> None:
    """The manifest lists exactly the folder's files, the required ones among them, with their sizes and digests."""
    present = set(_files(folder))
    unlisted = sorted(present - set(manifest))
    if unlisted:
        raise DamagedCheckpoint(f"manifest.json does not list {', '.join(unlisted[:3])}"
                                + (f" and {len(unlisted) - 3} more files" if len(unlisted) > 3 else ""))
    weights = ("model.safetensors", "model.safetensors.index.json")
    for name in (*REQUIRED, *([] if any(w in manifest for w in weights) else [weights[0]])):
        if name not in manifest and LEGACY.get(name) not in manifest:
            raise DamagedCheckpoint(f"file {name} is missing (the manifest does not list it)")
    for name, expected in manifest.items():
        if name not in present:
            raise DamagedCheckpoint(f"file {name} is missing")
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        if size != expected["size"]:
            raise DamagedCheckpoint(f"file {name} has {size} bytes, the manifest says {expected['size']}")
        if _sha256(path) != expected["sha256"]:
            raise DamagedCheckpoint(f"file {name} does not match its checksum (corrupted)")


def _check_contents(folder: str) -> None:
    """The checkpoint's own files parse: JSON state, RNG states, safetensors headers (the checksums only say
    that the files are the ones the manifest lists)."""
    match = _STEP_DIR.match(os.path.basename(folder))
    _trainer_state(folder, int(match.group(1)) if match else None)
    _scheduler_state(folder)
    config = _read_json(folder, "config.json")
    if not isinstance(config, dict) or config.get("model_type") != "jetmoe":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise DamagedCheckpoint(f"config.json is not a JetMoE model config (model_type {kind!r})")
    for name in _files(folder):
        if _RNG_FILE.match(name):
            _rng_setters(folder, name)
        elif name.endswith(".safetensors"):
            _check_safetensors(folder, name)


def _check_safetensors(folder: str, name: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises its own SafetensorError (an Exception) for a bad header
        raise DamagedCheckpoint(f"file {name} is not a valid safetensors file ({error})") from None


def _trainer_state(folder: str, step: int | None) -> dict:
    state = _read_json(folder, TRAINER_STATE)
    counts = ("step", "position")
    if not isinstance(state, dict) or not all(type(state.get(k)) is int and state[k] >= 0 for k in counts):
        raise DamagedCheckpoint(f"{TRAINER_STATE} does not hold the step and data position as counts")
    if step is not None and state["step"] != step:
        raise DamagedCheckpoint(f"{TRAINER_STATE} says step {state['step']}, the folder is step {step}")
    return state


def _scheduler_state(folder: str) -> dict:
    legacy = LEGACY[SCHEDULER]
    if not os.path.exists(os.path.join(folder, SCHEDULER)) and os.path.exists(os.path.join(folder, legacy)):
        state = _read_legacy(folder, legacy)
    else:
        state = _read_json(folder, SCHEDULER)
    numbers = (int, float)
    if not (isinstance(state, dict) and type(state.get("last_epoch")) is int
            and isinstance(state.get("base_lrs"), list) and state["base_lrs"]
            and all(isinstance(x, numbers) and not isinstance(x, bool) for x in state["base_lrs"])):
        raise DamagedCheckpoint(f"{SCHEDULER} is not a learning-rate scheduler state")
    return state


def candidates(out_dir: str, log=print, skipped: list[str] | None = None):
    """The complete and intact checkpoints, newest first; each broken one is reported (and added to `skipped`)."""
    root = checkpoint_root(out_dir)
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if name.startswith(".tmp-"):
                log(f"warning: ignoring {os.path.join(root, name)}: an unfinished checkpoint write (interrupted run)")
                if skipped is not None:
                    skipped.append(f"{name} (an unfinished write)")
    for found in sorted(_step_dirs(root), key=lambda f: f.step, reverse=True):
        problem = check_checkpoint(found.path)
        if problem is None:
            yield found
        else:
            report_unusable(found, problem, log, skipped)


def report_unusable(found: Found, problem: str, log=print, skipped: list[str] | None = None) -> None:
    log(f"warning: checkpoint {found.path} is unusable, {problem}; falling back to the previous checkpoint")
    if skipped is not None:
        skipped.append(f"{os.path.basename(found.path)} ({problem})")


def find_latest(out_dir: str, log=print) -> Found | None:
    """The newest complete and intact checkpoint; each newer broken one is reported and skipped."""
    return next(candidates(out_dir, log), None)


def _flat_optimizer_state():
    """The optimizer state keyed per parameter name (param groups too): the same keys in every layout, so a
    checkpoint of any layout (processes, pipeline stages, expert shards) loads into any other (resharded by DCP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


_TIED_HEAD, _EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def _tied_head_aliases(state: dict, saved: set[str]) -> dict[str, str]:
    """A pipeline's last stage keeps its own copy of a tied head, stepped like the embedding: where the checkpoint
    (of another layout) holds only the embedding's state, that copy reads it."""
    aliases = {}
    for key in state:
        alias = key.replace(_TIED_HEAD, _EMBEDDING)
        if _TIED_HEAD in key and f"optimizer.{key}" not in saved and f"optimizer.{alias}" in saved:
            aliases[key] = alias
    return aliases


def load_training_state(folder: str, model, optimizer, scheduler, runtime) -> dict:
    """Restore optimizer, scheduler and RNG from a checkpoint (the model weights were loaded when it was built).

    Returns the trainer state; raises DamagedCheckpoint if any part does not load (the caller falls back)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    match = _STEP_DIR.match(os.path.basename(folder))
    trainer_state = _trainer_state(folder, int(match.group(1)) if match else None)
    scheduler_state = _scheduler_state(folder)
    if len(scheduler_state["base_lrs"]) != len(optimizer.param_groups):
        raise DamagedCheckpoint(f"{SCHEDULER} has {len(scheduler_state['base_lrs'])} parameter groups, "
                                f"the optimizer {len(optimizer.param_groups)}")
    try:
        path = os.path.join(folder, "optimizer")
        saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
        # Per-parameter keys since pipeline parallelism; earlier checkpoints hold param groups as one list.
        options = _flat_optimizer_state() if "optimizer.param_groups" not in saved else None
        state = {"optimizer": get_optimizer_state_dict(model, optimizer, options=options)}
        aliases = _tied_head_aliases(state["optimizer"], saved) if options is not None else {}
        state["optimizer"] = {aliases.get(key, key): value for key, value in state["optimizer"].items()}
        with _single_process_ok():
            dcp.load(state, checkpoint_id=path)
        back = {alias: key for key, alias in aliases.items()}
        loaded = {back.get(key, key): value for key, value in state["optimizer"].items()}
        set_optimizer_state_dict(model, optimizer, loaded, options=options)
    except _WRITE_ERRORS as error:  # whatever the reader raised: a damaged or mismatched optimizer state
        raise DamagedCheckpoint(f"optimizer/ does not load ({_root_reason(error)})") from None
    scheduler.load_state_dict(scheduler_state)
    restore_rng(folder, runtime.rank)
    return trainer_state
