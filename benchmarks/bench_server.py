"""Server throughput and latency: a real `jetmoe serve` process on localhost and concurrent streaming clients.

    python benchmarks/bench_server.py                    # bundled tiny model: 1, 8, 32 clients, then the load test
    python benchmarks/bench_server.py --config small     # a random checkpoint of the "small" geometry
    python benchmarks/bench_server.py --quick            # tiny random model, a few seconds per level; writes nothing

Each client is a loop: POST /v1/completions with stream=true (a --prompt-len-token prompt, --max-tokens
tokens with ignore_eos, stream_options.include_usage), read the events to `data: [DONE]`, repeat until the
level's time is up (requests running at that moment finish and count). A request fails if the status is not
200, the stream breaks, or [DONE] never comes.
- throughput: completion tokens (from the usage chunks) of all finished requests / the level's wall time;
- latency: request start to [DONE]; time to first token: request start to the first chunk with text;
  p50 and p99 over the level's requests.
The load test is --load-clients clients for --load-duration seconds; it must end with zero failed requests
(the script exits 1 otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from inference_common import percentile, random_checkpoint, random_prompt, table, write_section


class ServerProcess:
    """`jetmoe serve` in a child process, started and waited for until /health answers; `stop` ends it."""

    name, start_timeout_s, stop_timeout_s = "the server", 300, 30

    def __init__(self, model_dir: Path, port: int, max_batch: int, max_queue: int, dtype: str, extra: list[str]):
        command = [sys.executable, "-m", "jetmoe.cli", "serve", "--model", str(model_dir), "--port", str(port),
                   "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--dtype", dtype,
                   "--served-model-name", "bench", "--queue-timeout", "600", *extra]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "JETMOE_API_KEY"}  # the clients send no key
        self._start(command, port, env)

    def _start(self, command: list[str], port: int, env: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(command, env=env)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not become healthy in {self.start_timeout_s} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    start = time.monotonic()
    first, tokens, done = None, 0, False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"ok": False, "error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.monotonic()
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return {"ok": False, "error": repr(error)}
    if not done:
        return {"ok": False, "error": "the stream ended without [DONE]"}
    end = time.monotonic()
    return {"ok": True, "latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


async def run_level(url: str, clients: int, duration: float, vocab: int, prompt_len: int, max_tokens: int) -> dict:
    deadline = time.monotonic() + duration
    results: list[dict] = []

    async def client_loop(index: int):
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            n = 0
            while time.monotonic() < deadline:
                body = {"model": "bench", "prompt": random_prompt(vocab, prompt_len, seed=index * 100_000 + n),
                        "max_tokens": max_tokens, "temperature": 0.8, "seed": n, "stream": True,
                        "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
                results.append(await one_request(client, url + "/v1/completions", body))
                n += 1

    start = time.monotonic()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    wall = time.monotonic() - start
    ok = [r for r in results if r["ok"]]
    failures = [r["error"] for r in results if not r["ok"]]
    return {
        "clients": clients,
        "requests": len(results),
        "failed": len(failures),
        "errors": sorted(set(failures))[:3],
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "latency_p50": percentile([r["latency"] for r in ok], 50),
        "latency_p99": percentile([r["latency"] for r in ok], 99),
        "ttft_p50": percentile([r["ttft"] for r in ok], 50),
        "ttft_p99": percentile([r["ttft"] for r in ok], 99),
        "wall_s": wall,
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the bundled tiny model)")
    parser.add_argument("--config", default=None, help="serve a random checkpoint of this geometry (e.g. small)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--int8", action="store_true", help="serve with int8 weights")
    parser.add_argument("--levels", default="1,8,32", help="client counts for the throughput table")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per throughput level")
    parser.add_argument("--load-clients", type=int, default=32)
    parser.add_argument("--load-duration", type=float, default=60.0)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--quick", action="store_true", help="tiny random model, short levels; writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.config, args.levels, args.duration, args.load_clients, args.load_duration = "tiny", "1,4", 3.0, 8, 3.0
        args.max_tokens, args.max_batch = 16, 8

    from jetmoe.generation.loading import resolve_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (
            random_checkpoint(args.config, Path(tmp) / args.config) if args.config else resolve_model_dir(args.model)
        )
        from transformers import AutoConfig

        import jetmoe

        jetmoe.register_with_transformers()
        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        extra = ["--max-len", str(args.prompt_len + args.max_tokens + 8)] + (["--int8"] if args.int8 else [])
        server = ServerProcess(model_dir, free_port(), args.max_batch, 4 * args.max_batch, args.dtype, extra)
        try:
            levels = [
                asyncio.run(run_level(server.url, int(c), args.duration, vocab, args.prompt_len, args.max_tokens))
                for c in args.levels.split(",")
            ]
            for level in levels:
                print(json.dumps(level), flush=True)
            load = asyncio.run(
                run_level(server.url, args.load_clients, args.load_duration, vocab, args.prompt_len, args.max_tokens)
            )
            print("load test:", json.dumps(load), flush=True)
        finally:
            server.stop()

    base = levels[0]["tokens_per_s"] or float("nan")
    rows = [
        [lv["clients"], lv["requests"], lv["failed"], lv["tokens_per_s"], lv["tokens_per_s"] / base,
         lv["latency_p50"], lv["latency_p99"], lv["ttft_p50"], lv["ttft_p99"]]
        for lv in levels + [load]
    ]  # fmt: skip
    body = "\n\n".join([
        f"Model `{args.config or model_dir}` ({args.dtype}{', int8 weights' if args.int8 else ''}), server "
        f"`--max-batch {args.max_batch}`, each request a {args.prompt_len}-token prompt and {args.max_tokens} "
        f"streamed tokens. Levels of {args.duration:g} s; the last row is the load test ({args.load_clients} clients, "
        f"{args.load_duration:g} s). Command: `python benchmarks/bench_server.py"
        + (f" --config {args.config}" if args.config else "") + "`.",
        table(["clients", "requests", "failed", "tokens/s", "vs 1 client", "latency p50 (s)", "latency p99 (s)",
               "TTFT p50 (s)", "TTFT p99 (s)"], rows),
        f"Load test: **{load['failed']} failed requests** of {load['requests']}."
        + (f" Errors: {load['errors']}" if load["failed"] else ""),
    ])  # fmt: skip
    if not args.quick:
        write_section(f"Server ({args.config or Path(model_dir).name})", body)
        print("written to benchmarks/RESULTS_inference.md")
    return 1 if load["failed"] or any(lv["failed"] for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
