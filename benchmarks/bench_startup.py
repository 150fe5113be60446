"""Host memory of one process's training start-up: the model built on meta, sharded over `--world` processes
(FSDP2, as `jetmoe train` does), and this rank's shards materialised and initialised.

    python benchmarks/bench_startup.py --preset jetmoe-8b --world 8 [--rank 0]

One process plays rank `--rank` of `--world` through torch's fake process group (collectives do nothing;
start-up needs none), so the 8-process figure of a model too large for this machine is measured on it.
`--world 1` is the single-process start. Prints peak resident memory (VmHWM) before and after, the bytes of
this rank's parameters, and the seconds taken. Numbers go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from jetmoe import JetMoeConfig
from jetmoe.training.config import PRESETS
from jetmoe.training.distributed import Runtime, shard_model
from jetmoe.training.materialize import RandomInit, materialize, meta_model, peak_host_memory_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="jetmoe-8b", choices=sorted(PRESETS))
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    before = peak_host_memory_bytes()
    if args.world > 1:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=args.rank, world_size=args.world)
    runtime = Runtime(rank=args.rank, world=args.world, local_rank=0, device=torch.device("cpu"))
    config = JetMoeConfig(**PRESETS[args.preset]["model"])
    started = time.perf_counter()
    model = shard_model(meta_model(config), runtime)
    materialize(model, runtime.device, RandomInit(0, model))
    seconds = time.perf_counter() - started
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    print(json.dumps({"preset": args.preset, "parameters": total, "world": args.world, "rank": args.rank,
                      "local_parameter_bytes": local, "peak_before_bytes": before,
                      "peak_after_bytes": peak_host_memory_bytes(), "seconds": round(seconds, 1),
                      "cpu": os.cpu_count()}))
    if args.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
