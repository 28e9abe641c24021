"""The ``tensorcompress`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 4 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected BxCxHxW with positive sizes, got {text!r}")
    return parts  # type: ignore[return-value]


def _threshold(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a float in (0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="tensorcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="decompose a realistic activation with every method")
    demo.add_argument("--shape", type=_shape, default=(64, 256, 14, 14), help="BxCxHxW")
    demo.add_argument("--threshold", type=_threshold, default=0.8, help="explained variance")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tensorcompress`` command."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from tensorcompress.experiments.demo import print_demo

            print_demo(args.shape, args.threshold, args.seed)
    except (ValueError, TypeError, OSError) as exc:
        print(f"tensorcompress {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
