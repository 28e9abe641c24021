"""One input, one decomposition: ViT-Tiny's q/k/v sharing their compressed input.

ViT-Tiny (hidden 192, 3 heads, MLP 768) on 32x32 images in 4x4 patches
(65 tokens), the Linear layers of its last blocks converted to ASI at
explained variance 0.8, with and without :class:`~tensorcompress.torch.SharedInput`
groups (``convert(..., share_inputs=...)``), against vanilla training of the
same layers. A step is forward, backward and ``zero_grad`` on one fixed
batch (ASI warm-started after the warm-up steps).

Per variant it reports the decompositions one step runs (counted), the bytes
the selected layers keep (:func:`tensorcompress.torch.measure.activation_memory`:
the per-layer sum, which charges every member of a group for the factors it
saves, and the distinct storages, ``kept - shared``, which count them once),
and the step time: the median of rounds interleaved across the variants,
and its ratio to the unshared run and to vanilla in the same rounds.

``pytest benchmarks/test_shared_input.py --benchmark-only`` times each
variant with pytest-benchmark (group ``shared_input``);
``python benchmarks/test_shared_input.py`` prints the table (``--help`` for
the batch, the number of blocks, rounds and threads).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from tensorcompress.experiments.allocator import add_allocator_argument, use_allocator
from tensorcompress.models import vit_tiny
from tensorcompress.torch import CompressedLinear, convert, input_groups, last_blocks
from tensorcompress.torch.measure import activation_memory

VARIANTS = ("vanilla", "asi unshared", "asi shared")
BATCH, BLOCKS, RANK = 16, 4, 0.8
ROUNDS, WARMUP = 15, 2  # the warm-up covers ASI's cold start


@dataclass
class Setup:
    """A model of one variant and its fixed batch."""

    variant: str
    model: nn.Module
    x: torch.Tensor

    def step(self) -> None:
        self.model(self.x).logits.square().mean().backward()
        self.model.zero_grad(set_to_none=True)


def build(batch: int = BATCH, blocks: int = BLOCKS) -> dict[str, Setup]:
    """The three variants on the same weights and batch (fine-tuning only the selected layers)."""
    torch.manual_seed(0)
    base = vit_tiny()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    layers = last_blocks(blocks)
    setups = {}
    for variant in VARIANTS:
        model = copy.deepcopy(base).train()
        if variant != "vanilla":
            share = variant == "asi shared"
            convert(
                model,
                method="asi",
                rank=RANK,
                layers=layers,
                example_input=x,
                freeze_others=True,
                share_inputs=share,
            )
        else:
            convert(model, method="vanilla", layers=layers, example_input=x, freeze_others=True)
        setups[variant] = Setup(variant, model, x)
    return setups


@contextmanager
def counting() -> Iterator[list[str]]:
    """Names of the layers whose input is decomposed, one entry per decomposition."""
    calls: list[str] = []
    original = CompressedLinear._compress_input

    def counted(self: CompressedLinear, x: torch.Tensor, out_shape: tuple[int, ...]) -> Any:
        calls.append(self.layer_name)
        return original(self, x, out_shape)

    CompressedLinear._compress_input = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        CompressedLinear._compress_input = original  # type: ignore[method-assign]


@dataclass(frozen=True)
class Measured:
    """What one step of a variant decomposes and keeps."""

    decompositions: int
    kept_bytes: int
    distinct_bytes: int
    groups: int


def measure(setup: Setup, blocks: int) -> Measured:
    for _ in range(WARMUP):
        setup.step()
    with counting() as calls:
        setup.step()
    report = activation_memory(setup.model, setup.x, layers=last_blocks(blocks))
    return Measured(
        decompositions=len(calls),
        kept_bytes=report.kept_bytes,
        distinct_bytes=report.kept_bytes - report.shared_bytes,
        groups=len(input_groups(setup.model)),
    )


def time_rounds(calls: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call, the calls interleaved round by round (after a warm-up)."""
    for call in calls.values():
        for _ in range(WARMUP):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------
# pytest mode
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setups() -> dict[str, Setup]:
    return build()


def test_one_decomposition_per_distinct_input(setups: dict[str, Setup]) -> None:
    shared = measure(setups["asi shared"], BLOCKS)
    alone = measure(setups["asi unshared"], BLOCKS)
    assert (alone.decompositions, shared.decompositions) == (6 * BLOCKS, 4 * BLOCKS)
    assert shared.groups == BLOCKS and alone.groups == 0
    assert shared.distinct_bytes < alone.distinct_bytes


@pytest.mark.parametrize("variant", VARIANTS)
def test_step(benchmark: Any, setups: dict[str, Setup], variant: str) -> None:
    benchmark.group = "shared_input"
    step = setups[variant].step
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


# ---------------------------------------------------------------------------
# script mode
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=BATCH, help=f"images (default {BATCH})")
    parser.add_argument("--blocks", type=int, default=BLOCKS, help=f"last blocks ({BLOCKS})")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"timed rounds ({ROUNDS})")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads")
    add_allocator_argument(parser)
    args = parser.parse_args(argv)
    print(use_allocator(args.allocator))
    if args.threads:
        torch.set_num_threads(args.threads)
    setups = build(args.batch, args.blocks)
    measured = {v: measure(s, args.blocks) for v, s in setups.items()}
    times = time_rounds({v: s.step for v, s in setups.items()}, args.rounds)
    medians = {v: statistics.median(t) for v, t in times.items()}
    print(
        f"ViT-Tiny, batch {args.batch} of 32x32, last {args.blocks} blocks, ASI @ {RANK}; "
        f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, "
        f"{args.rounds} interleaved rounds"
    )
    header = f"{'variant':<14}{'decomp/step':>12}{'kept MB':>10}{'distinct MB':>13}"
    print(header + f"{'step ms':>10}{'x unshared':>12}{'x vanilla':>11}")
    for v in VARIANTS:
        m = measured[v]
        print(
            f"{v:<14}{m.decompositions:>12}{m.kept_bytes / 2**20:>10.3f}"
            f"{m.distinct_bytes / 2**20:>13.3f}{medians[v] * 1e3:>10.1f}"
            f"{medians[v] / medians['asi unshared']:>12.2f}{medians[v] / medians['vanilla']:>11.2f}"
        )


if __name__ == "__main__":
    main()
