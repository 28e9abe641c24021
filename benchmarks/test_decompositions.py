"""Speed of the core decompositions on realistic activations (pytest-benchmark).

Run ``pytest benchmarks/test_decompositions.py --benchmark-only`` for the
pytest-benchmark tables, or ``python benchmarks/test_decompositions.py`` for
the ratio table of the README: interleaved repeats, medians, and the relative
error of each method on the same batch. ``ref/asi`` is the ratio of the
medians; ``(rounds)`` the quartiles of the ratios taken round by round (each
round times both in turn, so a busy machine slows both), which shows how far
one run can be trusted. ``(flops)`` is the reference's counted floating-point
operations over warm ASI's, the speed-up that equal arithmetic efficiency
would give. ``--breakdown`` prints, for warm ASI and the reference, the time
of one call spent in each product (and QR, copy, ...) by operand shapes, and
the products' speed in GFLOP/s, from torch's profiler: where the time goes.

Warm ASI is timed as in training: two different batches through the same
layers, alternating, each step warm-started from the previous step's result.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import tensorly as tl
import torch
from tensorly.decomposition import tucker
from torch.utils.flop_counter import FlopCounterMode

from tensorcompress import asi, hosvd, tenalg
from tensorcompress.experiments.activations import realistic_activation

SHAPES = [(64, 512, 7, 7), (64, 256, 14, 14), (64, 96, 28, 28), (32, 64, 56, 56), (32, 197, 384)]
THRESHOLD = 0.8


def reference_asi(x: torch.Tensor, factors: list[torch.Tensor]) -> tuple[Any, list[Any]]:
    """ASI as a straightforward implementation writes it: every mode on the full tensor.

    For each mode: unfold (a permuted copy), one step ``Y = A_k (A_k^T U_k)``,
    QR; then the core by one full-size mode product per mode.
    """
    new = []
    for k, u in enumerate(factors):
        a_k = tenalg.unfold(x, k)
        new.append(torch.linalg.qr(a_k @ (a_k.T @ u)).Q)
    core = x
    for k, u in enumerate(new):
        core = torch.movedim(torch.tensordot(u.T, torch.movedim(core, k, 0), dims=1), 0, k)
    return core, new


def tensorly_tucker(x: torch.Tensor, ranks: tuple[int, ...]) -> tuple[Any, list[Any]]:
    """TensorLy's HOSVD-initialised Tucker (one HOOI sweep) on its PyTorch backend."""
    with tl.backend_context("pytorch"):
        core, factors = tucker(x, rank=list(ranks), init="svd", n_iter_max=1, tol=None)
    return core, factors


def svd_lowrank(x: torch.Tensor, ranks: tuple[int, ...]) -> tuple[Any, ...]:
    """torch's randomized SVD of the channel-mode unfolding at the channel rank."""
    return torch.svd_lowrank(tenalg.unfold(x, 1), q=ranks[1], niter=2)


