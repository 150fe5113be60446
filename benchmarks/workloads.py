"""The measured workloads. Each returns a callable doing one timed run, and the tokens that run processes.

Every workload calls only the public transformers-style API (forward, generate), so the reference and
ours run exactly the same code around the model.
"""

from __future__ import annotations

import gc
import re
import resource
import time
from dataclasses import dataclass

import torch

from machine import synchronize

LEARNING_RATE = 1e-5


@dataclass(frozen=True)
class Shapes:
    prefill_batch: int = 4
    prefill_len: int = 512
    train_batch: int = 2
    train_len: int = 512
    prompt_len: int = 32
    new_tokens: int = 48


def token_ids(vocab: int, batch: int, length: int, device: torch.device, seed: int) -> torch.Tensor:
    """Random token ids, the same for both models (a fixed seed per workload)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


def prefill(model, shapes: Shapes, device: torch.device):
    """One no-grad forward over prefill_batch x prefill_len tokens (full logits, default arguments)."""
    ids = token_ids(model.config.vocab_size, shapes.prefill_batch, shapes.prefill_len, device, seed=1)

    def run():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)

    return run, ids.numel()


def train_step(model, optimizer, ids: torch.Tensor) -> None:
    """Forward with labels and router logits (so the balancing loss is in the loss), backward, AdamW step."""
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _primed_optimizer(model) -> torch.optim.AdamW:
    """An AdamW whose state already exists, so the timed step is a steady-state step.

    AdamW allocates its moments lazily in the first step(). That first step is done here on zero
    gradients with lr=0, which leaves every weight exactly unchanged (decay factor 1 - 0*wd, update -0*...).
    A fresh optimizer per run keeps only one model's gradients and moments in memory at a time.
    The fused kernel (CPU and CUDA) is what a user who cares about speed picks, and the same for both
    models: torch's default per-tensor loop took 2.6 s of a 5 s bf16 step of the "small" config on the
    2-core CPU, an identical cost in both that would only hide the models' difference.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group in optimizer.param_groups:
        group["lr"] = LEARNING_RATE
    return optimizer


def train(model, shapes: Shapes, device: torch.device):
    """One optimizer step on train_batch x train_len tokens. Only the step is timed, not the priming."""
    ids = token_ids(model.config.vocab_size, shapes.train_batch, shapes.train_len, device, seed=2)
    state = {}

    def setup():
        model.train()
        state["optimizer"] = _primed_optimizer(model)

    def run():
        train_step(model, state["optimizer"], ids)

    def teardown():
        state.clear()
        model.zero_grad(set_to_none=True)
        model.eval()
        gc.collect()

    return (setup, run, teardown), ids.numel()


def decode(model, shapes: Shapes, batch: int, device: torch.device):
    """generate() from a prompt_len-token prompt to exactly new_tokens greedy tokens per sequence.

    Tokens counted: batch * new_tokens; the time includes the prompt's prefill, as a caller of generate() sees.
    """
    ids = token_ids(model.config.vocab_size, batch, shapes.prompt_len, device, seed=3 + batch)
    mask = torch.ones_like(ids)

    def run():
        model.eval()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=shapes.new_tokens,
            min_new_tokens=shapes.new_tokens,
            pad_token_id=0,
        )
        if out.shape != (batch, shapes.prompt_len + shapes.new_tokens):
            raise RuntimeError(f"generate() returned shape {tuple(out.shape)}, expected "
                               f"{(batch, shapes.prompt_len + shapes.new_tokens)}")

    return run, batch * shapes.new_tokens


def timed(run, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


# --- training peak memory -------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM (peak RSS) to the current RSS when "5" is written to clear_refs (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def training_peak_memory(model, shapes: Shapes, device: torch.device, steps: int = 2) -> dict:
    """Peak memory of `steps` training steps with a fresh AdamW, beyond the loaded model.

    Meant to run in a fresh process that holds this one model only (bench_model.py --memory-probe), so that
    no other model, earlier measurement or allocator cache is in the figure. The steps include the first,
    which allocates the AdamW moments, and a second, which holds the moments, the gradients and the
    activations at once.
    CPU: peak resident set size (VmHWM) minus the resident set size after loading, with the peak reset
    just before the steps; where the reset is not allowed, ru_maxrss of the process (which then also
    counts the load) is used instead. CUDA: torch.cuda.max_memory_allocated minus memory_allocated before.
    """
    ids = token_ids(model.config.vocab_size, shapes.train_batch, shapes.train_len, device, seed=2)
    model.train()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        exact = _reset_peak_rss()
        baseline = _proc_status_kib("VmRSS") * 1024
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)
    for _ in range(steps):
        train_step(model, optimizer, ids)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak, method = torch.cuda.max_memory_allocated(device), "cuda.max_memory_allocated"
    elif exact:
        peak, method = _proc_status_kib("VmHWM") * 1024, "VmHWM after reset"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss (includes load)"
    return {"baseline_bytes": baseline, "peak_bytes": peak, "delta_bytes": peak - baseline, "method": method}
