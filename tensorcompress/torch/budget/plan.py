"""Rank planning in one call: measure the sensitivity, then allocate under a budget."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

from torch import nn

from tensorcompress.torch.budget._checks import check_candidates
from tensorcompress.torch.budget.knapsack import (
    Allocation,
    allocate,
    budget_from_spec,
    spec_threshold,
)
from tensorcompress.torch.budget.sensitivity import (
    DEFAULT_CANDIDATES,
    LossFn,
    measure_sensitivity,
)
from tensorcompress.torch.selection import LayerSelection

__all__ = ["plan_ranks"]


def plan_ranks(
    model: nn.Module,
    batches: Iterable[Any],
    layers: LayerSelection = None,
    budget: int | str = "hosvd@0.8",
    candidates: Iterable[float] = DEFAULT_CANDIDATES,
    loss_fn: LossFn | None = None,
) -> Allocation:
    """Measure sensitivity and allocate ranks under a budget, in one call.

    Parameters
    ----------
    model, batches, layers, candidates, loss_fn
        As in :func:`measure_sensitivity`. A ``"hosvd@EPS"`` budget adds
        ``EPS`` to the candidates.
    budget : int or str, default "hosvd@0.8"
        Bytes, or a string for :func:`budget_from_spec`.

    Returns
    -------
    Allocation
        ``convert(model, method="asi", rank=alloc.ranks, layers=list(alloc.ranks))``
        runs ASI with the chosen ranks.
    """
    cands = list(check_candidates(candidates))
    if isinstance(budget, str):
        eps = spec_threshold(budget)  # refuses a malformed string before measuring
        if eps is not None:
            cands.append(eps)
    elif isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise TypeError(f"budget must be an int (bytes) or a str, got {budget!r}")
    sens = measure_sensitivity(model, batches, layers, cands, loss_fn)
    budget_bytes = budget_from_spec(budget, sens) if isinstance(budget, str) else int(budget)
    return allocate(sens, budget_bytes)
