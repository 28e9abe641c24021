"""The equal-accuracy comparison and the noise rules, on synthetic rows with exact answers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from tensorcompress.experiments.frontier import (
    binomial_se,
    equal_accuracy,
    frontiers,
    gap_noise,
)


@dataclass(frozen=True)
class Point:
    method: str
    layers: str
    threshold: float | None
    accuracy: float
    mem_mb: float
    gflops: float
    accuracy_std: float = 0.0


VANILLA = Point("vanilla", "2", None, 90.0, 8.0, 6.0)


def test_interpolates_between_the_bracketing_thresholds() -> None:
    rows = [
        VANILLA,
        Point("asi", "2", 0.5, 80.0, 1.0, 2.0),
        Point("asi", "2", 0.75, 96.0, 3.0, 4.0),
    ]
    (e,) = equal_accuracy(rows, tolerance=2.0)
    # Target 90 - 2 = 88, half way from 80 to 96: memory 2.0, GFLOPs 3.0, ε 0.625.
    assert (e.method, e.layers, e.accuracy, e.tolerance) == ("asi", "2", 88.0, 2.0)
    assert (e.memory_ratio, e.gflops_ratio, e.threshold) == (0.25, 0.5, 0.625)
    assert (e.vanilla_accuracy, e.best_accuracy, e.reached) == (90.0, 96.0, True)
    assert e.to_dict() == {
        "method": "asi",
        "layers": "2",
        "accuracy": 88.0,
        "memory_ratio": 0.25,
        "gflops_ratio": 0.5,
        "tolerance": 2.0,
        "vanilla_accuracy": 90.0,
        "best_accuracy": 96.0,
        "threshold": 0.625,
    }


def test_the_cheapest_point_when_it_already_reaches() -> None:
    rows = [
        VANILLA,
        Point("hosvd", "2", 0.9, 92.0, 4.0, 3.0),
        Point("hosvd", "2", 0.5, 89.0, 2.0, 1.5),
    ]
    (e,) = equal_accuracy(rows, tolerance=1.0)
    # Sorted by memory, ε=0.5 (89 >= 89) is first: no extrapolation below it.
    assert (e.memory_ratio, e.gflops_ratio, e.threshold) == (0.25, 0.25, 0.5)


def test_not_reached_and_single_points() -> None:
    rows = [
        VANILLA,
        Point("svd", "2", 0.5, 70.0, 1.0, 1.0),
        Point("svd", "2", 0.9, 85.0, 2.0, 1.0),
        Point("gradient_filter", "2", None, 89.5, 2.0, 5.4),
    ]
    svd, gf = equal_accuracy(rows, tolerance=1.0)
    assert (svd.method, svd.memory_ratio, svd.gflops_ratio, svd.threshold) == (
        "svd",
        None,
        None,
        None,
    )
    assert svd.best_accuracy == 85.0 and not svd.reached
    assert (gf.method, gf.memory_ratio, gf.gflops_ratio, gf.threshold) == (
        "gradient_filter",
        0.25,
        0.9,
        None,
    )
    assert equal_accuracy(rows, tolerance=0.0)[1].memory_ratio is None  # 89.5 < 90


def test_first_crossing_along_memory_when_accuracy_is_not_monotone() -> None:
    rows = [
        VANILLA,
        Point("asi", "2", 0.7, 84.0, 1.0, 1.0),
        Point("asi", "2", 0.8, 92.0, 2.0, 2.0),
        Point("asi", "2", 0.9, 86.0, 4.0, 3.0),
    ]
    (e,) = equal_accuracy(rows, tolerance=2.0)
    # Target 88: between ε=0.7 (84) and ε=0.8 (92), half way.
    assert (e.memory_ratio, e.gflops_ratio, e.threshold) == (1.5 / 8.0, 1.5 / 6.0, 0.75)


def test_tolerance_per_layers_and_what_is_compared() -> None:
    rows = [
        VANILLA,
        Point("vanilla", "4", None, 94.0, 16.0, 8.0),
        Point("vanilla", "all", None, 99.0, 64.0, 20.0),
        Point("asi", "2", 0.8, 88.0, 1.0, 3.0),
        Point("asi", "4", 0.8, 92.0, 2.0, 4.0),
        Point("asi", "6", 0.8, 95.0, 3.0, 5.0),  # no vanilla with 6 layers: not compared
    ]
    two, four = equal_accuracy(rows, tolerance={"2": 2.0, "4": 2.0})
    assert (two.layers, two.accuracy, two.memory_ratio) == ("2", 88.0, 0.125)
    assert (four.layers, four.accuracy, four.memory_ratio, four.gflops_ratio) == (
        "4",
        92.0,
        0.125,
        0.5,
    )
    assert equal_accuracy(rows, tolerance={"2": 1.0, "4": 1.0})[0].memory_ratio is None


def test_frontiers_sort_by_memory() -> None:
    rows = [Point("asi", "2", 0.9, 1, 3.0, 1), Point("asi", "2", 0.5, 1, 1.0, 1), VANILLA]
    assert [p.threshold for p in frontiers(rows)["asi", "2"]] == [0.5, 0.9]
    assert list(frontiers(rows)) == [("asi", "2"), ("vanilla", "2")]


def test_noise() -> None:
    assert binomial_se(50.0, 100) == 5.0
    assert binomial_se(100.0, 100) == 0.0
    assert math.isnan(binomial_se(50.0, 0))
    assert gap_noise(50.0, 50.0, 100) == pytest.approx(5.0 * math.sqrt(2))
    # Several seeds: the spread of the paired gaps when it is larger.
    assert gap_noise(50.0, 50.0, 100, [0.0, 10.0, 20.0]) == 10.0
    assert gap_noise(50.0, 50.0, 100, [1.0, 1.5]) == pytest.approx(5.0 * math.sqrt(2))
