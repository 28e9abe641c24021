"""``tensorcompress demo``: every decomposition on one realistic activation."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tensorcompress import asi, hosvd, svd
from tensorcompress.experiments.activations import realistic_activation

__all__ = ["DemoRow", "add_arguments", "main", "run_demo"]


@dataclass(frozen=True)
class DemoRow:
    """One method's outcome on the demo tensor."""

    method: str
    ranks: tuple[int, ...]
    relative_error: float
    nbytes: int
    seconds: float


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_demo(
    shape: tuple[int, int, int, int] = (64, 256, 14, 14), threshold: float = 0.8, seed: int = 0
) -> tuple[int, list[DemoRow]]:
    """Decompose two consecutive realistic batches with every method.

    Returns the activation's size in bytes and one row per method, measured on
    the second batch (ASI warm-started from the first).
    """
    first, second = (realistic_activation(shape, seed + i) for i in range(2))
    cold = asi.decompose(first, threshold)
    ranks = hosvd.decompose(second, threshold).ranks
    rows = []
    cases = {
        "svd (channel unfolding)": lambda: svd.decompose(second, threshold, mode=1),
        "hosvd": lambda: hosvd.decompose(second, threshold, sequential=False),
        # ST-HOSVD at HOSVD's ranks: thresholds are defined on x's own
        # unfoldings, so with a threshold both variants would do the same work.
        "st-hosvd (same ranks)": lambda: hosvd.decompose(second, ranks),
        "asi (cold)": lambda: asi.decompose(second, threshold),
        "asi (warm, cold ranks)": lambda: asi.decompose(second, threshold, warm_start=cold),
    }
    for name, fn in cases.items():
        res, seconds = _timed(fn)
        rows.append(DemoRow(name, res.ranks, res.relative_error(second), res.nbytes, seconds))
    return second.numel() * second.element_size(), rows


def print_demo(shape: tuple[int, int, int, int], threshold: float, seed: int) -> None:
    """Print the demo table."""
    with torch.no_grad():
        total, rows = run_demo(shape, threshold, seed)
    print(
        f"activation {'x'.join(map(str, shape))} float32 ({total / 2**20:.2f} MB) from "
        f"scikit-learn's sample images through a seeded conv stack; explained variance {threshold}"
    )
    print(f"{'method':<24} {'ranks':<18} {'rel. error':>10} {'kept':>10} {'% of x':>7} {'ms':>8}")
    for r in rows:
        print(
            f"{r.method:<24} {','.join(map(str, r.ranks)):<18} {r.relative_error:10.4f} "
            f"{r.nbytes / 2**10:8.1f}KB {100 * r.nbytes / total:6.2f}% {1e3 * r.seconds:8.2f}"
        )


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 4 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected BxCxHxW with positive sizes, got {text!r}")
    return (parts[0], parts[1], parts[2], parts[3])


def _threshold(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a float in (0, 1], got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tensorcompress demo``."""
    parser.add_argument("--shape", type=_shape, default=(64, 256, 14, 14), help="BxCxHxW")
    parser.add_argument("--threshold", type=_threshold, default=0.8, help="explained variance")
    parser.add_argument("--seed", type=int, default=0, help="chooses the image crops")


def main(args: argparse.Namespace) -> int:
    """Run ``tensorcompress demo``."""
    print_demo(args.shape, args.threshold, args.seed)
    return 0
