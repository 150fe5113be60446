"""Training throughput per parallel layout: real `torchrun ... jetmoe train` runs, tokens/s medians.

    python benchmarks/bench_parallel.py                          # every layout, "small" config, CPU
    python benchmarks/bench_parallel.py --layouts pp2 --steps 4 --config tiny

Every layout trains the same model on the same global batch (`--global-batch` sequences of `--seq-len` tokens:
per process batch_size = global batch / data-parallel replicas) from the same start, on the embedded corpus.
The tokenizer is the bundled tiny model's, padded with unused tokens to the config's vocabulary, so the
embedding and head have the config's size. Each process gets `--threads` threads (default: CPUs / processes).
tokens/s per step comes from the run's metrics.jsonl (log_every 1); the first `--warmup` steps are dropped and
the median of the rest is reported. Writes benchmarks/RESULTS_parallel.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_model import CONFIGS  # noqa: E402

# name: (processes, extra `jetmoe train` flags). The data-parallel replicas are processes / (pp x ep ...).
LAYOUTS = {
    "dp2": (2, []),
    "pp2": (2, ["--pp", "2", "--pp-schedule", "1f1b", "--microbatches", "4"]),
    "ep2": (2, ["--ep", "2"]),
}


def replicas(processes: int, flags: list[str]) -> int:
    """Data-parallel replicas of a layout: the processes of a pipeline read the same data (ep processes each
    read their own)."""
    return processes // (int(flags[flags.index("--pp") + 1]) if "--pp" in flags else 1)


def padded_tokenizer(folder: str, vocab_size: int) -> str:
    """The bundled tiny tokenizer with unused tokens added up to `vocab_size` (a smaller vocabulary than its 2048
    tokens becomes 2048: the trainer sizes the model to its tokenizer)."""
    from transformers import AutoTokenizer

    from jetmoe.assets import TINY_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tokenizer.add_tokens([f"<unused_{i}>" for i in range(vocab_size - len(tokenizer))])
    tokenizer.save_pretrained(folder)
    return folder


def run_layout(name: str, args, tokenizer: str, work: str) -> dict:
    processes, flags = LAYOUTS[name]
    per_process = args.global_batch // replicas(processes, flags)
    out = os.path.join(work, name)
    model = ",".join(f"{k}: {v}" for k, v in CONFIGS[args.config].items())
    command = [
        shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun", "--standalone",
        "--nproc_per_node", str(processes), "-m", "jetmoe.cli", "train", "--preset", "tiny",
        "--set", f"model={{{model}}}", "--tokenizer", tokenizer, "--cache-dir", os.path.join(work, "tokens"),
        "--seq-len", str(args.seq_len), "--batch-size", str(per_process), "--max-steps", str(args.warmup + args.steps),
        "--log-every", "1", "--val-every", "1000000", "--save-every", "1000000", "--no-progress", "--no-plots",
        "--out-dir", out, *flags,
    ]
    threads = args.threads or max(1, (os.cpu_count() or 1) // processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"layout {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        rates = [r["tokens_per_s"] for r in map(json.loads, handle) if "tokens_per_s" in r][args.warmup:]
    return {"layout": name, "processes": processes, "flags": " ".join(flags) or "-", "batch_per_process": per_process,
            "threads": threads, "median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "steps": len(rates), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {sorted(LAYOUTS)}")
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per optimizer step, all processes")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="threads per process")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS_parallel.md"))
    args = parser.parse_args()
    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layout(s) {unknown}; choose from {sorted(LAYOUTS)}")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        tokenizer = padded_tokenizer(os.path.join(work, "tokenizer"), CONFIGS[args.config]["vocab_size"])
        rows = []
        for name in names:
            rows.append(run_layout(name, args, tokenizer, work))
            print(json.dumps(rows[-1]), flush=True)
    prefix = f"JETMOE_CPU_DEFAULTS={os.environ['JETMOE_CPU_DEFAULTS']} " if "JETMOE_CPU_DEFAULTS" in os.environ else ""
    command = prefix + "python benchmarks/bench_parallel.py " + " ".join(sys.argv[1:])
    lines = [
        "# Training throughput per parallel layout",
        "",
        f"`{command.strip()}` on {platform.machine()} with {os.cpu_count()} CPUs, config `{args.config}` "
        f"({CONFIGS[args.config]}), global batch {args.global_batch} x {args.seq_len} tokens, fp32, gloo; "
        f"median tokens/s over {args.steps} steps after {args.warmup} warm-up steps. Load average (1 min) "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after: other jobs share this machine, so the figures "
        "are noisy.",
        "",
        "| layout | processes | flags | batch per process | threads per process | tokens/s (median) | min | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['processes']} | `{r['flags']}` | {r['batch_per_process']} | {r['threads']} | "
                     f"{r['median']:.0f} | {r['min']:.0f} | {r['max']:.0f} |")
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
