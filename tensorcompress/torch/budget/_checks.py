"""Argument checks shared by the knapsack's data and the measurement (no torch)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any


def check_threshold(value: Any, where: str) -> float:
    """``value`` as a float in (0, 1]; ``where`` names it in the error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a float in (0, 1], got {value!r}")
    eps = float(value)
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"{where} must be in (0, 1], got {eps}")
    return eps


def check_int(value: Any, where: str, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; ``where`` names it in the error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must be an int, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{where} must be >= {minimum}, got {value}")
    return int(value)


def check_candidates(candidates: Iterable[float]) -> tuple[float, ...]:
    """Candidate thresholds, checked, sorted and without duplicates."""
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Iterable):
        raise TypeError(f"candidates must be a sequence of floats, got {candidates!r}")
    values = [check_threshold(c, f"candidates[{k}]") for k, c in enumerate(candidates)]
    if not values:
        raise ValueError("candidates is empty; give at least one threshold in (0, 1]")
    return tuple(sorted(set(values)))
