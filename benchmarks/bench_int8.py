"""int8 weight-only quantisation: perplexity against bf16 on validation text, and decode speed at batch 1.

    python benchmarks/bench_int8.py --text VALIDATION.txt                # the bundled tiny model
    python benchmarks/bench_int8.py --model DIR --text FILE
    python benchmarks/bench_int8.py --speed-config small                 # speed only, random "small" weights
    python benchmarks/bench_int8.py --quick                              # checks the script in seconds

Perplexity: the text is tokenised once, cut into windows of --seq-len tokens, and every token after a
window's first is predicted (exp of the mean cross-entropy), by the bf16 model and by its int8 copy
(jetmoe.generation.quantize: every dense and expert layer, per-output-channel scales; routers and the
embedding stay bf16). Target: within 1% of bf16.
Speed: the engine decoding --new-tokens greedy tokens at batch 1, bf16 then int8, median of --repeats runs
after a warm-up. Target: int8 >= 1.6x bf16.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import torch

from inference_common import median, random_checkpoint, random_prompt, table, write_section

QUICK_TEXT = (
    "The Python language is a programming language that lets you work quickly and integrate systems more "
    "effectively. Lists, dictionaries and sets are built in; functions are first-class objects. "
) * 4


@torch.no_grad()
def perplexity(model, ids: list[int], seq_len: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(ids), seq_len):
        window = ids[start : start + seq_len]
        if len(window) < 2:
            continue
        tensor = torch.tensor([window])
        logits = model(input_ids=tensor, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], tensor[0, 1:], reduction="sum")
        total, count = total + loss.item(), count + len(window) - 1
    return math.exp(total / count)


def decode_speed(model, tokenizer, prompt: list[int], new_tokens: int, repeats: int) -> float:
    from jetmoe.generation import Engine, SamplingParams

    engine = Engine(model, tokenizer, max_batch=1, max_len=len(prompt) + new_tokens + 1)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

    def run():
        engine.add(engine.make_sequence(prompt, params))
        start = time.perf_counter()
        while engine.running:
            engine.step()
        return (new_tokens - 1) / (time.perf_counter() - start)

    run()
    return median([run() for _ in range(repeats)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the bundled tiny model)")
    parser.add_argument("--text", default=None, help="validation text file for the perplexity")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--speed-config", default=None, help="time a random checkpoint of this geometry instead")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="random tiny model, built-in text; writes nothing")
    args = parser.parse_args()
    from jetmoe.cpu_runtime import apply_cpu_defaults

    apply_cpu_defaults()  # as the jetmoe command line does

    import transformers

    from jetmoe.generation import quantize_model
    from jetmoe.generation.loading import load_model, load_tokenizer, resolve_model_dir

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick or args.speed_config:
            path = random_checkpoint("tiny" if args.quick else args.speed_config, Path(tmp) / "random")
        else:
            path = resolve_model_dir(args.model)
        bf16 = load_model(path, "bfloat16")
        tokenizer = load_tokenizer(path)
    int8 = copy.deepcopy(bf16)
    quantize_model(int8)

    rows, notes = [], []
    if args.text or args.quick:
        text = QUICK_TEXT if args.quick else Path(args.text).read_text(encoding="utf-8")
        ids = tokenizer(text)["input_ids"]
        seq_len = min(args.seq_len, bf16.config.max_position_embeddings)
        ppl_bf16, ppl_int8 = perplexity(bf16, ids, seq_len), perplexity(int8, ids, seq_len)
        change = ppl_int8 / ppl_bf16 - 1
        rows.append(
            [
                "perplexity",
                ppl_bf16,
                ppl_int8,
                f"{100 * change:+.2f}%",
                "within 1%: " + ("yes" if abs(change) < 0.01 else "NO"),
            ]
        )
        notes.append(
            f"perplexity over {len(ids)} tokens of `{'built-in text' if args.quick else args.text}`, windows of {seq_len}"
        )
        print(f"perplexity bf16 {ppl_bf16:.4f}  int8 {ppl_int8:.4f}  ({100 * change:+.2f}%)", flush=True)
    prompt = random_prompt(bf16.config.vocab_size, 32, seed=1)
    speed_bf16 = decode_speed(bf16, tokenizer, prompt, args.new_tokens, args.repeats)
    speed_int8 = decode_speed(int8, tokenizer, prompt, args.new_tokens, args.repeats)
    ratio = speed_int8 / speed_bf16
    rows.append(
        [
            "decode tok/s, batch 1",
            speed_bf16,
            speed_int8,
            f"x{ratio:.2f}",
            ">= 1.6x: " + ("yes" if ratio >= 1.6 else "NO"),
        ]
    )
    print(f"decode batch 1: bf16 {speed_bf16:.1f} tok/s  int8 {speed_int8:.1f} tok/s  (x{ratio:.2f})", flush=True)

    source = args.speed_config and f"random `{args.speed_config}` weights" or f"`{path}`"
    body = (
        f"Model {source}, {torch.get_num_threads()} threads; "
        + "; ".join(
            notes + [f"decode: {args.new_tokens} greedy tokens after a 32-token prompt, median of {args.repeats}"]
        )
        + ".\n\n"
        + table(["measure", "bf16", "int8", "change", "target"], rows)
    )
    if not args.quick:
        write_section("int8 weight-only" + (f" ({args.speed_config})" if args.speed_config else ""), body)
        print("written to benchmarks/RESULTS_inference.md")


if __name__ == "__main__":
    main()
