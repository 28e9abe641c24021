"""How the benchmark suites time a call, summarise the times and show where they go.

Both modes of a suite measure the same thing with the same settings:

- pytest mode hands one call to pytest-benchmark's pedantic mode
  (:func:`bench`): ``warmup`` untimed calls, then ``rounds`` rounds of one
  call each, timed with ``time.perf_counter`` (pytest-benchmark's timer);
- script mode times the calls of a group in turn, round by round
  (:func:`time_rounds`): the same warm-up, the same rounds, the same timer,
  one call per round, so a busy moment of a shared machine slows every call
  of the group, not only one;
- both summarise the times with pytest-benchmark's own ``Stats`` (median,
  quartiles, IQR, ...), so a script's median is what pytest-benchmark's
  ``Median`` column would show for the same times.

:func:`breakdown` is the profiler view of one call: where its time goes, by
operation and operand shapes, and the speed of the matrix products.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pytest_benchmark.stats import Stats
from torch.utils.flop_counter import FlopCounterMode

from tensorcompress.experiments.allocator import minor_faults

TIMER = time.perf_counter  # pytest-benchmark's default timer


def bench(benchmark: Any, call: Callable[[], Any], rounds: int, warmup: int) -> Any:
    """Time ``call`` with pytest-benchmark; return its last result.

    Parameters
    ----------
    benchmark : pytest_benchmark.fixture.BenchmarkFixture
        The fixture. With ``--benchmark-disable`` the call runs once, untimed.
    call : callable
        The timed call, no arguments.
    rounds : int
        Timed rounds of one call each.
    warmup : int
        Untimed calls before the first round.

    Returns
    -------
    object
        What ``call`` returned.
    """
    return benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)


def time_rounds(
    calls: Mapping[str, Callable[[], Any]],
    rounds: int,
    warmup: int,
    faults: dict[str, list[int]] | None = None,
) -> dict[str, list[float]]:
    """Time every call once per round, in turn; return the times in seconds.

    Parameters
    ----------
    calls : mapping of str to callable
        The calls of one group, by name.
    rounds : int
        Timed rounds; each round times every call once, in order.
    warmup : int
        Untimed rounds first.
    faults : dict, optional
        Filled with each call's minor page faults, round by round (pages the
        call mapped in on first touch: time spent on memory, not arithmetic).

    Returns
    -------
    dict of str to list of float
        ``rounds`` times of each call, round by round.
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            before = minor_faults() if faults is not None else 0
            start = TIMER()
            call()
            times[name].append(TIMER() - start)
            if faults is not None:
                faults.setdefault(name, []).append(minor_faults() - before)
    return times


def summary(times: list[float]) -> Stats:
    """pytest-benchmark's statistics of ``times`` (``median``, ``q1``, ``q3``, ``iqr``, ...)."""
    stats = Stats()
    for t in times:
        stats.update(t)
    return stats


def ratio_quartiles(numerator: list[float], denominator: list[float]) -> tuple[float, float]:
    """First and third quartiles of the round-by-round ratios of two calls' times.

    Both calls ran in the same rounds, so each ratio compares them under the
    same machine load; the spread shows how far one run can be trusted.
    """
    stats = summary([n / d for n, d in zip(numerator, denominator, strict=True)])
    return stats.q1, stats.q3


def load_average() -> float:
    """The machine's one-minute load average: how busy it was (``nan`` where unknown)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def counted_flops(call: Callable[[], Any]) -> int:
    """Floating-point operations of one call, as torch's counter scores them
    (matrix products and convolutions; QR and eigh count as zero)."""
    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def breakdown(call: Callable[[], Any], calls: int = 5, share: float = 0.95) -> list[dict[str, Any]]:
    """Where one call spends its time, by operation and operand shapes.

    Parameters
    ----------
    call : callable
        The timed call (one warm ASI step, one training step, ...).
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
            call()
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
        op = e.key.removeprefix("aten::")
        shapes = [tuple(s) for s in e.input_shapes if s]
        flops = _product_flops(op, shapes)
        rows.append(
            {
                "op": op,
                "shapes": shapes,
                "count": e.count / calls,
                "ms": e.self_cpu_time_total / calls / 1e3,
                "share": e.self_cpu_time_total / total,
                "gflops": flops * e.count / (e.self_cpu_time_total * 1e-6) / 1e9 if flops else None,
            }
        )
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


def print_breakdown(title: str, call: Callable[[], Any]) -> None:
    """Print :func:`breakdown` of ``call`` (after one untimed call) under ``title``."""
    call()
    rows = breakdown(call)
    total = sum(r["ms"] for r in rows)
    print(f"\n{title}: {total:.2f} ms per call (profiled)")
    print(f"{'op':>24} {'operand shapes':>40} {'ms':>7} {'share':>6} {'GFLOP/s':>8}")
    for r in rows:
        joint = " @ " if r["gflops"] is not None else ", "
        shapes = joint.join("x".join(map(str, s)) for s in r["shapes"])
        speed = "" if r["gflops"] is None else f"{r['gflops']:.1f}"
        print(
            f"{r['op'][:24]:>24} {shapes[:40]:>40} {r['ms']:7.3f} "
            f"{100 * r['share']:5.1f}% {speed:>8}"
        )
