"""Shared by the inference benchmarks: random checkpoints of a named geometry, a tokenizer to go with them,
and writing one section of benchmarks/RESULTS_inference.md."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS_inference.md"

GEOMETRIES = {
    # The speed issue's "small" config.
    "small": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_key_value_heads=8, kv_channels=64,
                  intermediate_size=1408, num_local_experts=8, num_experts_per_tok=2),
    # For --quick: checks a script end to end in seconds; its numbers mean nothing.
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_key_value_heads=4, kv_channels=32,
                 intermediate_size=256, num_local_experts=8, num_experts_per_tok=2),
}  # fmt: skip


def word_tokenizer(vocab_size: int):
    """A tokenizer with exactly `vocab_size` entries ("<pad>", "<s>", "</s>", then "w3", "w4", ...), one per
    whitespace-separated word. Random checkpoints have no tokenizer; this one makes the engine and the
    server run their full text path (encode, streaming decode) at the model's real vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def random_checkpoint(geometry: str, path: Path, seed: int = 0) -> Path:
    """transformers' JetMoeForCausalLM (the reference) at random init, saved in bf16 with a word tokenizer.
    Both implementations load these same weights."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.JetMoeConfig(**GEOMETRIES[geometry], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.JetMoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    word_tokenizer(config.vocab_size).save_pretrained(path)
    return Path(path)


def random_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab_size, (length - 1,), generator=generator).tolist()


DECODE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_alternation_arguments(parser, rounds: int, steps: int) -> None:
    """The options of a benchmark that alternates blocks of decode steps of one engine between two variants."""
    parser.add_argument("--config", default="small", choices=sorted(GEOMETRIES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DECODE_DTYPES))
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps, help="decode steps per timed block")


def alternation_engine(args):
    """(model, engine) for add_alternation_arguments' options: jetmoe's model of a random-init checkpoint, and an
    engine holding --batch random 32-token prompts, each with room to decode greedily through every round of both
    variants and a warm-up of up to 40 steps."""
    import tempfile

    from jetmoe import JetMoeForCausalLM
    from jetmoe.generation import Engine, SamplingParams
    from jetmoe.generation.loading import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(args.config, Path(tmp) / args.config)
        model = JetMoeForCausalLM.from_pretrained(path, dtype=DECODE_DTYPES[args.dtype]).eval()
        tokenizer = load_tokenizer(path)
    steps = (args.rounds * 2 + 2) * (args.steps + 1) + 40
    engine = Engine(model, tokenizer, max_batch=args.batch, max_len=32 + steps + 8)
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    for row in range(args.batch):
        engine.add(engine.make_sequence(random_prompt(model.config.vocab_size, 32, seed=row), params))
    return model, engine


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(int(round(q / 100 * (len(ordered) - 1))), len(ordered) - 1)
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or add) the section `## title` of the results file, leaving the other sections alone."""
    text = (
        path.read_text()
        if path.exists()
        else "# Inference benchmarks\n\nWritten by benchmarks/bench_engine.py, bench_server.py and bench_int8.py.\n"
    )
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
