"""Side-by-side benchmark: transformers' JetMoeForCausalLM (the reference, sdpa attention) against ours.

    python benchmarks/bench_model.py                      # everything, writes benchmarks/RESULTS.md
    make bench                                            # the same in three processes (see the Makefile)
    python benchmarks/bench_model.py --configs small --dtypes bf16 --measures prefill,decode1 --repeats 7
    python benchmarks/bench_model.py --device cuda --configs 8b-layers --dtypes bf16 --measures train,prefill
    python benchmarks/bench_model.py --device cuda --configs 8b-layers --dtypes bf16 --measures train --train-batch 16
    python benchmarks/bench_model.py --quick              # tiny config and shapes: checks the script in seconds

Method (one process for all timings):
- For each config one random-init checkpoint is written with the reference's save_pretrained (bf16) into a
  temporary directory; for each dtype both models are loaded from it with from_pretrained(dtype=...), so both
  hold the very same weights.
- Each measure first warms up both models at its shapes (oneDNN compiles kernels on the first call at a new
  shape; cold readings are several times off), then times `--repeats` runs alternating reference, ours,
  reference, ours, ... and reports the median of each and the ratio ours/reference. Measures run in the order
  prefill, decode1, decode8, train (training steps move the weights a little, so they come last).
- prefill: one no_grad forward of 4 x 512 tokens (default arguments, full logits); tokens/s = 2048 / time.
- train: forward with labels and output_router_logits=True (LM loss + aux_loss_coef * balancing loss),
  backward, fused AdamW step, zero_grad, on 2 x 512 tokens; tokens/s = 1024 / time. AdamW's moments are allocated
  before the timed step by a step on zero gradients at lr=0 (weights unchanged), so the timed step is a
  steady-state one; a fresh optimizer per run keeps one model's training state in memory at a time.
- decode1 / decode8: generate() at batch 1 / 8 from a 32-token random prompt, greedy, min_new_tokens =
  max_new_tokens = 48; tokens/s = batch * 48 / time (the time includes the prompt's prefill).
- train peak memory: for each model, a fresh process loads that model alone, makes its weights private
  resident copies (a weight still mapped from the checkpoint file would otherwise count once training first
  touches it), and runs two training steps with a fresh AdamW; the figure is the peak resident set size
  during the steps minus the resident set size before them (Linux VmHWM, reset through /proc/self/clear_refs
  right before the steps). It is the memory training adds on top of the weights: gradients, AdamW moments,
  activations and workspace. On CUDA: torch.cuda.max_memory_allocated minus memory_allocated before the steps.
- Weights: both models' large CPU weights sit on memory advised for transparent huge pages (ours does this at
  load, the reference's are moved there after loading). On heap pages, the model a process loaded first got
  physically scattered pages and decoded up to 20-65% slower than a later copy of the same weights: without
  this the order of loading would decide part of the ratio.
- CPU settings: by default the process applies jetmoe.cpu_runtime.apply_cpu_defaults(), as the jetmoe command
  line does: freed memory is kept for reuse (glibc's default returns every block over 32 MiB to the kernel,
  which faults and zeroes it again on the next step) and oneDNN keeps 8192 compiled matmul kernels instead of
  1024 (an MoE meets a new matmul shape at every new expert row count, and the reference's shapes would
  otherwise evict ours and ours the reference's). Both are process-wide, so they apply to both models alike;
  --cpu-defaults off measures PyTorch's and glibc's defaults.
Fractions of the machine's limits (see cost_model.py for the formulas):
- matmul peak: best FLOP/s of a square torch.matmul per dtype (2 n^3 FLOPs); bandwidth: the higher of a
  large fp32 copy (read + write bytes) and a large fp32 sum (read bytes), buffers far beyond the caches.
- prefill / train: MFU = tokens/s * FLOPs per token / matmul peak of the dtype, with FLOPs per token =
  2 * active matmul params (+ causal attention) forward, 3x that for training.
- decode: tokens/s / roofline, roofline = batch * bandwidth / weight bytes one decode step reads (embedding
  rows, kv_proj, routers, the experts the batch touches in both mixtures (k for one token), norms, biases,
  lm_head). For batch 8 the experts touched are the expected count under uniform routing.
- on a GPU with a known nominal bf16 peak (H100/H200: 989 TFLOP/s dense), prefill and training MFU against
  that peak as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helpers beside this script

import torch  # noqa: E402
import transformers  # noqa: E402

import jetmoe  # noqa: E402
import jetmoe.cpu_memory  # noqa: E402
import jetmoe.cpu_runtime  # noqa: E402
import machine  # noqa: E402
import workloads  # noqa: E402
from cost_model import Geometry  # noqa: E402
from workloads import Shapes  # noqa: E402

CONFIGS = {
    "small": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_key_value_heads=8, kv_channels=64,
                  intermediate_size=1408, num_local_experts=8, num_experts_per_tok=2),
    # jetmoe-8b's geometry with 2 of its 24 layers.
    "8b-layers": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=2, num_key_value_heads=16,
                      kv_channels=128, intermediate_size=5632, num_local_experts=8, num_experts_per_tok=2),
    # For --quick only: checks the script end to end in seconds, measures nothing meaningful.
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_key_value_heads=4, kv_channels=32,
                 intermediate_size=256, num_local_experts=8, num_experts_per_tok=2),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MEASURES = ("prefill", "train", "decode1", "decode8")
# Training steps change the weights (by about lr per step), so they run after the inference measures.
RUN_ORDER = ("prefill", "decode1", "decode8", "train")
IMPLS = ("reference", "ours")
FULL_SHAPES = Shapes()
QUICK_SHAPES = Shapes(prefill_batch=2, prefill_len=64, train_batch=2, train_len=64, prompt_len=8, new_tokens=8)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- models -----------------------------------------------------------------------------------------------


def save_checkpoint(fields: dict, directory: str) -> None:
    """One random-init checkpoint (the reference's init and save_pretrained), stored in bf16."""
    torch.manual_seed(0)
    model = transformers.JetMoeForCausalLM(transformers.JetMoeConfig(**fields))
    model.to(torch.bfloat16).save_pretrained(directory)
    del model
    gc.collect()


def load(impl: str, directory: str, dtype: torch.dtype, device: torch.device):
    cls = transformers.JetMoeForCausalLM if impl == "reference" else jetmoe.JetMoeForCausalLM
    model = cls.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    # Ours loads its large weights onto huge-page memory; the reference's get the same placement here, so
    # that where the pages landed is not part of the comparison (see jetmoe/cpu_memory.py).
    jetmoe.cpu_memory.place_on_huge_pages(model)
    return model


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        # With the CPU defaults the heap keeps its peak (training both models of "8b-layers" left ~15 GB of it),
        # and the memory probes' fresh processes need that memory: the 24 GiB machine killed the run.
        jetmoe.cpu_runtime.release_free_memory()


# --- measuring ----------------------------------------------------------------------------------------------


def workload(measure: str, model, shapes: Shapes, device: torch.device):
    """(setup, run, teardown), tokens per run. Only `run` is timed."""
    if measure == "train":
        return workloads.train(model, shapes, device)
    if measure == "prefill":
        run, tokens = workloads.prefill(model, shapes, device)
    else:
        run, tokens = workloads.decode(model, shapes, int(measure.removeprefix("decode")), device)
    return (lambda: None, run, lambda: None), tokens


def time_alternating(measure: str, models: dict, shapes: Shapes, device: torch.device, repeats: int,
                     warmup: int) -> dict:
    """Per implementation: the list of run times, after `warmup` untimed runs of each at the same shapes."""
    jobs = {impl: workload(measure, model, shapes, device) for impl, model in models.items()}
    for impl, ((setup, run, teardown), _) in jobs.items():
        for _ in range(warmup):
            setup()
            run()
            teardown()
    times = {impl: [] for impl in models}
    for _ in range(repeats):
        for impl, ((setup, run, teardown), _) in jobs.items():
            setup()
            times[impl].append(workloads.timed(run, device))
            teardown()
    tokens = next(iter(jobs.values()))[1]
    return {"times": times, "tokens": tokens}


def memory_probe_in_subprocess(impl: str, directory: str, dtype: str, device: torch.device, shapes: Shapes) -> dict:
    """Training peak memory of one model, measured in a fresh process (see workloads.training_peak_memory)."""
    request = {"impl": impl, "dir": directory, "dtype": dtype, "device": str(device), "shapes": shapes.__dict__}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--cpu-defaults", CPU_DEFAULTS[0],
                           "--memory-probe", json.dumps(request)],
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEMORY-PROBE ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe for {impl} {dtype} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("MEMORY-PROBE "))


