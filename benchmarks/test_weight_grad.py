"""A Linear's weight gradient from a Tucker-compressed input: both contraction orders.

:func:`tensorcompress.torch.functions.linear_weight_grad` computes ``dW`` of
a Linear from the Tucker form ``core, U_lead..., U_C`` of its input in one
of two orders, and measures once per shape and ranks which one runs:

- ``projecting``: the output gradient projected onto every leading factor
  (several short products over it), contracted with the core, then ``U_C``;
- ``expanding``: the core expanded over the leading factors (the input
  projected onto ``U_C``, ``N x r_C``), one long product with the whole
  output gradient, then ``U_C``.

Cases (shapes and ranks of the layers they come from; the timing depends
on nothing else, so the factors are random orthonormal matrices):

- ``vit qkv``, ``vit fc1``: a ViT-Tiny block at batch 64 (64x65x192 input)
  at the ε 0.99 ranks (34, 44, 63), output widths 192 and 768;
- ``vit attn out``: its attention output at ranks (8, 1, 8);
- ``tokens``: the 32x197x384 token layer of the layer benchmark at its
  ε 0.8 ranks (19, 74, 68).

Per case: each order's time and vanilla's ``gy^T x`` (medians of rounds
interleaved across the three), and the order the measured choice keeps.

``pytest benchmarks/test_weight_grad.py --benchmark-only`` times each order
with pytest-benchmark (one group per case); ``python
benchmarks/test_weight_grad.py`` prints the table (``--help``).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import pytest
import torch
from _timing import bench, time_rounds

from tensorcompress import _measured
from tensorcompress.experiments.allocator import add_allocator_argument, use_allocator
from tensorcompress.results import TuckerResult
from tensorcompress.torch import functions as fn

CASES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "vit qkv": ((64, 65, 192), (34, 44, 63), 192),
    "vit fc1": ((64, 65, 192), (34, 44, 63), 768),
    "vit attn out": ((64, 65, 192), (8, 1, 8), 192),
    "tokens": ((32, 197, 384), (19, 74, 68), 384),
}
ORDERS = {"projecting": fn._projecting, "expanding": fn._expanding}
ROUNDS, WARMUP = 15, 2


def inputs(case: str) -> tuple[TuckerResult, torch.Tensor, torch.Tensor]:
    """A Tucker input of the case's shape and ranks, its reconstruction and an output gradient."""
    shape, ranks, c_out = CASES[case]
    g = torch.Generator().manual_seed(0)
    factors = tuple(
        torch.linalg.qr(torch.randn(n, r, generator=g))[0] for n, r in zip(shape, ranks)
    )
    tucker = TuckerResult(torch.randn(ranks, generator=g), factors)
    gy = torch.randn(*shape[:-1], c_out, generator=g)
    return tucker, tucker.reconstruct(), gy


def calls(case: str) -> dict[str, Any]:
    """The timed calls of a case: each order, and vanilla's product on the full input."""
    tucker, x, gy = inputs(case)
    c_in, c_out = x.shape[-1], gy.shape[-1]
    out = {name: (lambda f=f: f(tucker, gy)) for name, f in ORDERS.items()}
    out["vanilla"] = lambda: gy.reshape(-1, c_out).t() @ x.reshape(-1, c_in)
    return out


# ---------------------------------------------------------------------------
# pytest mode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_both_orders_give_vanillas_gradient_on_the_reconstruction(case: str) -> None:
    timed = calls(case)
    expected = timed["vanilla"]()
    for name in ORDERS:
        got = timed[name]()
        assert float((got - expected).norm() / expected.norm()) < 1e-5, name


@pytest.mark.parametrize("order", [*ORDERS, "vanilla"])
@pytest.mark.parametrize("case", CASES)
def test_weight_grad(benchmark: Any, case: str, order: str) -> None:
    benchmark.group = f"linear weight gradient {case}"
    bench(benchmark, calls(case)[order], ROUNDS, WARMUP)


# ---------------------------------------------------------------------------
# script mode
# ---------------------------------------------------------------------------


def chosen(case: str) -> str:
    """The order the measured choice keeps for the case (on a fresh choice)."""
    tucker, _, gy = inputs(case)
    previous = dict(_measured._chosen_options)
    _measured._chosen_options.clear()
    try:
        fn.linear_weight_grad(tucker, gy)
        picks = list(_measured._chosen_options.values())
    finally:
        _measured._chosen_options.clear()
        _measured._chosen_options.update(previous)
    return picks[0] if picks else "projecting (not measured: small, or measuring off)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"timed rounds ({ROUNDS})")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads")
    add_allocator_argument(parser)
    args = parser.parse_args(argv)
    print(use_allocator(args.allocator))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of "
        f"{args.rounds} interleaved rounds after {WARMUP}"
    )
    print(
        f"{'case':<14}{'input':>12}{'ranks':>12}{'C_out':>7}"
        f"{'projecting ms':>15}{'expanding ms':>14}{'vanilla ms':>12}  chosen"
    )
    for case, (shape, ranks, c_out) in CASES.items():
        times = time_rounds(calls(case), args.rounds, WARMUP)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(
            f"{case:<14}{'x'.join(map(str, shape)):>12}{','.join(map(str, ranks)):>12}{c_out:>7}"
            f"{ms['projecting']:>15.2f}{ms['expanding']:>14.2f}{ms['vanilla']:>12.2f}  "
            f"{chosen(case)}"
        )


if __name__ == "__main__":
    main()
