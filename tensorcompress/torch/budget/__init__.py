"""Per-layer rank choice under a memory budget (the paper's perplexity + DP).

Instead of one explained-variance threshold for every layer, the paper gives
each fine-tuned layer its own ranks:

1. :func:`measure_sensitivity` measures, per selected layer and per candidate
   threshold, the Tucker ranks HOSVD picks, the bytes they keep and the
   relative error of the layer's weight gradient computed from the compressed
   input (the paper's "perplexity").
2. :func:`allocate` picks one candidate per layer minimising the total error
   with the total bytes within a budget: a multiple-choice knapsack, solved
   exactly.
3. ASI then runs with those fixed ranks (``convert(model, method="asi",
   rank=allocation.ranks, layers=list(allocation.ranks))``) and no per-step
   rank search. :func:`plan_ranks` does 1 and 2 in one call; a budget such as
   ``"hosvd@0.8"`` (:func:`budget_from_spec`) means "the memory HOSVD at 0.8
   would keep in these layers", the paper's comparison point.

One file per job:

- :mod:`~tensorcompress.torch.budget.sensitivity`: the measurement (hooks,
  eigenbases, weight gradients; torch).
- :mod:`~tensorcompress.torch.budget.knapsack`: the result data classes with
  their JSON round trips, the exact solver and the budget strings; pure
  Python, it imports no torch.
- :mod:`~tensorcompress.torch.budget.plan`: :func:`plan_ranks`, the two in
  one call.
- :mod:`~tensorcompress.torch.budget.weights`: the same for factored weights
  (WSI/WASI): :func:`measure_weight_sensitivity` (per candidate weight rank,
  the factors' bytes and the layer's output error) and
  :func:`plan_weight_ranks`, solved by the same :func:`allocate`; and
  :func:`output_grams`, the Gram matrices of the layers' outputs that factor
  each weight in the basis of what it computes.

Every public name is importable from here:
``from tensorcompress.torch.budget import plan_ranks, allocate``.
"""

from tensorcompress.torch.budget.knapsack import (
    Allocation,
    Choice,
    LayerSensitivity,
    Sensitivity,
    allocate,
    budget_from_spec,
    spec_threshold,
)
from tensorcompress.torch.budget.plan import plan_ranks
from tensorcompress.torch.budget.sensitivity import DEFAULT_CANDIDATES, measure_sensitivity
from tensorcompress.torch.budget.weights import (
    measure_weight_sensitivity,
    output_grams,
    plan_weight_ranks,
)

__all__ = [
    "DEFAULT_CANDIDATES",
    "Allocation",
    "Choice",
    "LayerSensitivity",
    "Sensitivity",
    "allocate",
    "budget_from_spec",
    "measure_sensitivity",
    "measure_weight_sensitivity",
    "output_grams",
    "plan_ranks",
    "plan_weight_ranks",
    "spec_threshold",
]
