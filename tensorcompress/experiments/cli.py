"""The ``tensorcompress`` command line.

Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``main(args) -> int``; this file only dispatches
and turns expected errors into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

# name -> (module, help); modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("tensorcompress.experiments.demo", "decompose a realistic activation"),
    "run": ("tensorcompress.experiments.run", "pretrain, then fine-tune with every method"),
    "table": ("tensorcompress.experiments.table", "the paper's Mem and GFLOPs table for one model"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="tensorcompress",
        description="Tensor decompositions for compressed-activation fine-tuning.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tensorcompress`` command."""
    args = build_parser().parse_args(argv)
    try:
        code: int = importlib.import_module(COMMANDS[args.command][0]).main(args)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        print(f"tensorcompress {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tensorcompress {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
