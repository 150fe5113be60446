"""The training loop: build or load the model, then step: micro-batches, clip, AdamW, schedule, log, validate, save.

One optimizer step consumes a global batch of batch_size x grad_accum x replicas packed sequences (replicas: the
processes, or processes / pp with pipeline parallelism, see pipeline.py). Its loss is the cross-entropy over all
of the batch's target tokens plus aux_loss_coef x the balancing loss averaged over micro-batches (see
objective.py), so the same global batch in the same micro-batches gives the same step whatever the layout.
"""

from __future__ import annotations

import math
import os
import time

import torch

from .. import JetMoeConfig, JetMoeForCausalLM  # the public classes only
from ..environment import warn_if_bf16_emulated
from ..modeling.routing import experts_per_token
from . import checkpoint as ckpt
from .config import TrainConfig, dump_yaml
from .data import PackedSequences, prepare_data, step_positions
from .distributed import Runtime, init_runtime, shard_model, shutdown
from .materialize import CheckpointSlices, RandomInit, materialize, meta_model, peak_host_memory_bytes
from .metrics import ExpertLoad, MetricsLog, Progress, Throughput, perplexity, plot
from . import pipeline
from .objective import compute_terms, count_targets, micro_batch_loss
from .optim import build_optimizer, clip_gradients
from .schedule import build_scheduler


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, out of memory): the message says why and what to try."""


def train(config: TrainConfig, resume: bool = False, start_if_none: bool = False) -> dict:
    """Run (or resume) training as configured. Returns a summary (final step, losses, timings, paths).

    `resume`: continue from the newest usable checkpoint in out_dir, falling back past damaged ones; if none is
    usable, a CheckpointError listing what was found, unless `start_if_none` (then a fresh start, which keeps
    the damaged checkpoints)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading / saving bars would break the training progress bar
    runtime = init_runtime(config.device)
    try:
        summary = _train(config, resume, start_if_none, runtime)
        runtime.barrier()  # leave together: tearing the process group down while a peer still works can abort it
        return summary
    finally:
        shutdown(runtime)


def _say(runtime: Runtime):
    def log(text: str) -> None:
        if runtime.is_main:
            print(text, flush=True)

    return log


