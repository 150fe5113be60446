"""The run configuration: a dataclass filled from a preset, then a YAML/TOML file, then command-line overrides.

Every field is also a flag (`--lr 3e-4`, `--grad-accum 4`); `--set key=value` sets any field, `model.<field>`
included. Unknown keys are an error that lists the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .. import JetMoeConfig

# JetMoE-8B's geometry (see docs/reference-semantics.md §7) and the recipe of the JetMoE technical report:
# AdamW (0.9, 0.95), weight decay 0.1, peak lr 5e-4, 4M-token batches of 4096-token sequences,
# warmup-stable-decay with exponential decay, the original switch + z-loss balancing objective.
JETMOE_8B_MODEL = dict(
    vocab_size=32000,
    hidden_size=2048,
    num_hidden_layers=24,
    num_key_value_heads=16,
    kv_channels=128,
    intermediate_size=5632,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    router_aux_loss_type="switch",
)

# Small enough to train on a 2-core CPU in minutes, yet every part of JetMoE is there (MoA and MoE, 4 experts, top-2).
TINY_MODEL = dict(
    vocab_size=2048,
    hidden_size=128,
    num_hidden_layers=4,
    num_key_value_heads=2,
    kv_channels=32,
    intermediate_size=128,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    pad_token_id=3,
)


# Groups of `jetmoe train --help`, in its order; every field names one.
GROUPS = {
    "model": "the model to train, fine-tuning and LoRA",
    "data": "what to train on, mixtures, tokenisation, validation split",
    "optimisation": "batch shape, optimiser, schedule, objective, precision",
    "parallelism": "devices and processes",
    "checkpoints": "where runs are written, how often, how many kept",
    "logging": "metrics, validation, progress",
}

# LoRA's expert targets (peft's `target_parameters`): the 3-D [E, out, in] weights of the MoA and MoE experts.
LORA_EXPERTS = {
    "moa_query": "experts.input_linear.weight",
    "moa_output": "experts.output_linear.weight",
    "moe_input": "mlp.input_linear.weight",
    "moe_output": "mlp.output_linear.weight",
}


def option(default: Any, help: str, group: str, choices: tuple | None = None) -> Any:
    """A TrainConfig field with its `--help` line, its group and (optionally) its allowed values: one source
    for the flag, the help text and the validation. A list or dict default is copied for every config."""
    if group not in GROUPS:
        raise ValueError(f"option group {group!r} is not one of {list(GROUPS)}")
    metadata = {"help": help, "group": group, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every field is a config key and a flag; add one as `name: type = option(default, help, group[, choices])`."""

    # Model: the JetMoeConfig fields of a fresh model, or `init_from` an HF-format checkpoint to fine-tune.
    model: dict = option(dict(TINY_MODEL), "JetMoeConfig fields of a fresh model (set with --set model.FIELD=V)", "model")
    init_from: str | None = option(None, "an HF-format JetMoE checkpoint folder to fine-tune", "model")
    lora: bool = option(False, "LoRA fine-tuning through peft (needs init_from); checkpoints hold the merged model",
                        "model")
    lora_rank: int = option(8, "LoRA rank r", "model")
    lora_alpha: float = option(16.0, "LoRA alpha (the update is scaled by alpha / r)", "model")
    lora_dropout: float = option(0.0, "LoRA dropout on dense targets (peft allows none on expert targets)", "model")
    lora_target_modules: list = option(["kv_proj"], "dense (nn.Linear) modules LoRA adapts, by name", "model")
    lora_target_experts: list = option(list(LORA_EXPERTS), "expert weights LoRA adapts (the flag with no value: none)", "model",
                                       choices=tuple(LORA_EXPERTS))
    # Data: files or folders; none = the embedded Python documentation corpus.
    data: list = option([], "files or folders; PATH:WEIGHT for a weighted mixture; none = the embedded corpus",
                        "data")
    data_phases: list = option([], "mixture changes: STEP:PATH=W,PATH=W (weights from that step on)", "data")
    data_format: str = option("auto", "format of the data files", "data", choices=("auto", "text", "jsonl", "chat"))
    text_field: str = option("text", "the JSONL field holding a document's text", "data")
    tokenizer: str | None = option(None, "an HF tokenizer path; none = the checkpoint's, or train a byte-level BPE",
                                   "data")
    cache_dir: str | None = option(None, "folder of token files (none = ~/.cache/jetmoe/tokens)", "data")
    val_fraction: float = option(0.02, "share of the sequences held out for validation, in [0, 1)", "data")
    seq_len: int = option(256, "tokens per packed training sequence", "data")
    # Shape of a step: global batch = batch_size * grad_accum * processes sequences of seq_len tokens.
    batch_size: int = option(16, "sequences per micro-batch and process", "optimisation")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", "optimisation")
    max_steps: int = option(1000, "optimizer steps of the run", "optimisation")
    lr: float = option(3e-3, "peak learning rate", "optimisation")
    min_lr_ratio: float = option(0.1, "final learning rate / peak, in [0, 1]", "optimisation")
    schedule: str = option("wsd", "learning-rate schedule (wsd: warmup-stable-decay)", "optimisation",
                           choices=("wsd", "cosine", "constant"))
    warmup_steps: int = option(50, "linear warmup steps", "optimisation")
    decay_fraction: float = option(0.2, "wsd: share of the steps spent decaying, in [0, 1]", "optimisation")
    decay_type: str = option("exponential", "wsd: shape of the decay", "optimisation",
                             choices=("exponential", "linear"))
    weight_decay: float = option(0.1, "AdamW weight decay (not on norms, biases, the tied embedding)", "optimisation")
    beta1: float = option(0.9, "AdamW beta1", "optimisation")
    beta2: float = option(0.95, "AdamW beta2", "optimisation")
    adam_eps: float = option(1e-8, "AdamW epsilon", "optimisation")
    grad_clip: float = option(1.0, "gradient-norm clipping threshold (0 = off)", "optimisation")
    # Objective: None keeps the model config's value.
    aux_loss_type: str | None = option(None, "balancing loss (none = the model config's)", "optimisation",
                                       choices=(None, "reference", "switch"))
    aux_loss_coef: float | None = option(None, "balancing-loss coefficient (none = the model config's)",
                                         "optimisation")
    z_loss_coef: float | None = option(None, "router z-loss coefficient (none = the model config's)", "optimisation")
    bf16: bool = option(False, "bf16 autocast (weights stay fp32)", "optimisation")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)",
                                          "optimisation")
    seed: int = option(0, "seed of initialisation and data order", "optimisation")
    # Execution.
    device: str = option("auto", "where to train (auto: CUDA when present)", "parallelism",
                         choices=("auto", "cpu", "cuda"))
    pp: int = option(1, "pipeline stages (processes per pipeline); data parallel = processes / (pp)", "parallelism")
    pp_schedule: str = option("1f1b", "pipeline schedule (interleaved1f1b: 2 stages per process)", "parallelism",
                              choices=("1f1b", "interleaved1f1b", "gpipe"))
    microbatches: int = option(0, "with pp: pipeline micro-batches each batch_size batch is split into (0 = pp)",
                               "parallelism")
    ep: int = option(1, "expert parallelism: each expert module's experts split over groups of ep processes "
                     "(ep divides the process count and num_local_experts)", "parallelism")
    # Output, checkpoints, logging.
    out_dir: str = option("runs/jetmoe", "the run's folder: checkpoints, metrics, plots", "checkpoints")
    export_dir: str | None = option(None, "at the end, copy the final model + tokenizer (no optimizer) here; "
                                    "with LoRA the merged model", "checkpoints")
    save_every: int = option(200, "steps between checkpoints", "checkpoints")
    keep_checkpoints: int = option(2, "checkpoints kept (older ones of this run are deleted)", "checkpoints")
    log_every: int = option(10, "steps between metrics lines", "logging")
    val_every: int = option(100, "steps between validations", "logging")
    val_batches: int = option(8, "batches per validation", "logging")
    progress: bool = option(True, "show a progress bar", "logging")
    plots: bool = option(True, "write loss and expert-load plots at the end", "logging")


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model=TINY_MODEL,
        seq_len=256,
        batch_size=16,
        max_steps=400,
        lr=3e-3,
        warmup_steps=20,
        decay_fraction=0.25,
        save_every=100,
        val_every=50,
        out_dir="runs/tiny",
    ),
    "jetmoe-8b": dict(
        model=JETMOE_8B_MODEL,
        seq_len=4096,
        batch_size=4,  # per GPU; reach ~1024 sequences per step through grad_accum x processes
        grad_accum=32,
        max_steps=300_000,
        lr=5e-4,
        min_lr_ratio=0.1,
        warmup_steps=2500,
        decay_fraction=0.2,
        decay_type="exponential",
        weight_decay=0.1,
        bf16=True,
        gradient_checkpointing=True,
        device="cuda",
        save_every=1000,
        val_every=1000,
        out_dir="runs/jetmoe-8b",
    ),
}

