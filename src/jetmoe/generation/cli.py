"""`jetmoe generate`, `jetmoe chat` and `jetmoe quantize`."""

from __future__ import annotations

import argparse
import sys
import time

from ..modeling.backends import selected_backend
from .loading import DTYPES
from .model_options import add_model_arguments, build_engine, quiet_transformers


def _add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument(
        "--max-tokens", type=int, default=max_tokens, help=f"tokens to generate at most (default {max_tokens})"
    )
    parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default 0.7)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95; 1: off)")
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1: off)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def _sampling(args, extra_stop: tuple[str, ...] = ()):
    from .sampler import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop) + extra_stop,
    )


def _memory_gib() -> dict[str, float]:
    """This process's resident memory by kind (Linux): RssAnon is its own, RssFile mapped files (weights)."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("RssAnon", "RssFile")))
    except OSError:
        return {}
    return {key: int(value.split()[0]) / 2**20 for key, value in fields.items()}


def _print_stats(load_s: float, completions, generate_s: float, device) -> None:
    prompt_tokens = sum(c.prompt_tokens for c in completions)
    tokens = sum(c.completion_tokens for c in completions)
    line = (
        f"[stats] backend {selected_backend(device)}; load {load_s:.1f} s; {prompt_tokens} prompt + {tokens} "
        f"generated tokens in {generate_s:.2f} s ({tokens / max(generate_s, 1e-9):.2f} tok/s)"
    )
    if len(completions) == 1 and completions[0].decode_tokens_per_s is not None:
        line += f", {completions[0].decode_tokens_per_s:.2f} tok/s after the first token"
    memory = _memory_gib()
    if memory:
        line += f"; resident: {memory.get('RssAnon', 0):.2f} GiB own, {memory.get('RssFile', 0):.2f} GiB mapped files"
    print(line, file=sys.stderr)


def run_generate(args) -> int:
    params = _sampling(args)  # bad settings fail before the model loads
    started = time.perf_counter()
    engine = build_engine(args, max_batch=max(1, min(len(args.prompt), 32)))
    loaded = time.perf_counter()
    if len(args.prompt) == 1 and not args.no_stream:
        out = sys.stdout
        out.write(args.prompt[0])
        out.flush()
        for piece in engine.stream(args.prompt[0], params):
            out.write(piece)
            out.flush()
        out.write("\n")
        completions = [engine.last_completion]
    else:
        completions = engine.generate(args.prompt, params)
        for prompt, completion in zip(args.prompt, completions):
            print(prompt + completion.text)
            if len(args.prompt) > 1:
                print("-" * 40)
    if args.stats:
        device = next(engine.model.parameters()).device
        _print_stats(loaded - started, completions, time.perf_counter() - loaded, device)
    return 0


def run_chat(args) -> int:
    from .chat import chat_prompt_ids, chat_stop_strings

    engine = build_engine(args)
    params = _sampling(args, chat_stop_strings(engine.tokenizer))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("jetmoe chat: /reset starts over, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = chat_prompt_ids(engine.tokenizer, messages)
        if len(prompt) >= engine.max_len:
            print(
                f"(the conversation has {len(prompt)} tokens, over the context of {engine.max_len}: /reset)",
                file=sys.stderr,
            )
            messages.pop()
            continue
        reply = []
        for piece in engine.stream(prompt, params):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0


def run_quantize(args) -> int:
    from .loading import load
    from .quantize import quantize_model, save_quantized

    quiet_transformers()
    model, tokenizer, _ = load(args.model, args.dtype, force_model_type=args.force_model_type)
    quantize_model(model)
    path = save_quantized(model, args.out, tokenizer)
    print(f"int8 checkpoint written to {path}")
    return 0


def register(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="complete a prompt", description="Complete one or more prompts.")
    gen.add_argument("prompt", nargs="+", help="prompt text (several: completed as one batch)")
    add_model_arguments(gen)
    _add_sampling_arguments(gen, max_tokens=64)
    gen.add_argument("--no-stream", action="store_true", help="print the completion when it is done")
    gen.add_argument(
        "--stats", action="store_true", help="print load time, tokens/s and resident memory to stderr at the end"
    )
    gen.set_defaults(run=run_generate)

    chat = subparsers.add_parser("chat", help="interactive chat", description="Chat on stdin/stdout.")
    add_model_arguments(chat)
    _add_sampling_arguments(chat, max_tokens=256)
    chat.add_argument("--system", default=None, help="system message")
    chat.set_defaults(run=run_chat)

    quant = subparsers.add_parser("quantize", help="write an int8 copy of a checkpoint")
    quant.add_argument("--model", metavar="DIR", help="source checkpoint (default: the bundled tiny model)")
    quant.add_argument("--out", metavar="DIR", required=True, help="where to write the int8 checkpoint")
    quant.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the float tensors kept")
    quant.add_argument("--force-model-type", action="store_true",
                       help="load the model as JetMoE even if its config.json names another model_type")
    quant.set_defaults(run=run_quantize)
