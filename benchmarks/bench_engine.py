"""Decode speed of the generation engine against transformers' generate() (the reference), same weights.

    python benchmarks/bench_engine.py                 # "small" config, bf16, batch 1 and 8 -> RESULTS_inference.md
    python benchmarks/bench_engine.py --compile       # also the torch.compile'd decode step
    python benchmarks/bench_engine.py --quick         # tiny config, few tokens: checks the script in seconds

Method: one random-init checkpoint of the reference (transformers.JetMoeForCausalLM) is saved in bf16; the
reference and ours both load it with from_pretrained(dtype=bf16), and both models' large weights sit on huge-page
memory (ours places them at load; the reference's are moved there: jetmoe/cpu_memory.py). For each batch size, B random prompts of
--prompt-len tokens generate exactly --new-tokens greedy tokens each (the reference with min_new_tokens, the
engine with ignore_eos). Each measurement is warmed up once, then the median of --repeats runs is taken,
alternating reference and engine.
- end-to-end tokens/s = B * new_tokens / (time of the whole call, prefill included), as a caller sees it;
- decode tokens/s = B * (new_tokens - 1) / (time after the prompts are prefilled). For the reference this is
  (B * (new_tokens - 1)) / (t(new_tokens) - t(1)), the difference of two generate() calls;
- time to first token: one prompt of --ttft-len tokens, prefill and first token (engine.add; the reference's
  generate(max_new_tokens=1));
- roofline: the tokens/s if a decode step took exactly the time to read its weights once (the experts the
  batch touches, every dense layer, the lm_head) at the measured memory bandwidth (benchmarks/machine.py,
  cost_model.py). int8 rows read 1 byte per quantised weight. The bandwidth is measured before and after each
  engine run (a shared machine's bandwidth moves within minutes); a run's fraction of the roofline takes the
  higher of its two readings, and the table gives the median fraction over the repeats.
"""

from __future__ import annotations

import argparse
import copy
import functools
import tempfile
import time
from pathlib import Path

import torch

from cost_model import Geometry
from inference_common import GEOMETRIES, RESULTS, median, random_checkpoint, random_prompt, table, write_section
from machine import BandwidthProbe

from jetmoe.ops import native


def engine_run(engine, prompts, new_tokens):
    from jetmoe.generation import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for prompt in prompts:
        engine.add(engine.make_sequence(prompt, params))
    prefilled = time.perf_counter()
    while engine.running:
        engine.step()
    end = time.perf_counter()
    return end - start, end - prefilled