def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def choices_of(name: str) -> tuple | None:
    return TrainConfig.__dataclass_fields__[name].metadata.get("choices")


def _shown(choices: tuple) -> str:
    return ", ".join("null" if c is None else str(c) for c in choices)


@functools.lru_cache(maxsize=1)
def _model_defaults() -> dict[str, Any]:
    """Every key a JetMoeConfig has (its own fields and transformers' common ones), with the default values."""
    defaults = JetMoeConfig().to_dict()
    defaults.pop("transformers_version", None)
    return defaults


def model_field_names() -> list[str]:
    return sorted(_model_defaults())


def _unknown_key_error(keys: list[str], valid: list[str], where: str) -> ValueError:
    return ValueError(f"unknown {where} key(s) {sorted(keys)}; valid keys are: {', '.join(sorted(valid))}")


def apply_settings(config: TrainConfig, settings: dict[str, Any], where: str = "config") -> TrainConfig:
    """Set fields from a mapping; `model` merges into the model dict, dotted `model.x` keys too."""
    settings = dict(settings)
    for key in [k for k in settings if k.startswith("model.")]:
        settings.setdefault("model", {})
        settings["model"] = {**settings["model"], key[len("model.") :]: settings.pop(key)}
    unknown = [k for k in settings if k not in field_names()]
    if unknown:
        raise _unknown_key_error(unknown, field_names(), where)
    for key, value in settings.items():
        if key == "model":
            if not isinstance(value, dict):
                raise ValueError(f"{where}: `model` must be a mapping of JetMoeConfig fields, got {value!r}")
            valid = model_field_names()
            unknown = [k for k in value if valid and k not in valid]
            if unknown:
                raise _unknown_key_error(unknown, valid, f"{where} model")
            config.model = {**config.model, **{k: _coerce_model(k, v) for k, v in value.items()}}
        else:
            setattr(config, key, _coerce(key, copy.deepcopy(value), where))
    return config