class Case:
    """Two batches of one activation shape, their ranks and a warm ASI stream."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.batches = [realistic_activation(shape, seed) for seed in (0, 1)]
        self.ranks = hosvd.decompose(self.batches[0], THRESHOLD).ranks
        self.warm = asi.decompose(self.batches[0], self.ranks)
        self.ref_factors = list(self.warm.factors)
        self.steps = {"asi": 0, "reference": 0}

    def batch(self, stream: str) -> torch.Tensor:
        # Each ASI stream alternates the two batches on its own, so both see
        # the same batch in the same round and their errors compare.
        self.steps[stream] += 1
        return self.batches[self.steps[stream] % 2]

    def asi_warm(self) -> Any:
        x = self.batch("asi")
        self.warm = asi.decompose(x, self.ranks, warm_start=self.warm, check_finite=False)
        return x, self.warm

    def asi_reference(self) -> Any:
        x = self.batch("reference")
        core, self.ref_factors = reference_asi(x, self.ref_factors)
        return x, (core, self.ref_factors)

    def methods(self) -> dict[str, Callable[[], Any]]:
        x = self.batches[0]
        return {
            "asi_warm": self.asi_warm,
            "asi_reference": self.asi_reference,
            "hosvd": lambda: (x, hosvd.decompose(x, self.ranks, check_finite=False)),
            "tensorly_tucker": lambda: (x, tensorly_tucker(x, self.ranks)),
            "torch_svd_lowrank": lambda: (x, svd_lowrank(x, self.ranks)),
        }


_CASES: dict[tuple[int, ...], Case] = {}


def case(shape: tuple[int, ...]) -> Case:
    if shape not in _CASES:
        _CASES[shape] = Case(shape)
    return _CASES[shape]


def error(x: torch.Tensor, result: Any) -> float:
    """Relative reconstruction error of a Tucker (core, factors) or an SVD triple."""
    parts = tuple(result)
    if len(parts) == 3:
        u, s, v = parts
        approx = tenalg.fold((u * s) @ v.T, 1, x.shape)
    else:
        approx = tenalg.tucker_to_tensor(parts[0], list(parts[1]))
    return tenalg.relative_error(x, approx)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "method", ["asi_warm", "asi_reference", "hosvd", "tensorly_tucker", "torch_svd_lowrank"]
)
def test_decomposition(benchmark: Any, shape: tuple[int, ...], method: str) -> None:
    fn = case(shape).methods()[method]
    x, result = benchmark(fn)
    assert error(x, result) < 1.0


def test_breakdown_sees_every_product() -> None:
    """The breakdown lists the products torch's flop counter counts, once per call."""
    a, b, c = torch.randn(64, 32), torch.randn(32, 48), torch.randn(8, 16, 24)

    def fn() -> None:
        a @ b
        c @ c.mT
        torch.linalg.qr(b)

    rows = breakdown(fn, calls=3, share=1.0)
    products = {(r["op"], tuple(r["shapes"])): r for r in rows if r["gflops"] is not None}
    assert set(products) == {("mm", ((64, 32), (32, 48))), ("bmm", ((8, 16, 24), (8, 24, 16)))}
    assert all(r["count"] == 1 and r["gflops"] > 0 for r in products.values())
    flops = sum(_product_flops(op, list(shapes)) for op, shapes in products)
    assert flops == counted_flops(fn)
    assert any(r["op"] == "linalg_qr" for r in rows)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)