def _train(config: TrainConfig, resume: bool, start_if_none: bool, runtime: Runtime) -> dict:
    log = _say(runtime)
    out_dir = config.out_dir
    if runtime.is_main:
        os.makedirs(out_dir, exist_ok=True)
    runtime.barrier()
    root = ckpt.checkpoint_root(out_dir)
    if resume and not start_if_none and not (os.path.isdir(root) and os.listdir(root)):
        raise ckpt.CheckpointError(f"--resume: there is no checkpoint under {root} "
                                   "(pass --resume-or-start to start from scratch when there is none)")

    replicas, replica = pipeline.data_parallel(config, runtime)  # pp: the processes of a pipeline read the same data
    global_batch = config.batch_size * config.grad_accum * replicas
    tokenizer, data = prepare_data(config, out_dir, runtime.is_main, runtime.barrier, log, global_batch)
    if data.num_train < global_batch:
        raise ValueError(
            f"a step needs {global_batch} sequences (batch_size {config.batch_size} x grad_accum "
            f"{config.grad_accum} x {replicas} data-parallel replicas) but the training split holds only {data.num_train} "
            f"sequences of {config.seq_len} tokens: use more data, a shorter seq_len or a smaller batch"
        )

    found, state = None, None
    if resume:
        found, restored, skipped = _restore(config, tokenizer, runtime, log)
        if found is None:
            listing = "; ".join(skipped) or "nothing"
            if not start_if_none:
                raise ckpt.CheckpointError(
                    f"--resume found no usable checkpoint under {root}: {listing}. Repair or move them, or pass "
                    "--resume-or-start to start from scratch (the damaged checkpoints are kept)"
                )
            log(f"no usable checkpoint under {root} ({listing}): starting from scratch; the damaged ones are kept")
        else:
            model, lora_scaling, optimizer, scheduler, state = restored
    if found is None:
        model, lora_scaling = build_model(config, tokenizer, None, log, runtime)
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config)
        torch.manual_seed(config.seed)

    peaks = runtime.gather(peak_host_memory_bytes())
    log("model ready; peak host memory per process so far: " + ", ".join(f"{p / 2**20:.0f} MiB" for p in peaks))
    step, position, tokens_seen, elapsed_before = 0, 0, 0, 0.0
    if state is not None:
        step, position = state["step"], state["position"]
        tokens_seen, elapsed_before = state.get("tokens_seen", 0), state.get("elapsed_s", 0.0)
        if state.get("global_batch", global_batch) != global_batch:
            log(f"warning: the checkpoint was trained with a global batch of {state['global_batch']} sequences "
                f"({state.get('world', '?')} processes), this run's is {global_batch}: the data order goes on from "
                "the same position, but the steps differ from the original run's (set grad_accum to keep the batch)")
    owned = ckpt.lineage(found)  # the checkpoints this run may replace or prune

    top_k = experts_per_token(model)
    aux_coef = _model_config(model).aux_loss_coef
    metrics = MetricsLog(out_dir, runtime.is_main, step if found else None)
    progress = Progress(config.progress, config.max_steps, step, runtime.is_main)
    expert_load = ExpertLoad()
    throughput = Throughput()
    config_yaml = dump_yaml(config)
    autocast = _autocast(config, runtime.device)
    started = time.perf_counter()
    last = {}
    rate = float("nan")  # tokens/s over the last logging interval, shown on the bar
    val_result = None

    def save() -> str:
        elapsed = elapsed_before + time.perf_counter() - started
        state = {"step": step, "position": position, "tokens_seen": tokens_seen, "elapsed_s": elapsed,
                 "world": runtime.world, "global_batch": global_batch}
        path = ckpt.save_checkpoint(
            out_dir=out_dir, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
            tokenizer=tokenizer, trainer_state=state, config_yaml=config_yaml, runtime=runtime,
            lora_scaling=lora_scaling, keep=config.keep_checkpoints, owned=owned, log=log,
        )
        progress.write(f"step {step}: saved checkpoint {path}")
        return path

    saved_path = found.path if found else None
    mixture = _MixtureLog(data, position)
    while step < config.max_steps:
        model.train()
        micro = [
            data.train_batch(position + step_positions(0, config.batch_size, config.grad_accum, replicas, replica, m), config.batch_size)
            for m in range(config.grad_accum)
        ]
        # Every process counted its replica's targets: the pp processes of a replica the same ones.
        global_targets = int(runtime.sum([float(sum(count_targets(labels) for _, labels in micro))])[0]) // config.pp
        ce_sum = aux_sum = z_sum = 0.0
        try:
            if config.pp > 1:  # the schedule runs forward and backward of every pipeline micro-batch
                ce_sum, aux_sum, z_sum = model.train_step(micro, global_targets, aux_coef, autocast)
                expert_load.add_counts(model.take_router_counts())
            for index, (ids, labels) in enumerate(micro if config.pp == 1 else ()):
                if runtime.distributed:  # reduce-scatter gradients once, after the last micro-batch
                    model.set_requires_gradient_sync(index == len(micro) - 1)
                with autocast:
                    output = model(input_ids=ids.to(runtime.device), output_router_logits=True, use_cache=False)
                terms = compute_terms(output, labels.to(runtime.device))
                micro_batch_loss(terms, global_targets, aux_coef, config.grad_accum, runtime.world).backward()
                ce_sum += float(terms.ce_sum.detach())
                aux_sum += float(terms.aux.detach())
                z_sum += float(terms.z_loss)
                expert_load.add(output.router_logits, top_k)
        except torch.OutOfMemoryError as error:
            raise TrainingError(
                f"out of memory at step {step} with batch_size {config.batch_size} x seq_len {config.seq_len}: "
                "lower batch_size (raise grad_accum to keep the global batch), enable gradient_checkpointing "
                "or bf16, or add processes"
            ) from error
        ce_total, aux_total, z_total = runtime.sum([ce_sum, aux_sum, z_sum])
        micro_count = config.grad_accum * replicas * (config.microbatches if config.pp > 1 else 1)
        ce = ce_total / max(1, global_targets)
        aux = aux_total / micro_count
        loss = ce + aux_coef * aux
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss is {loss} at step {step + 1} (cross-entropy {ce}, balancing {aux}) with lr "
                f"{scheduler.get_last_lr()[0]:.3g}: lower lr, keep grad_clip on, check the data; "
                f"the last good checkpoint is {saved_path or 'none'} (resume from it with --resume)"
            )
        grad_norm = model.clip_gradients(config.grad_clip) if config.pp > 1 else clip_gradients(model, config.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        position += global_batch
        tokens_seen += global_batch * config.seq_len
        throughput.add(global_batch * config.seq_len)

        last = {"step": step, "loss": loss, "ce": ce, "aux": aux, "z_loss": z_total / micro_count,
                "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen}
        if step % config.log_every == 0 or step == config.max_steps:
            last["tokens_per_s"] = rate = throughput.take()
            last["elapsed_s"] = elapsed_before + time.perf_counter() - started
            last["expert_load"] = expert_load.take(runtime)
            if mixture.enabled:
                last["mixture"] = mixture.take(position)
            metrics.write(last)
        progress.update(1, loss=loss, aux=aux, lr=lr, tok_s=rate)

        if mixture.enabled and step < config.max_steps and data.phase_at(step + 1) is not data.phase_at(step):
            progress.write(f"step {step}: data mixture now {mixture.describe(step + 1)}")
        if step % config.val_every == 0 or step == config.max_steps:
            val_result = validate(model, data, config, runtime, autocast)
            if val_result is not None:
                metrics.write({"step": step, **val_result})
                progress.write(f"step {step}: validation loss {val_result['val_loss']:.4f}, perplexity {val_result['val_ppl']:.2f}")
        if step % config.save_every == 0 or step == config.max_steps:
            saved_path = save()

    progress.close()
    elapsed = elapsed_before + time.perf_counter() - started
    summary = {"step": step, "out_dir": out_dir, "checkpoint": saved_path, "elapsed_s": elapsed,
               "tokens_seen": tokens_seen, **{k: v for k, v in last.items() if k not in ("expert_load", "mixture")}}
    if mixture.enabled:
        summary["mixture"] = mixture.total(position)  # the realised shares of every sequence this run drew
    if val_result:
        summary.update(val_result)
    if runtime.is_main:
        if config.plots:
            plot(out_dir)
        if config.export_dir:
            export(saved_path, config.export_dir)
            log(f"exported the model and tokenizer to {config.export_dir}")
    return summary


class _MixtureLog:
    """The realised mixture: each source's share of the sequences drawn (by all processes) since the last take."""

    def __init__(self, data, position: int):
        self.data, self.enabled = data, hasattr(data, "counts")
        self.start = self.last = position

    def _shares(self, begin: int, end: int) -> dict[str, float]:
        drawn = self.data.counts(end) - self.data.counts(begin)
        return {name: float(n) / max(1, int(drawn.sum())) for name, n in zip(self.data.names, drawn)}

    def take(self, position: int) -> dict[str, float]:
        shares, self.last = self._shares(self.last, position), position
        return shares

    def total(self, position: int) -> dict[str, float]:
        return self._shares(self.start, position)

    def describe(self, step: int) -> str:
        from .mixture import describe

        return describe(self.data.names, self.data.phase_at(step).weights)


def _restore(config: TrainConfig, tokenizer, runtime: Runtime, log):
    """Load the newest checkpoint that loads whole, falling back past each one that does not.

    Returns (found, (model, lora scaling, optimizer, scheduler, trainer state), skipped) or (None, None, skipped),
    `skipped` describing every checkpoint passed over. All processes check the same files, so they agree on
    the candidates; after each loading step they also agree on whether any of them failed."""
    skipped: list[str] = []
    for found in ckpt.candidates(config.out_dir, log, skipped):
        log(f"resuming from {found.path}")
        error = None
        try:
            model, lora_scaling = build_model(config, tokenizer, found.path, log, runtime)
        except ckpt.DamagedCheckpoint as caught:
            error = caught
        if _any_failed(runtime, error):
            ckpt.report_unusable(found, str(error or "another process could not load its model"), log, skipped)
            continue
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config)
        try:
            state = ckpt.load_training_state(found.path, model, optimizer, scheduler, runtime)
        except ckpt.DamagedCheckpoint as caught:
            error = caught
        if _any_failed(runtime, error):
            ckpt.report_unusable(found, str(error or "another process could not load its state"), log, skipped)
            continue
        return found, (model, lora_scaling, optimizer, scheduler, state), skipped
    return None, None, skipped


def _any_failed(runtime: Runtime, error: BaseException | None) -> bool:
    mine = 1.0 if error is not None else 0.0
    return (runtime.sum([mine])[0] if runtime.distributed else mine) > 0


def validate(model, data: PackedSequences, config: TrainConfig, runtime: Runtime, autocast) -> dict | None:
    """Mean cross-entropy and perplexity over the validation sequences (the same set for any process count)."""
    if isinstance(model, pipeline.PipelineModel):
        return model.validate(data, config, runtime, autocast)
    if len(data.val_ids) == 0:
        return None
    model.eval()
    ce_sum, targets = 0.0, 0
    with torch.no_grad():
        for ids, labels in data.val_batches(config.batch_size, config.val_batches, runtime.rank, runtime.world):
            with autocast:
                output = model(input_ids=ids.to(runtime.device), use_cache=False)
            terms = compute_terms(output, labels.to(runtime.device))
            ce_sum += float(terms.ce_sum)
            targets += terms.targets
    ce_total, target_total = runtime.sum([ce_sum, float(targets)])
    model.train()
    if target_total == 0:
        return None
    mean = ce_total / target_total
    return {"val_loss": mean, "val_ppl": perplexity(mean), "val_tokens": int(target_total)}


def _autocast(config: TrainConfig, device: torch.device):
    if config.bf16:
        warn_if_bf16_emulated(torch.bfloat16, device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16)


def _model_config(model) -> JetMoeConfig:
    return model.config if not hasattr(model, "get_base_model") else model.get_base_model().config


def build_model(config: TrainConfig, tokenizer, resume_folder: str | None, log=print, runtime: Runtime | None = None):
    """The model to train (a checkpoint to resume, a model to fine-tune, or a fresh one), sharded across the
    processes. It is built on the meta device, sharded, then materialised (materialize.py): each process
    allocates and initialises, or reads from the checkpoint, only the parameters it owns, with the same
    values whatever the layout. LoRA runs still load the whole model in each process first.
    Returns (model, lora scaling)."""
    runtime = runtime or Runtime(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    # Whatever is initialised randomly (LoRA's A matrices) is the same in every process and run.
    torch.manual_seed(config.seed)
    if config.lora:
        return _build_lora_model(config, tokenizer, resume_folder, log, runtime)
    if resume_folder:
        model_config = _checkpoint_config(resume_folder)
        if not config.init_from or os.path.isdir(config.init_from):  # the fine-tuned model may be gone: no check
            _check_same_architecture(_fresh_config(config, tokenizer, lambda _: None), model_config, resume_folder)
        source = CheckpointSlices(resume_folder, error=ckpt.DamagedCheckpoint)
    else:
        model_config = _fresh_config(config, tokenizer, log)
        source = CheckpointSlices(config.init_from) if config.init_from else None
    _configure(model_config, config, tokenizer)
    model = meta_model(model_config)
    _enable_gradient_checkpointing(model, config)
    source = source or RandomInit(config.seed, model)  # (of the whole model: every parameter's name and kind)
    if config.pp > 1:  # this process's pipeline stages, still on meta
        model = pipeline.parallelize(model, config, runtime)
        materialize(model, runtime.device, source, name_of=model.hf_name)
    else:
        model = shard_model(model, runtime, config.ep)
        materialize(model, runtime.device, source)
    return model, None


def _fresh_config(config: TrainConfig, tokenizer, log=print) -> JetMoeConfig:
    """The model config of a fresh start: the fine-tuned checkpoint's, or the run's fields fitted to the tokenizer."""
    if config.init_from:
        if not os.path.isdir(config.init_from):
            raise FileNotFoundError(f"init_from {config.init_from!r} is not a folder holding an HF-format checkpoint")
        return JetMoeConfig.from_pretrained(config.init_from)
    fields = dict(config.model)
    if len(tokenizer) != fields.get("vocab_size"):
        log(f"vocab_size set to the tokenizer's {len(tokenizer)} (was {fields.get('vocab_size')})")
        fields["vocab_size"] = len(tokenizer)
    fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return JetMoeConfig(**fields)


def _checkpoint_config(folder: str) -> JetMoeConfig:
    try:
        return JetMoeConfig.from_pretrained(folder)
    except Exception as error:  # whatever transformers raises for a config that does not load
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise ckpt.DamagedCheckpoint(f"its config.json does not load ({reason})") from None


# The fields that fix the parameters' shapes and names: a resumed run must agree with its checkpoint on them.
_ARCHITECTURE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "kv_channels",
                 "intermediate_size", "num_local_experts", "num_experts_per_tok", "tie_word_embeddings")


def _check_same_architecture(expected: JetMoeConfig, saved: JetMoeConfig, folder: str) -> None:
    differ = [f"{key} {getattr(saved, key, None)!r} (this run: {getattr(expected, key, None)!r})"
              for key in _ARCHITECTURE if getattr(saved, key, None) != getattr(expected, key, None)]
    if differ:
        raise ckpt.CheckpointError(
            f"cannot resume from {folder}: its model differs from this run's config in " + ", ".join(differ)
            + "; resume with the checkpoint's model settings, or start a new out_dir"
        )


def _configure(model_config: JetMoeConfig, config: TrainConfig, tokenizer) -> None:
    """Check the model against the run, and record the objective's settings on the model config."""
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model_config.vocab_size}")
    if config.seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"seq_len {config.seq_len} is above the model's max_position_embeddings "
            f"{model_config.max_position_embeddings}: lower seq_len (or build the model with a larger max_position_embeddings)"
        )
    # The objective's settings live on the model config, so the saved checkpoint records what it was trained with.
    if config.aux_loss_type is not None:
        model_config.router_aux_loss_type = config.aux_loss_type
    if config.aux_loss_coef is not None:
        model_config.aux_loss_coef = config.aux_loss_coef
    if config.z_loss_coef is not None:
        model_config.router_z_loss_coef = config.z_loss_coef
    model_config.validate_architecture()
    model_config.use_cache = True  # for whoever generates with the saved model; training passes use_cache=False


