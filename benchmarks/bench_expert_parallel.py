"""Training tokens/s of expert parallelism (ep=N) against plain data parallelism (FSDP2 over N), torchrun, CPU.

    python benchmarks/bench_expert_parallel.py [--nproc 2] [--steps 4] [--batch-size 2] [--seq-len 128]

Each layout is a `torchrun --nproc_per_node N` of this file's worker: the "small" geometry (bench_model.py),
random token ids (a different batch per process), the trainer's own sharding (`shard_model`), AdamW and
clipping; timed over `steps` steps after a warm-up step. `measure(ep, ...)` is the entry for other benchmarks
(bench_parallel.py). Numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

SMALL = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_key_value_heads=8, kv_channels=64,
             intermediate_size=1408, num_local_experts=8, num_experts_per_tok=2)


def measure(ep: int, nproc: int = 2, steps: int = 4, batch_size: int = 2, seq_len: int = 128,
            geometry: dict | None = None, warmup: int = 1, timeout: float = 1800) -> dict:
    """One layout: ep=1 is FSDP2 data parallelism over `nproc` processes, ep>1 shards the experts over ep of
    them. Returns {"tokens_per_s", "s_per_step", ...} over all processes."""
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    settings = dict(ep=ep, steps=steps, warmup=warmup, batch_size=batch_size, seq_len=seq_len,
                    geometry=geometry or SMALL)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(
        [launcher, "--standalone", "--nproc_per_node", str(nproc), os.path.abspath(__file__), "--worker",
         json.dumps(settings)], env=env, capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"ep={ep} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _worker(settings: dict) -> None:
    import torch

    from jetmoe import JetMoeConfig, JetMoeForCausalLM
    from jetmoe.training.config import TrainConfig
    from jetmoe.training.distributed import init_runtime, shard_model, shutdown
    from jetmoe.training.optim import build_optimizer, clip_gradients

    runtime = init_runtime("cpu")
    torch.manual_seed(0)
    model = shard_model(JetMoeForCausalLM(JetMoeConfig(**settings["geometry"])), runtime, settings["ep"]).train()
    optimizer = build_optimizer(model, TrainConfig())
    batch, length = settings["batch_size"], settings["seq_len"]
    generator = torch.Generator().manual_seed(1 + runtime.rank)
    ids = torch.randint(4, settings["geometry"]["vocab_size"], (batch, length), generator=generator)
    marks = []
    for _ in range(settings["warmup"] + settings["steps"]):
        out = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
        out.loss.backward()
        clip_gradients(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        runtime.barrier()
        marks.append(time.perf_counter())
    elapsed = marks[-1] - marks[settings["warmup"] - 1]
    tokens = settings["steps"] * batch * length * runtime.world
    if runtime.is_main:
        print(json.dumps({"ep": settings["ep"], "processes": runtime.world, "threads": torch.get_num_threads(),
                          "tokens_per_step": batch * length * runtime.world, "s_per_step": elapsed / settings["steps"],
                          "tokens_per_s": tokens / elapsed}), flush=True)
    shutdown(runtime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    if args.worker:
        return _worker(json.loads(args.worker))
    rows = {}
    for name, ep in (("dp", 1), ("ep", args.nproc)):
        rows[name] = measure(ep, args.nproc, args.steps, args.batch_size, args.seq_len)
        print(json.dumps({"layout": f"{name}={args.nproc}", **rows[name]}), flush=True)
    print(f"ep={args.nproc} / dp={args.nproc} tokens/s: {rows['ep']['tokens_per_s'] / rows['dp']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
