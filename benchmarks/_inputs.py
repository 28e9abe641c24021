"""What the decomposition and layer suites run on: activations, thresholds, threads.

The one cache of benchmark activations lives here, shared by both suites and
both modes. The scripts take ``--sources``, ``--thresholds``, ``--threads`` and ``--plans``
(see :func:`add_arguments`); pytest takes ``--source``, ``--threshold`` and
``--threads`` (see ``conftest.py``).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

import tensorcompress
from tensorcompress.experiments.activations import SOURCES, Source, realistic_activation
from tensorcompress.experiments.allocator import add_allocator_argument

DEFAULT_THREADS = torch.get_num_threads()  # read at start, before any --threads


@functools.lru_cache(maxsize=32)
def activation(shape: tuple[int, ...], seed: int, source: Source = "images") -> torch.Tensor:
    """A realistic activation, computed once per process.

    The tensor is shared between callers: do not modify it in place.
    """
    return realistic_activation(shape, seed, source=source)


@dataclass(frozen=True)
class Setting:
    """One section of a ratio table: image source, torch threads, explained variance."""

    source: Source
    threads: int
    threshold: float
    product_dtype: torch.dtype | None = None
    """ASI's and HOSVD's ``product_dtype`` (``None``: the input's, float32)."""

    def __str__(self) -> str:
        text = f"{self.source}, {self.threads} thread(s), ranks from eps {self.threshold:g}"
        if self.product_dtype is not None:
            text += f", ASI and HOSVD products in {str(self.product_dtype).removeprefix('torch.')}"
        return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--sources``, ``--thresholds``, ``--threads``, ``--plans``, ``--product-dtype``
    and ``--allocator``."""
    parser.add_argument(
        "--sources", nargs="+", choices=SOURCES, default=["images"], help="activation images"
    )
    parser.add_argument(
        "--thresholds", nargs="+", type=float, default=[0.8], help="explained variance of ranks"
    )
    parser.add_argument(
        "--threads",
        nargs="+",
        type=_threads,
        default=[DEFAULT_THREADS],
        metavar="N|default",
        help=f"torch intra-op threads, one table each (default: {DEFAULT_THREADS}, torch's)",
    )
    parser.add_argument(
        "--plans",
        choices=("measured", "estimated"),
        default="measured",
        help="sweep plans: the fastest measured on the first call, or the cost estimate's "
        "(tensorcompress.measured_plans)",
    )
    parser.add_argument(
        "--product-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of ASI's and HOSVD's tensor products (their product_dtype); the "
        "baselines, TensorLy and vanilla stay in float32",
    )
    add_allocator_argument(parser)


def settings(args: argparse.Namespace) -> Iterator[Setting]:
    """Every (threads, source, threshold) of ``args``, setting torch's threads on the way."""
    tensorcompress.measured_plans(args.plans == "measured")
    low = None if args.product_dtype == "float32" else getattr(torch, args.product_dtype)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for source in args.sources:
            for threshold in args.thresholds:
                yield Setting(source, threads, threshold, low)
    torch.set_num_threads(DEFAULT_THREADS)


def _threads(text: str) -> int:
    return DEFAULT_THREADS if text == "default" else int(text)