def run_memory_probe(request: dict) -> None:
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    device = torch.device(request["device"])
    model = load(request["impl"], request["dir"], DTYPES[request["dtype"]], device)
    # Both models' weights become private resident copies before the baseline: a weight still mapped from the
    # checkpoint (the reference's, in the checkpoint's dtype) would otherwise enter the figure when training
    # first reads and writes it, while ours are already copied at load.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    result = workloads.training_peak_memory(model, Shapes(**request["shapes"]), device)
    print("MEMORY-PROBE " + json.dumps(result), flush=True)


# --- limits and rows ----------------------------------------------------------------------------------------


def flops_per_token(measure: str, geometry: Geometry, shapes: Shapes) -> float:
    if measure == "prefill":
        return geometry.forward_flops_per_token(shapes.prefill_len)
    return geometry.train_flops_per_token(shapes.train_len)


def limit_of(measure: str, geometry: Geometry, shapes: Shapes, dtype: str, limits: dict) -> tuple[float, str]:
    """(tokens/s that would be 100% of the machine's limit, description of the limit)."""
    if measure in ("prefill", "train"):
        flops = flops_per_token(measure, geometry, shapes)
        peak = limits["matmul"][dtype]["flops_per_s"]
        return peak / flops, f"MFU: {flops / 1e6:.0f} MFLOP/token vs {dtype} matmul peak {peak / 1e12:.2f} TFLOP/s"
    batch = int(measure.removeprefix("decode"))
    bytes_per_param = torch.finfo(DTYPES[dtype]).bits // 8
    bandwidth = limits["bandwidth"]["bytes_per_s"]
    roofline = geometry.decode_roofline_tokens_per_s(batch, bytes_per_param, bandwidth)
    step_bytes = geometry.decode_weight_bytes(batch, bytes_per_param)
    return roofline, (f"roofline {roofline:.1f} tok/s: {step_bytes / 2**20:.0f} MiB weights/step at "
                      f"{bandwidth / 1e9:.1f} GB/s")


