"""Training throughput against a raw forward+backward of the same model, in one process.

    python benchmarks/bench_training.py [--preset tiny] [--steps 20] [--threads N] [--set key=value ...]

raw:     model(ids, labels=ids, output_router_logits=True).loss.backward() on random ids, nothing else;
raw+opt: the same plus clip_grad_norm_ and AdamW.step (what any training loop must do);
trainer: `jetmoe train`'s loop (data from the token file, loss terms, metrics, clipping, AdamW, schedule),
         timed from its own tokens/s over steps that do no validation or checkpointing.
Each is measured after warm-up steps. Numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

import jetmoe
from jetmoe.training.config import build_config, parse_value
from jetmoe.training.distributed import pick_device
from jetmoe.training.trainer import train


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def raw_tokens_per_s(config, steps: int, optimizer_step: bool, device: torch.device) -> float:
    torch.manual_seed(0)
    model = jetmoe.JetMoeForCausalLM(jetmoe.JetMoeConfig(**config.model)).to(device).train()
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    ids = torch.randint(4, config.model["vocab_size"], (config.batch_size, config.seq_len), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            out = model(ids, labels=ids, output_router_logits=True, use_cache=False)
        out.loss.backward()
        if optimizer_step:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * config.batch_size * config.seq_len / (time.perf_counter() - start)


def trainer_tokens_per_s(config, steps: int) -> float:
    with tempfile.TemporaryDirectory() as out_dir:
        warmup = 3
        run = build_config(None, None, None)
        for key, value in vars(config).items():
            setattr(run, key, value)
        run.out_dir, run.max_steps, run.log_every = out_dir, warmup + steps, warmup + steps
        run.val_every = run.save_every = 10**9  # only the final step validates and saves, after the timing
        run.progress, run.plots, run.export_dir = False, False, None
        # tokens/s of the last log line covers every step since the previous one: time the steps directly.
        marks = []
        import jetmoe.training.trainer as trainer_module

        original = trainer_module.Throughput.add

        def add(self, tokens):
            marks.append(time.perf_counter())
            original(self, tokens)

        trainer_module.Throughput.add = add
        try:
            train(run)
        finally:
            trainer_module.Throughput.add = original
        timed = marks[warmup - 1 :]  # from the end of the last warm-up step to the end of the last step
        return steps * config.batch_size * config.grad_accum * config.seq_len / (timed[-1] - timed[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides, as for `jetmoe train --set`")
    args = parser.parse_args()
    from jetmoe.cpu_runtime import apply_cpu_defaults

    apply_cpu_defaults()  # as the jetmoe command line does
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.settings:
        key, _, value = item.partition("=")
        overrides[key] = parse_value(value)
    config = build_config(args.preset, None, overrides)
    device = pick_device(config.device, 0)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "model": config.model,
        "bf16": config.bf16,
        "gradient_checkpointing": config.gradient_checkpointing,
        "tokens_per_step": config.batch_size * config.grad_accum * config.seq_len,
        "raw_fwd_bwd_tok_s": raw_tokens_per_s(config, args.steps, optimizer_step=False, device=device),
        "raw_fwd_bwd_adamw_tok_s": raw_tokens_per_s(config, args.steps, optimizer_step=True, device=device),
        "trainer_tok_s": trainer_tokens_per_s(config, args.steps),
    }
    results["trainer_vs_raw_fwd_bwd"] = results["trainer_tok_s"] / results["raw_fwd_bwd_tok_s"]
    results["trainer_vs_raw_fwd_bwd_adamw"] = results["trainer_tok_s"] / results["raw_fwd_bwd_adamw_tok_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