def _enable_gradient_checkpointing(model, config: TrainConfig) -> None:
    if config.gradient_checkpointing:
        # transformers >= 5.x names it activation_checkpointing_enable (gradient_checkpointing_enable is its
        # deprecated alias, which older versions only have).
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _build_lora_model(config: TrainConfig, tokenizer, resume_folder: str | None, log, runtime: Runtime):
    """LoRA: the whole base model is loaded in each process (peft wraps real modules), then sharded."""
    if config.init_from:
        if not os.path.isdir(config.init_from):
            raise FileNotFoundError(f"init_from {config.init_from!r} is not a folder holding an HF-format checkpoint")
        model = JetMoeForCausalLM.from_pretrained(config.init_from, dtype=torch.float32)
    else:
        model = meta_model(_fresh_config(config, tokenizer, log))
        model = materialize(model, torch.device("cpu"), RandomInit(config.seed, model))
    _configure(model.config, config, tokenizer)
    _enable_gradient_checkpointing(model, config)
    model, lora_scaling = _add_lora(model, config, resume_folder)
    return shard_model(model, runtime, config.ep), lora_scaling


def _add_lora(model, config: TrainConfig, resume_folder: str | None):
    """peft LoRA on the dense `lora_target_modules` (lora.Linear) and the expert weights `lora_target_experts`
    (peft's `target_parameters`: a ParamWrapper parametrizes the [E, out, in] weight as W + scaling * B_e @ A_e
    during the forward, so the grouped kernels see the adapted weight and autograd reaches A and B)."""
    try:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    except ImportError:
        raise ValueError("lora needs peft: pip install 'jetmoe[train]'") from None
    from .config import LORA_EXPERTS

    lora_config = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        target_parameters=[LORA_EXPERTS[name] for name in config.lora_target_experts] or None,
        bias="none", task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora_config)
    except ValueError as error:
        raise ValueError(f"lora_target_modules {config.lora_target_modules} / lora_target_experts "
                         f"{config.lora_target_experts}: {error}") from None
    if resume_folder:
        from safetensors.torch import load_file

        try:
            set_peft_model_state_dict(model, load_file(os.path.join(resume_folder, "adapter", "adapter_model.safetensors")))
        except Exception as error:  # safetensors' or peft's errors for an adapter that does not load
            raise ckpt.DamagedCheckpoint(f"adapter/ does not load ({type(error).__name__}: {error})") from None
    return model, config.lora_alpha / config.lora_rank


def export(checkpoint_folder: str | None, export_dir: str) -> None:
    """Copy a checkpoint's model and tokenizer (no optimizer or trainer state) into `export_dir`."""
    import shutil

    if checkpoint_folder is None:
        raise ValueError("nothing to export: no checkpoint was written")
    os.makedirs(export_dir, exist_ok=True)
    for name in sorted(os.listdir(checkpoint_folder)):
        source = os.path.join(checkpoint_folder, name)
        if os.path.isfile(source) and (name.endswith((".json", ".safetensors", ".jinja")) or name.startswith("tokenizer")):
            if name in ("trainer_state.json", ckpt.MANIFEST):
                continue
            shutil.copyfile(source, os.path.join(export_dir, name))
