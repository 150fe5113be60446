"""`vllm serve` with jetmoe's plugin beside `jetmoe serve`, on the same checkpoint and the same streaming clients.

    python benchmarks/bench_vllm.py                      # "small" random checkpoint (bf16), 1, 8, 32 clients
    python benchmarks/bench_vllm.py --config tiny --levels 1,4 --duration 3 --no-write    # a quick check

Run with jetmoe's main environment (.venv); vLLM runs from --vllm-venv (`make vllm-env`). Each server is started,
warmed up with one request, measured at each client level with bench_server.py's client loop (streamed
/v1/completions, ignore_eos, temperature 0.8), then stopped before the other one starts. Throughput is completion
tokens of finished requests / level wall time; latency is request start to [DONE], p50 and p99.
Results: benchmarks/RESULTS_vllm.md (the table is replaced at each run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_server import ServerProcess, free_port, run_level
from inference_common import random_checkpoint, table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS_vllm.md"


class VllmServer(ServerProcess):
    """`vllm serve` (jetmoe's plugin) in a child process; started, waited for and stopped as ServerProcess."""

    name, start_timeout_s, stop_timeout_s = "vllm serve", 900, 60

    def __init__(
        self, vllm_bin: Path, model_dir: Path, port: int, max_batch: int, dtype: str, max_len: int, kv_bytes: int
    ):
        command = [str(vllm_bin), "serve", str(model_dir), "--served-model-name", "bench", "--port", str(port),
                   "--dtype", dtype, "--max-model-len", str(max_len), "--max-num-seqs", str(max_batch),
                   "--kv-cache-memory-bytes", str(kv_bytes), "--disable-log-stats"]  # fmt: skip
        self._start(command, port, dict(os.environ))


def measure(server, args, vocab: int) -> list[dict]:
    asyncio.run(run_level(server.url, 1, 0.1, vocab, args.prompt_len, args.max_tokens))  # warm-up request
    levels = []
    for clients in args.levels.split(","):
        level = asyncio.run(run_level(server.url, int(clients), args.duration, vocab, args.prompt_len, args.max_tokens))
        print(json.dumps(level), flush=True)
        levels.append(level)
    return levels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", help="random checkpoint geometry (inference_common.GEOMETRIES)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32, help="--max-batch / --max-num-seqs of both servers")
    parser.add_argument("--vllm-venv", default=str(ROOT / ".venv-vllm"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--note", default="", help="a sentence added under the table (e.g. the machine's load)")
    args = parser.parse_args()
    vllm_bin = Path(args.vllm_venv) / "bin" / "vllm"
    if not vllm_bin.exists():
        raise SystemExit(f"{vllm_bin} not found: run `make vllm-env` first")
    vllm_python = str(Path(args.vllm_venv) / "bin" / "python")
    version = subprocess.run(
        [vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    max_len = args.prompt_len + args.max_tokens + 8
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_checkpoint(args.config, Path(tmp) / args.config)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        for name in ("vllm serve (jetmoe plugin)", "jetmoe serve"):
            if name.startswith("vllm"):
                server = VllmServer(vllm_bin, model_dir, free_port(), args.max_batch, args.dtype, max_len, 512 << 20)
            else:
                server = ServerProcess(model_dir, free_port(), args.max_batch, 4 * args.max_batch, args.dtype,
                                       ["--max-len", str(max_len)])  # fmt: skip
            try:
                results[name] = measure(server, args, vocab)
            finally:
                server.stop()

    rows = [
        [name, lv["clients"], lv["requests"], lv["failed"], lv["tokens_per_s"], lv["latency_p50"], lv["latency_p99"],
         lv["ttft_p50"], lv["ttft_p99"]]
        for name, levels in results.items() for lv in levels
    ]  # fmt: skip
    command = "python benchmarks/bench_vllm.py" + (f" --config {args.config}" if args.config != "small" else "")
    body = "\n\n".join([
        "# vLLM (jetmoe plugin) vs jetmoe serve\n\nWritten by benchmarks/bench_vllm.py.",
        f"Random `{args.config}` checkpoint ({args.dtype}), both servers at most {args.max_batch} running sequences, "
        f"each request a {args.prompt_len}-token prompt and {args.max_tokens} streamed tokens (ignore_eos), "
        f"{args.duration:g} s per level. vLLM {version} (CPU build, default torch.compile), "
        f"{platform.machine()} with {os.cpu_count()} CPUs. Command: `{command}` (after `make vllm-env`).",
        table(["server", "clients", "requests", "failed", "tokens/s", "latency p50 (s)", "latency p99 (s)",
               "TTFT p50 (s)", "TTFT p99 (s)"], rows),
        args.note,
    ])  # fmt: skip
    print(body)
    if not args.no_write:
        RESULTS.write_text(body.rstrip() + "\n")
        print(f"written to {RESULTS}")
    return 1 if any(lv["failed"] for levels in results.values() for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
