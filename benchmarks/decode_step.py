"""The engine's decoding step with the final norm and output head in the layers' one C call, against the same
step with the two run as modules (the model's forward), alternating in one process.

    python benchmarks/decode_step.py [--config small] [--batch 1] [--dtype bf16] [--rounds 14] [--steps 30]

One random-init checkpoint, one engine: after a warm-up, blocks of --steps decode steps alternate between
  - whole step: `JetMoeForCausalLM.decode_logits`, every layer, the final norm and the head in one C call;
  - modules: a no-op forward hook on the final norm and on the head, so that `decode_logits` declines and
    the step runs the model's forward, with the norm and the head called as modules (as before the two moved
    into the C call). The hooks themselves cost a few microseconds.
Reports the median milliseconds per step of each and the median of the per-round ratios (modules / whole).
The sequences grow through the run (the first block attends over the prompt, the last over every token).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from inference_common import GEOMETRIES, random_checkpoint, random_prompt

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=sorted(GEOMETRIES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=14)
    parser.add_argument("--steps", type=int, default=30, help="decode steps per timed block")
    args = parser.parse_args()

    from jetmoe import JetMoeForCausalLM
    from jetmoe.cpu_runtime import apply_cpu_defaults
    from jetmoe.generation import Engine, SamplingParams
    from jetmoe.generation.loading import load_tokenizer

    apply_cpu_defaults()
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(args.config, Path(tmp) / args.config)
        model = JetMoeForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype]).eval()
        tokenizer = load_tokenizer(path)
    steps = (args.rounds * 2 + 2) * (args.steps + 1) + 40
    engine = Engine(model, tokenizer, max_batch=args.batch, max_len=32 + steps + 8)
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    for row in range(args.batch):
        engine.add(engine.make_sequence(random_prompt(model.config.vocab_size, 32, seed=row), params))

    hooks: list = []

    def whole_step():
        while hooks:
            hooks.pop().remove()

    def modules():
        hooks.extend(module.register_forward_hook(lambda *_: None) for module in (model.model.norm, model.lm_head))

    for _ in range(20):
        engine.step()
    times = {"whole step": [], "modules": []}
    for round_ in range(args.rounds):
        order = [("whole step", whole_step), ("modules", modules)]
        for name, setup in order if round_ % 2 == 0 else order[::-1]:
            whole_step()
            setup()
            engine.step()  # the first step after a switch is not timed
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    whole_step()
    ratios = [m / w for m, w in zip(times["modules"], times["whole step"])]
    print(f"{args.config} {args.dtype} batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds of {args.steps} steps each")  # fmt: skip
    for name, values in times.items():
        print(f"  {name:10s} {statistics.median(values):7.2f} ms/step (min {min(values):.2f}, max {max(values):.2f})")
    print(f"  modules / whole step: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