def timing_row(config: str, dtype: str, measure: str, measured: dict, geometry: Geometry, shapes: Shapes,
               limits: dict, nominal_peak: float | None) -> dict:
    tokens = measured["tokens"]
    rate = {impl: tokens / statistics.median(measured["times"][impl]) for impl in IMPLS}
    at_limit, limit_text = limit_of(measure, geometry, shapes, dtype, limits)
    row = {
        "config": config, "dtype": dtype, "measure": f"{measure} tok/s",
        "reference": rate["reference"], "ours": rate["ours"], "ratio": rate["ours"] / rate["reference"],
        "ref_frac": rate["reference"] / at_limit, "ours_frac": rate["ours"] / at_limit, "limit": limit_text,
        "times": measured["times"],
    }
    if nominal_peak and dtype == "bf16" and measure in ("prefill", "train"):
        flops = flops_per_token(measure, geometry, shapes)
        row["nominal"] = {impl: rate[impl] * flops / nominal_peak for impl in IMPLS}
    return row


def memory_row(config: str, dtype: str, probes: dict) -> dict:
    mib = {impl: probes[impl]["delta_bytes"] / 2**20 for impl in IMPLS}
    method = probes["ours"]["method"]
    return {
        "config": config, "dtype": dtype, "measure": "train peak MiB",
        "reference": mib["reference"], "ours": mib["ours"], "ratio": mib["ours"] / mib["reference"],
        "limit": f"added to the loaded weights ({method}); lower is better",
    }


