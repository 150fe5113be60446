"""`jetmoe train` and `jetmoe eval` sub-commands.

    jetmoe train --preset tiny                              # the embedded corpus, on this machine
    jetmoe train --config run.yaml --lr 1e-3 --set model.num_hidden_layers=8
    jetmoe train --config run.yaml --resume                 # continue from the latest complete checkpoint
    jetmoe train --config run.yaml --resume-or-start        # the same, or a fresh start if there is none
    torchrun --nproc_per_node 8 -m jetmoe.cli train --config run.yaml
    jetmoe eval --model runs/tiny/checkpoints/step-00000600 --text notes.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .config import GROUPS, TrainConfig, build_config, flag_name, parse_value


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train or fine-tune a JetMoE model",
        description="Train a JetMoE model: a preset, then a YAML/TOML config file, then these flags. "
        "Every config key is a flag; --set KEY=VALUE sets any key, model.<field> included. The defaults shown are "
        "TrainConfig's; a preset (tiny unless --preset or the file names another) changes some of them: "
        "--print-config shows the resolved values.",
    )
    train.add_argument("--preset", help="named starting point: tiny (this CPU, minutes) or jetmoe-8b")
    train.add_argument("--config", help="a .yaml / .yml / .toml file of settings (it may name a `preset`)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest complete checkpoint in out_dir (broken ones are reported and "
                       "skipped); an error if none is usable")
    train.add_argument("--resume-or-start", action="store_true",
                       help="like --resume, but start from scratch if no checkpoint is usable (damaged ones are kept)")
    train.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                       help="set any key, e.g. --set model.hidden_size=256 (repeatable)")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_config_flags(train)
    train.set_defaults(run=run_train)

    evaluate = subparsers.add_parser("eval", help="perplexity of a model on a text file")
    evaluate.add_argument("--model", required=True, help="an HF-format JetMoE folder (a checkpoint or export)")
    evaluate.add_argument("--text", required=True, help="a UTF-8 text file")
    evaluate.add_argument("--seq-len", type=int, default=None, help="window length (default: min(max positions, 1024))")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(run=run_eval)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, in argument groups, each with its help line, default and allowed values
    (all from the field's metadata, see config.option); a value outside the choices is a usage error naming both."""
    groups = {name: parser.add_argument_group(f"{name} ({about})") for name, about in GROUPS.items()}
    for spec in dataclasses.fields(TrainConfig):
        if spec.name == "model":
            continue
        meta = spec.metadata
        if meta.get("group") not in groups or not meta.get("help"):
            raise TypeError(f"TrainConfig.{spec.name} has no help or group: declare it with config.option(...)")
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        text = f"{meta['help']} (default: {_shown_default(default)})"
        choices = meta.get("choices")
        if choices:
            text += f"; one of: {', '.join('null' if c is None else str(c) for c in choices)}"
        group = groups[meta["group"]]
        flag = flag_name(spec.name)
        text = text.replace("%", "%%")
        if spec.type == "bool":
            group.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=text)
        elif spec.type == "list":
            group.add_argument(flag, dest=spec.name, nargs="*" if choices else "+", default=argparse.SUPPRESS,
                               metavar="VALUE", choices=choices, help=text)
        else:
            group.add_argument(flag, dest=spec.name, type=parse_value, default=argparse.SUPPRESS, choices=choices,
                               metavar="CHOICE" if choices else "VALUE", help=text)


def _shown_default(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def _overrides(args: argparse.Namespace) -> dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {name: getattr(args, name) for name in names if hasattr(args, name)}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key.strip()] = parse_value(value)
    return overrides


def run_train(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .trainer import TrainingError, train

    config = build_config(args.preset, args.config, _overrides(args))
    if args.print_config:
        from .config import dump_yaml

        print(dump_yaml(config), end="")
        return 0
    try:
        summary = train(config, resume=args.resume or args.resume_or_start, start_if_none=args.resume_or_start)
    except (TrainingError, CheckpointError) as error:
        print(f"jetmoe train: error: {error}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        print(json.dumps(summary, default=str))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_perplexity

    result = evaluate_perplexity(args.model, args.text, args.seq_len, args.batch_size, args.device)
    print(f"perplexity {result['perplexity']:.4f} (loss {result['loss']:.4f} nats/token over {result['tokens']} tokens, "
          f"windows of {result['seq_len']})")
    return 0
