"""`jetmoe` command line: train | eval (training/), generate | chat (generation/), serve (serving/), env.

Each front-end package exposes `register(subparsers)`, adding its sub-commands with `set_defaults(run=...)`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .cpu_runtime import apply_cpu_defaults

FRONT_ENDS = ("jetmoe.training.cli", "jetmoe.generation.cli", "jetmoe.serving.cli", "jetmoe.environment")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jetmoe", description="Run, train and serve JetMoE models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in FRONT_ENDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if not module_name.startswith(error.name or "\0"):
                raise
            continue  # that front-end is not part of this build
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_cpu_defaults()  # a CLI run owns its process (see cpu_runtime.py)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"jetmoe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
