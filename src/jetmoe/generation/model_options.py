"""The model options every generation front end shares (`jetmoe generate`, `chat`, `serve`) and the Engine
they describe: --model/--dtype/--int8/--max-len/--compile/--device/--force-model-type."""

from __future__ import annotations

import argparse

from .loading import DTYPES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="DIR", help="HF-format JetMoE checkpoint directory (default: the bundled tiny model)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="compute dtype (default bfloat16)")
    parser.add_argument("--int8", action="store_true", help="quantise dense and expert weights to int8 on load")
    parser.add_argument(
        "--max-len", type=int, default=None, help="context length: prompt + output tokens (default: the model's)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (on CPU, bf16 and int8 decode faster eagerly, through jetmoe's C layers)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument(
        "--force-model-type",
        action="store_true",
        help="load the model as JetMoE even if its config.json names another model_type (refused otherwise)",
    )


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def build_engine(args, max_batch: int = 1):
    """The Engine for parsed model options (see `add_model_arguments`)."""
    from .engine import Engine
    from .loading import load

    quiet_transformers()
    model, tokenizer, _ = load(args.model, args.dtype, args.int8, args.device, getattr(args, "force_model_type", False))
    return Engine(model, tokenizer, max_batch=max_batch, max_len=args.max_len, compile=args.compile)