def ratio_table(
    repeats: int = 7, shapes: Sequence[tuple[int, ...]] = tuple(SHAPES)
) -> Iterator[dict[str, Any]]:
    """Interleaved timings: for each shape, medians over ``repeats`` rounds."""
    torch.manual_seed(0)
    for shape in shapes:
        c = case(shape)
        methods = c.methods()
        for fn in methods.values():  # warm-up (and a settled ASI stream)
            fn()
        times: dict[str, list[float]] = {name: [] for name in methods}
        errors: dict[str, float] = {}
        for _ in range(repeats):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                x, result = fn()
                times[name].append(time.perf_counter() - t0)
                errors[name] = error(x, result)
        med = {name: statistics.median(t) for name, t in times.items()}
        rounds = [r / a for r, a in zip(times["asi_reference"], times["asi_warm"], strict=True)]
        flops = {name: counted_flops(methods[name]) for name in ("asi_warm", "asi_reference")}
        yield {
            "shape": shape,
            "ranks": c.ranks,
            "median_s": med,
            "round_quartiles": quartiles(rounds),
            "error": errors,
            "flops": flops,
        }


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartiles (the ends of the middle half of ``values``)."""
    if len(values) < 2:  # one round has no spread
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def counted_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call, as torch's counter scores them
    (matrix products; QR and eigh, a small share here, count as zero)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def breakdown(fn: Callable[[], Any], calls: int = 5, share: float = 0.95) -> list[dict[str, Any]]:
    """Where one call of ``fn`` spends its time, by operation and operand shapes.

    Parameters
    ----------
    fn : callable
        The timed call (one warm ASI step, say).
    calls : int, default 5
        Calls profiled; times are per call.
    share : float, default 0.95
        Rows are listed, slowest first, until they cover this share of the
        profiled time; the rest is one ``other`` row.

    Returns
    -------
    list of dict
        ``op`` (aten name), ``shapes`` (operand shapes), ``count`` (runs
        per call), ``ms`` per call, ``share`` of the call's profiled time and
        ``gflops`` (GFLOP/s, for matrix products; ``None`` otherwise).
    """
    with torch.profiler.profile(record_shapes=True) as prof:
        for _ in range(calls):
            fn()
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows: list[dict[str, Any]] = []
    covered = 0.0
    for e in events:
        if covered >= share * total:
            rest = total - covered
            rows.append(
                {
                    "op": "other",
                    "shapes": [],
                    "count": 0.0,
                    "ms": rest / calls / 1e3,
                    "share": rest / total,
                    "gflops": None,
                }
            )
            break
        covered += e.self_cpu_time_total
        rows.append(
            {
                "op": e.key.removeprefix("aten::"),
                "shapes": [tuple(s) for s in e.input_shapes if s],
                "count": e.count / calls,
                "ms": e.self_cpu_time_total / calls / 1e3,
                "share": e.self_cpu_time_total / total,
                "gflops": None,
            }
        )
        flops = _product_flops(rows[-1]["op"], rows[-1]["shapes"])
        if flops:
            rows[-1]["gflops"] = flops * e.count / (e.self_cpu_time_total * 1e-6) / 1e9
    return rows


def _product_flops(op: str, shapes: list[tuple[int, ...]]) -> int:
    # Multiply-adds of one matrix product, counted as two operations.
    if op == "mm" and len(shapes) == 2:
        (m, k), (_, n) = shapes
        return 2 * m * k * n
    if op == "bmm" and len(shapes) == 2:
        (b, m, k), (_, _, n) = shapes
        return 2 * b * m * k * n
    return 0


def print_breakdown(shape: tuple[int, ...]) -> None:
    """Print :func:`breakdown` of warm ASI and the reference on ``shape``."""
    methods = case(shape).methods()
    for name in ("asi_warm", "asi_reference"):
        fn = methods[name]
        fn()  # warm-up
        rows = breakdown(fn)
        total = sum(r["ms"] for r in rows)
        print(f"\n{name} on {'x'.join(map(str, shape))}: {total:.2f} ms per call (profiled)")
        print(f"{'op':>18} {'operand shapes':>34} {'ms':>7} {'share':>6} {'GFLOP/s':>8}")
        for r in rows:
            joint = " @ " if r["gflops"] is not None else ", "
            shapes = joint.join("x".join(map(str, s)) for s in r["shapes"])
            speed = "" if r["gflops"] is None else f"{r['gflops']:.1f}"
            print(
                f"{r['op'][:18]:>18} {shapes[:34]:>34} {r['ms']:7.3f} "
                f"{100 * r['share']:5.1f}% {speed:>8}"
            )


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split("x"))


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the decomposition ratio table.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument(
        "--shapes", nargs="+", type=_shape, default=SHAPES, metavar="AxBxC", help="activations"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also print where ASI and the reference spend time"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()}  ranks from explained variance {THRESHOLD}")
    header = (
        f"{'shape':>16} {'ranks':>18} {'asi warm ms':>11} {'ref/asi':>8} {'(rounds)':>10} "
        f"{'(flops)':>8} "
        f"{'err asi':>8} {'err ref':>8} {'hosvd ms':>9} {'tl/hosvd':>9} {'err hosvd':>9} "
        f"{'err tl':>7} {'lowrank ms':>10}"
    )
    print(header)
    for row in ratio_table(args.repeats, args.shapes):
        m, e, f, (q1, q3) = row["median_s"], row["error"], row["flops"], row["round_quartiles"]
        print(
            f"{'x'.join(map(str, row['shape'])):>16} {','.join(map(str, row['ranks'])):>18} "
            f"{1e3 * m['asi_warm']:11.2f} {m['asi_reference'] / m['asi_warm']:8.2f} "
            f"{f'{q1:.2f}-{q3:.2f}':>10} "
            f"{f['asi_reference'] / f['asi_warm']:8.2f} "
            f"{e['asi_warm']:8.4f} {e['asi_reference']:8.4f} {1e3 * m['hosvd']:9.2f} "
            f"{m['tensorly_tucker'] / m['hosvd']:9.1f} {e['hosvd']:9.4f} "
            f"{e['tensorly_tucker']:7.4f} {1e3 * m['torch_svd_lowrank']:10.2f}"
        )
    if args.breakdown:
        for shape in args.shapes:
            print_breakdown(shape)


if __name__ == "__main__":
    main()