def _coerce_model(name: str, value: Any) -> Any:
    """Numbers YAML left as text (`1e-5`) become numbers when the JetMoeConfig default is a number."""
    default = _model_defaults().get(name)
    if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return type(default)(float(value)) if isinstance(default, float) else int(value)
        except ValueError:
            return value
    return value


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check a value against the field's type; numbers written as text (YAML reads `3e-4` as a string) convert."""
    kind = TrainConfig.__dataclass_fields__[name].type
    optional = "None" in kind
    if value is None and optional:
        return None
    base = kind.replace("| None", "").strip()
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif base == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, (str, float)) and float(value) == int(float(value)):
                return int(float(value))
        elif base == "float":
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                return float(value)
        elif base == "str":
            if isinstance(value, str):
                return value
        elif base == "list":
            if isinstance(value, str):
                return [value]
            if isinstance(value, (list, tuple)):
                return list(value)
        else:
            return value
    except ValueError:
        pass
    raise ValueError(f"{where}: {name} must be {kind}, got {value!r}")


def load_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        tomllib = None
    toml_error = tomllib.TOMLDecodeError if tomllib else ValueError
    try:
        if path.endswith(".toml"):
            if tomllib is None:
                raise ValueError(f"config file {path!r}: TOML needs Python >= 3.11; use YAML")
            settings = tomllib.loads(raw.decode("utf-8"))
        elif path.endswith((".yaml", ".yml", ".json")):
            settings = yaml.safe_load(raw) or {}
        else:
            raise ValueError(f"config file {path!r}: use a .yaml, .yml, .toml or .json file")
    except (toml_error, yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {path!r} is not valid: {error}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of settings, got {type(settings).__name__}")
    return settings


def build_config(
    preset: str | None = None, file: str | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Preset (the file's `preset` key if none is given), then the file, then the overrides; then validate."""
    file_settings = load_file(file) if file else {}
    preset = preset or file_settings.pop("preset", None) or "tiny"
    file_settings.pop("preset", None)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    # A preset's model replaces the default one whole (its keys are not merged into another geometry's).
    config = apply_settings(TrainConfig(model={}), PRESETS[preset], where=f"preset {preset}")
    if file_settings:
        apply_settings(config, file_settings, where=f"config file {file}")
    if overrides:
        apply_settings(config, overrides, where="command-line")
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    for spec in dataclasses.fields(TrainConfig):
        choices = spec.metadata.get("choices")
        value = getattr(config, spec.name)
        if choices is None:
            continue
        bad = [v for v in value if v not in choices] if isinstance(value, list) else [value] * (value not in choices)
        if bad:
            raise ValueError(f"{spec.name} ({flag_name(spec.name)}) must be one of {_shown(choices)}; got {bad[0]!r}")
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "save_every", "log_every", "val_every",
                 "val_batches", "keep_checkpoints", "lora_rank", "pp", "ep"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr!r}")
    if not 0 <= config.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {config.min_lr_ratio!r}")
    if not 0 <= config.decay_fraction <= 1:
        raise ValueError(f"decay_fraction must be in [0, 1], got {config.decay_fraction!r}")
    if not 0 <= config.val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {config.val_fraction!r}")
    if config.warmup_steps < 0 or config.grad_clip < 0 or config.weight_decay < 0:
        raise ValueError("warmup_steps, grad_clip and weight_decay must be >= 0")
    if isinstance(config.data, str):
        config.data = [config.data]
    from .mixture import parse_mixture

    parse_mixture(list(config.data), list(config.data_phases))  # checks the weights and phases (errors name them)
    if config.lora and not (config.lora_target_modules or config.lora_target_experts):
        raise ValueError("lora: no targets (lora_target_modules and lora_target_experts are both empty)")
    if config.lora and config.lora_dropout and config.lora_target_experts:
        raise ValueError(f"lora_dropout {config.lora_dropout}: peft applies no dropout to expert weights "
                         "(lora_target_experts); set lora_dropout 0 or lora_target_experts to none")
    if config.lora and not config.init_from:
        raise ValueError("lora fine-tunes a trained model: set init_from to an HF-format JetMoE checkpoint")
    if isinstance(config.microbatches, bool) or not isinstance(config.microbatches, int) or config.microbatches < 0:
        raise ValueError(f"microbatches must be a positive integer (or 0: as many as pp), got {config.microbatches!r}")
    if config.microbatches == 0:
        config.microbatches = config.pp
    if config.microbatches > 1 and config.pp == 1:
        raise ValueError(f"microbatches {config.microbatches} splits a pipeline's batch and needs pp > 1; "
                         "without pipeline parallelism use grad_accum")
    if config.batch_size % config.microbatches:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by microbatches {config.microbatches}")
    if config.pp > 1 and config.pp_schedule == "1f1b" and config.microbatches < config.pp:
        raise ValueError(f"pp_schedule 1f1b needs microbatches >= pp: got microbatches {config.microbatches}, "
                         f"pp {config.pp}")
    if config.pp > 1 and config.ep > 1:
        raise ValueError(f"pp {config.pp} with ep {config.ep}: pipeline and expert parallelism together are not "
                         "supported; use one of them (each composes with data parallelism)")
    if config.pp > 1 and config.lora:
        raise ValueError("lora is not supported with pipeline parallelism (pp > 1): use pp 1")


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(json.loads(json.dumps(to_dict(config))), sort_keys=False)


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalars and lists (`3e-4`, `true`, `[a, b]`, `null`)."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