def reference_run(model, prompts, new_tokens):
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)  # fmt: skip
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=sorted(GEOMETRIES))
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ttft-len", type=int, default=128, help="prompt length for the time-to-first-token row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 rows")
    parser.add_argument("--quick", action="store_true", help="tiny config, 8 tokens, 1 repeat; writes nothing")
    parser.add_argument("--out", action="store_true", help="write the section even with --quick")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown file the section goes to")
    args = parser.parse_args()
    if args.quick:
        args.config, args.new_tokens, args.repeats, args.ttft_len, args.prompt_len = "tiny", 8, 1, 16, 8

    import transformers

    from jetmoe import JetMoeForCausalLM
    from jetmoe.generation import Engine, quantize_model
    from jetmoe.generation.loading import load_tokenizer

    from jetmoe.cpu_memory import place_on_huge_pages
    from jetmoe.cpu_runtime import apply_cpu_defaults

    apply_cpu_defaults()  # as the jetmoe CLI does; process-wide, so the reference gets them too
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(args.config, Path(tmp) / args.config)
        reference = transformers.JetMoeForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        # The reference's weights get the huge-page placement ours gets at load (jetmoe/cpu_memory.py), so
        # that the order of loading (the first model got scattered pages) is not part of the comparison.
        place_on_huge_pages(reference)
        ours = JetMoeForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        tokenizer = load_tokenizer(path)
    config = ours.config
    max_len = max(args.prompt_len + args.new_tokens, args.ttft_len + 2)
    variants = {"engine bf16": ours}
    if not args.no_int8:
        int8 = copy.deepcopy(ours)
        quantize_model(int8)
        place_on_huge_pages(int8)  # as jetmoe.generation.loading does after quantising
        variants["engine int8"] = int8
    engines = {
        name: Engine(model, tokenizer, max_batch=max(batches), max_len=max_len) for name, model in variants.items()
    }
    if args.compile:
        for name, model in list(variants.items()):
            engines[f"{name} compiled"] = Engine(model, tokenizer, max_batch=max(batches), max_len=max_len, compile=True)

    probe = BandwidthProbe(torch.device("cpu"), size_bytes=(32 if args.quick else 512) * 2**20)
    bandwidths = []  # every reading, for the header

    def bandwidth_now() -> float:
        bandwidths.append(probe.measure()["bytes_per_s"])
        return bandwidths[-1]

    geometry = Geometry.of(config)
    rows = []
    for batch in batches:
        prompts = [random_prompt(config.vocab_size, args.prompt_len, seed=batch * 100 + i) for i in range(batch)]
        reference_run(reference, prompts, args.new_tokens)  # warm-up (oneDNN picks kernels per shape)
        for engine in engines.values():
            engine_run(engine, prompts, args.new_tokens)
        times = {name: [] for name in ["reference", *engines]}
        decode_times = {name: [] for name in engines}
        run_bandwidths = {name: [] for name in times}  # the higher reading around each run
        one_token = []
        for _ in range(args.repeats):
            before = bandwidth_now()
            times["reference"].append(reference_run(reference, prompts, args.new_tokens))
            one_token.append(reference_run(reference, prompts, 1))
            after = bandwidth_now()
            run_bandwidths["reference"].append(max(before, after))
            before = after
            for name, engine in engines.items():
                total, decode = engine_run(engine, prompts, args.new_tokens)
                after = bandwidth_now()
                times[name].append(total)
                decode_times[name].append(decode)
                run_bandwidths[name].append(max(before, after))
                before = after
        ref_total = median(times["reference"])
        ref_decode = batch * (args.new_tokens - 1) / max(ref_total - median(one_token), 1e-9)
        ref_e2e = batch * args.new_tokens / ref_total
        for name in times:
            e2e = batch * args.new_tokens / median(times[name])
            decode = ref_decode if name == "reference" else batch * (args.new_tokens - 1) / median(decode_times[name])
            bytes_per_param = 1 if "int8" in name else 2
            roofline = functools.partial(geometry.decode_roofline_tokens_per_s, batch, bytes_per_param)
            if name == "reference":  # its decode rate is one figure from two medians: against the median reading
                fraction = decode / roofline(median(run_bandwidths[name]))
            else:
                fraction = median([
                    batch * (args.new_tokens - 1) / seconds / roofline(bandwidth)
                    for seconds, bandwidth in zip(decode_times[name], run_bandwidths[name])
                ])  # fmt: skip
            rows.append([batch, name, e2e, decode, e2e / ref_e2e, decode / ref_decode, fraction])
            print(f"batch {batch} {name:22s} end-to-end {e2e:8.1f} tok/s  decode {decode:8.1f} tok/s  "
                  f"x{decode / ref_decode:.2f} vs reference  {100 * fraction:.0f}% of roofline", flush=True)  # fmt: skip

    ttft_prompt = [random_prompt(config.vocab_size, args.ttft_len, seed=7)]
    ttft_rows = []
    for name, fn in [("reference", lambda: reference_run(reference, ttft_prompt, 1))] + [
        (name, lambda e=engine: engine_run(e, ttft_prompt, 1)[0]) for name, engine in engines.items()
    ]:
        fn()
        ttft_rows.append([name, args.ttft_len, 1000 * median([fn() for _ in range(args.repeats)])])
        print(f"time to first token, {name}: {ttft_rows[-1][2]:.1f} ms", flush=True)

    body = "\n\n".join([
        f"Config `{args.config}` ({', '.join(f'{k}={v}' for k, v in GEOMETRIES[args.config].items())}), bf16 "
        f"activations, {torch.get_num_threads()} threads, prompt {args.prompt_len} tokens, {args.new_tokens} new "
        f"tokens, median of {args.repeats}. Memory bandwidth {min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f} "
        f"GB/s over the run (measured around each engine run; each run's fraction uses the higher reading next to "
        f"it). "
        f"CPU level: torch {torch.backends.cpu.get_cpu_capability()}, jetmoe kernels {native.level()}. "
        "Command: `python benchmarks/bench_engine.py" + (" --compile" if args.compile else "") + "`.",
        table(["batch", "implementation", "end-to-end tok/s", "decode tok/s", "e2e vs reference",
               "decode vs reference", "fraction of roofline"], rows),
        table(["implementation", "prompt tokens", "time to first token (ms)"], ttft_rows),
    ])  # fmt: skip
    if not args.quick or args.out:
        write_section(f"Engine decode ({args.config})", body, args.results)
        print(f"written to {args.results}")


if __name__ == "__main__":
    main()
