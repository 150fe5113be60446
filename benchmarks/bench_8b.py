"""Full-size check: the jetmoe-8b geometry (24 layers, random bf16 weights, ~17 GB) on this machine.

1. Writes a sharded safetensors checkpoint (once; reused if present) tensor by tensor, never holding the
   whole model: peak memory while writing is one shard.
2. Loads it with `JetMoeForCausalLM.from_pretrained(dtype=bfloat16)` and reports the process's anonymous
   resident memory (RssAnon: memory the process owns, excluding the page cache of mmapped files) against the
   checkpoint size, so a second full copy would show.
3. Decodes greedily at batch 1 and reports tokens/s against the weight-bandwidth roofline
   (bytes of the weights one token touches / measured memory bandwidth).

    python benchmarks/bench_8b.py --dir /tmp/jetmoe-8b-random [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from jetmoe import JetMoeConfig, JetMoeForCausalLM, cpu_memory
from jetmoe.training.config import JETMOE_8B_MODEL

GEOMETRY = JETMOE_8B_MODEL  # the jetmoe-8b preset of `jetmoe train`
SHARD_BYTES = 2 * 1024**3


def parameter_shapes(config: JetMoeConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes, from a meta-device model (no memory)."""
    with torch.device("meta"):
        model = JetMoeForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items() if name != "lm_head.weight"}


def write_checkpoint(directory: Path, config: JetMoeConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    shapes = parameter_shapes(config)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, index = {}, {}, 0, 0
    total = 0

    def flush():
        nonlocal shard, shard_bytes, index
        if not shard:
            return
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * config.initializer_range).to(torch.bfloat16)
        size = tensor.numel() * 2
        if shard_bytes + size > SHARD_BYTES:
            flush()
        shard[name] = tensor
        shard_bytes += size
        total += size
    flush()
    # Shard names are fixed up to "-of-N" form the way transformers writes them.
    renamed = {}
    for old in sorted(set(weight_map.values())):
        new = old.replace(".safetensors", f"-of-{index:05d}.safetensors")
        os.replace(directory / old, directory / new)
        renamed[old] = new
    index_json = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    config.save_pretrained(directory)


def rss_anon_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def measure_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth: fp32 sum of a large buffer on huge-page memory, where the model's weights go (bytes read /
    time), median of several runs. Not a heap buffer: the first large heap allocation of a process gets
    physically scattered pages (read at 4.1 GB/s here against ~25 on huge pages), and glibc, as
    apply_cpu_defaults() sets it, would keep the freed buffer in the process, 1 GiB less for the model."""
    numel = size_mb * 2**20 // 4
    if cpu_memory.huge_pages_supported():
        data = cpu_memory.huge_page_empty((numel,), torch.float32).fill_(1.0)
    else:
        data = torch.ones(numel)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / sorted(times)[len(times) // 2] / 1e9


def active_weight_bytes(config: JetMoeConfig) -> int:
    """Bytes one decoded token reads: dense parts, k of E experts in MoA and MoE, the lm_head (bf16)."""
    hidden, heads = config.hidden_size, config.num_key_value_heads * config.kv_channels
    k, inner = config.num_experts_per_tok, config.intermediate_size
    per_layer = (
        2 * heads * hidden  # kv_proj
        + k * 2 * heads * hidden  # MoA query + output projections of the chosen experts
        + k * 3 * inner * hidden  # MoE GLU experts: 2I x H in, H x I out
        + 2 * config.num_local_experts * hidden  # the two routers
    )
    return 2 * (config.num_hidden_layers * per_layer + config.vocab_size * hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/jetmoe-8b-random"))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--write-only", action="store_true", help="write the checkpoint and stop")
    args = parser.parse_args()
    from jetmoe.cpu_runtime import apply_cpu_defaults

    apply_cpu_defaults()  # as the jetmoe command line does

    config = JetMoeConfig(**GEOMETRY)
    # Measured first: once the model's pages fill RAM, a fresh 1 GiB buffer competes with the page cache
    # (a run that measured after decoding read 1.8 GB/s instead of ~31).
    bandwidth = measure_bandwidth_gbs()
    if not (args.dir / "model.safetensors.index.json").exists():
        start = time.perf_counter()
        write_checkpoint(args.dir, config)
        print(f"wrote {args.dir} in {time.perf_counter() - start:.0f} s")
    if args.write_only:
        return
    checkpoint_gib = sum(f.stat().st_size for f in args.dir.glob("*.safetensors")) / 1024**3

    before = rss_anon_gib()
    start = time.perf_counter()
    model = JetMoeForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - start
    after = rss_anon_gib()
    params = sum(p.numel() for p in model.parameters())
    print(f"params {params / 1e9:.2f} B, checkpoint {checkpoint_gib:.1f} GiB, load {load_s:.0f} s, "
          f"anonymous RSS {before:.1f} -> {after:.1f} GiB")

    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm up every shape
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        elapsed = time.perf_counter() - start
    # Subtract the prefill by timing it alone, so the figure is decode speed.
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
    decode_tps = (args.new_tokens - 1) / max(elapsed - prefill, 1e-9)
    roofline = bandwidth * 1e9 / active_weight_bytes(config)
    print(f"peak anonymous RSS after decode {rss_anon_gib():.1f} GiB")
    print(f"decode batch 1: {decode_tps:.2f} tok/s; bandwidth {bandwidth:.1f} GB/s; roofline {roofline:.2f} tok/s "
          f"({active_weight_bytes(config) / 1e9:.2f} GB/token); {decode_tps / roofline:.0%} of roofline")


if __name__ == "__main__":
    main()