# --- report ------------------------------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def report(args, info: dict, limits: dict, rows: list[dict], shapes: Shapes, nominal_peak: float | None) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# jetmoe vs transformers JetMoe (sdpa)" + (" -- QUICK CHECK, not a measurement" if args.quick else ""),
        "",
        f"- date: {now}",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- device: {args.device}",
        f"- CPU defaults (jetmoe.cpu_runtime, both models): {CPU_DEFAULTS[0]}",
        *[f"- {key}: {value}" for key, value in info.items()],
        f"- shapes: prefill {shapes.prefill_batch}x{shapes.prefill_len}, train {shapes.train_batch}x"
        f"{shapes.train_len}, generate() prompt {shapes.prompt_len} + {shapes.new_tokens} new tokens; "
        f"median of {args.repeats} alternating runs after {args.warmup} warm-up run(s) each",
        "",
        "Machine limits (measured):",
        "",
        "| limit | value |",
        "|---|---|",
    ]
    for dtype, peak in limits["matmul"].items():
        lines.append(f"| {dtype} matmul peak (n={peak['n']}) | {peak['flops_per_s'] / 1e12:.3f} TFLOP/s |")
    bandwidth = limits["bandwidth"]
    for placement in ("heap", "huge pages"):
        if placement in bandwidth:
            figures = bandwidth[placement]
            lines += [
                f"| memory bandwidth, copy (read+write), {placement} | {figures['copy_bytes_per_s'] / 1e9:.1f} GB/s |",
                f"| memory bandwidth, sum (read), {placement} | {figures['read_bytes_per_s'] / 1e9:.1f} GB/s |",
            ]
    if nominal_peak:
        lines.append(f"| nominal bf16 dense peak | {nominal_peak / 1e12:.0f} TFLOP/s |")
    nominal_column = any("nominal" in row for row in rows)
    header = ["config", "dtype", "measure", "reference", "ours", "ours/ref", "ref of limit", "ours of limit",
              "limit"] + (["MFU vs nominal (ref / ours)"] if nominal_column else [])
    lines += ["", "Results (tokens/s: higher is better; memory: lower is better):", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["config"], row["dtype"], row["measure"], _num(row["reference"]), _num(row["ours"]),
                 f"{row['ratio']:.2f}x"]
        if "ref_frac" in row:
            cells += [f"{row['ref_frac']:.1%}", f"{row['ours_frac']:.1%}"]
        else:
            cells += ["", ""]
        cells.append(row["limit"])
        if nominal_column:
            nominal = row.get("nominal")
            cells.append(f"{nominal['reference']:.1%} / {nominal['ours']:.1%}" if nominal else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Run times in seconds, in the order they ran (reference | ours):", ""]
    for row in rows:
        if "times" in row:
            ref, ours = (", ".join(f"{t:.3f}" for t in row["times"][impl]) for impl in IMPLS)
            lines.append(f"- {row['config']} {row['dtype']} {row['measure']}: {ref} | {ours}")
    lines += ["", "How each figure is computed: see the docstring of benchmarks/bench_model.py and "
              "benchmarks/cost_model.py.", ""]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------------


def _choices(text: str, allowed, flag: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{flag}: unknown {unknown or 'empty list'}; choose from {', '.join(allowed)}")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="small,8b-layers", type=lambda s: _choices(s, CONFIGS, "--configs"))
    parser.add_argument("--dtypes", default="bf16,fp32", type=lambda s: _choices(s, DTYPES, "--dtypes"))
    parser.add_argument("--measures", default=",".join(MEASURES), type=lambda s: _choices(s, MEASURES, "--measures"))
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per model and measure (default 5 on CPU, 20 on CUDA, 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs per model before each measure (default 1 on CPU, 3 on CUDA)")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="sequences per training step (default 2 of 512 tokens; a GPU needs more to be busy)")
    parser.add_argument("--out", default=None, help=f"markdown report (default {DEFAULT_OUT}; none with --quick)")
    parser.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--nominal-peak-tflops", type=float, default=None,
                        help="the device's nominal bf16 peak (default: known for H100/H200, else none)")
    parser.add_argument("--no-memory", action="store_true", help="skip the training peak memory probes")
    parser.add_argument("--quick", action="store_true", help="the tiny config and tiny shapes: a seconds-long check")
    parser.add_argument("--cpu-defaults", default="on", choices=("on", "off"),
                        help="on: jetmoe.cpu_runtime.apply_cpu_defaults() for the whole process (both models), "
                             "as the jetmoe CLI does; off: PyTorch's and glibc's defaults")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one model's memory, in a fresh process
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 20 if args.device == "cuda" else 5
    if args.warmup is None:
        # Three: an MoE's expert row counts change with every routing, and each new count is a new matmul
        # shape for oneDNN; a few steps let both models meet the shapes a long run keeps meeting.
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1 (cold runs are far off: always warm up)")
    if args.train_batch is not None and args.train_batch < 1:
        parser.error("--train-batch must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.quick:
        args.configs = ["tiny"]
    args.measures = [measure for measure in RUN_ORDER if measure in args.measures]
    if args.out is None and not args.quick:
        args.out = DEFAULT_OUT
    return args


def bench_config(config: str, args, device: torch.device, shapes: Shapes, limits: dict,
                 nominal_peak: float | None) -> list[dict]:
    """Every requested dtype and measure of one config, both models loaded from one checkpoint."""
    rows = []
    geometry = Geometry.of(transformers.JetMoeConfig(**CONFIGS[config]))
    with tempfile.TemporaryDirectory(prefix=f"jetmoe-bench-{config}-") as directory:
        log(f"[{config}] writing a random-init checkpoint")
        save_checkpoint(CONFIGS[config], directory)
        for dtype in args.dtypes:
            models = {impl: load(impl, directory, DTYPES[dtype], device) for impl in IMPLS}
            for measure in args.measures:
                log(f"[{config} {dtype}] {measure}: warm-up, then {args.repeats} alternating runs")
                measured = time_alternating(measure, models, shapes, device, args.repeats, args.warmup)
                rows.append(timing_row(config, dtype, measure, measured, geometry, shapes, limits, nominal_peak))
            del models
            free(device)  # the memory probes below must not share the machine with these two models
            if "train" in args.measures and not args.no_memory:
                log(f"[{config} {dtype}] training peak memory, one fresh process per model")
                probes = {impl: memory_probe_in_subprocess(impl, directory, dtype, device, shapes) for impl in IMPLS}
                rows.append(memory_row(config, dtype, probes))
    return rows


CPU_DEFAULTS = ["off"]  # set once by main(); the memory probes run under the same setting


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_defaults == "on" and jetmoe.cpu_runtime.apply_cpu_defaults():
        CPU_DEFAULTS[0] = "on"
    if args.memory_probe:
        run_memory_probe(json.loads(args.memory_probe))
        return 0
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.train_batch:
        shapes = dataclasses.replace(shapes, train_batch=args.train_batch)
    info = machine.describe(device)
    log("measuring the machine: matmul peak and memory bandwidth")
    limits = {
        "matmul": {name: machine.matmul_peak(DTYPES[name], device, args.quick) for name in args.dtypes},
        "bandwidth": machine.memory_bandwidth(device, args.quick),
    }
    nominal_peak = args.nominal_peak_tflops * 1e12 if args.nominal_peak_tflops else machine.nominal_bf16_peak(device)
    rows = []
    for config in args.configs:
        rows += bench_config(config, args, device, shapes, limits, nominal_peak)
    text = report(args, info, limits, rows, shapes, nominal_peak)
    print(text)
    if args.out:
        with open(args.out, "a" if args.append else "w") as out:
            out.write(text + ("\n" if args.append else ""))
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
