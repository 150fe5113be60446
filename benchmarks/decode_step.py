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
import time

import torch

from inference_common import add_alternation_arguments, alternation_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_alternation_arguments(parser, rounds=14, steps=30)
    args = parser.parse_args()

    from jetmoe.cpu_runtime import apply_cpu_defaults

    apply_cpu_defaults()
    model, engine = alternation_engine(args)

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
