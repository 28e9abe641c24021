"""Per-layer rank choice under a memory budget (the paper's perplexity + DP).

Instead of one explained-variance threshold for every layer, the paper gives
each fine-tuned layer its own ranks:

1. :func:`measure_sensitivity` measures, per selected layer and per candidate
   threshold ``eps``, the Tucker ranks HOSVD picks at ``eps``, the bytes they
   keep (core + factors, :func:`tensorcompress.torch.measure.analytic_bytes`)
   and the relative error of the layer's weight gradient computed from the
   compressed input against the exact one (the paper's "perplexity"),
   averaged over a few batches.
2. :func:`allocate` picks one candidate per layer minimising the total error
   with the total bytes within a budget: a multiple-choice knapsack, solved
   exactly.
3. ASI then runs with those fixed ranks (``convert(model, method="asi",
   rank=allocation.ranks, layers=list(allocation.ranks))``) and no per-step
   rank search. :func:`plan_ranks` does 1 and 2 in one call; a budget such as
   ``"hosvd@0.8"`` (:func:`budget_from_spec`) means "the memory HOSVD at 0.8
   would keep in these layers", the paper's comparison point.

How the measurement works, and why it is cheap:

- One forward and one backward per batch, whatever the number of layers and
  candidates. Forward hooks keep each selected layer's input; a hook on its
  output keeps the output gradient; ``torch.autograd.grad`` on the selected
  weights gives the exact weight gradients without touching ``.grad`` and
  without computing the gradients of earlier layers' parameters.
- Per layer and batch, each mode's spectrum and eigenbasis is computed once
  (the Gram matrix and ``eigh``, exactly as :func:`tensorcompress.hosvd.decompose`
  does for a threshold), and the input is projected once onto the largest
  candidate's bases. Every candidate's ranks, factors and core are then slices
  of these (the bases are nested), and its weight gradient comes from the
  factors through the adapter's own
  :func:`~tensorcompress.torch.functions.conv_weight_grad` /
  :func:`~tensorcompress.torch.functions.linear_weight_grad`, i.e. exactly the
  gradient the compressed layer would compute.
- The ranks of a candidate are fixed by the **first** batch (as ASI's cold
  start fixes them); the other batches are compressed at those ranks, onto
  their own leading eigenvectors. So the reported bytes are exactly what the
  layer keeps with those ranks, and the error is averaged at those ranks.
  The batch-mode rank refers to the measurement batch size: measure at the
  training batch size.
- The model runs in training mode (BatchNorm uses batch statistics, as in
  fine-tuning); training flags and buffers (BatchNorm running statistics) are
  restored afterwards, and parameters' ``.grad`` are left untouched.

Cost (last 4 convs of ResNet-18, batch 16 at 224x224, 2 batches, the 6 default
candidates) against one plain training step (forward + backward of the whole
model) measured in the same run, medians of interleaved repeats::

    python benchmarks/test_budget_cost.py

prints the ratio. Measured on a 2-core CPU machine shared with other jobs
(torch 2.13): 1.3 training steps for the two batches with ``--threads 1``
(0.65 per batch; the two forwards are half of it, the per-candidate weight
gradients and the eigendecompositions the rest), 2.5-3.0 with 2 threads, where
LAPACK's multi-threaded ``eigh`` slows down badly on an oversubscribed
machine (the same ``eigh`` every HOSVD step and ASI cold start runs).

Results are frozen dataclasses that serialise to JSON (``to_json`` /
``from_json``), so a sensitivity or an allocation can be saved and reused.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tensorcompress import rank as _rank
from tensorcompress import tenalg
from tensorcompress.results import TuckerResult
from tensorcompress.torch.functions import ConvSpec, conv_weight_grad, linear_weight_grad
from tensorcompress.torch.measure import MB, analytic_bytes
from tensorcompress.torch.modules import CompressedModule
from tensorcompress.torch.selection import SUPPORTED_LAYERS, LayerSelection, select_layers
from tensorcompress.torch.state import preserved_training_state

__all__ = [
    "DEFAULT_CANDIDATES",
    "Allocation",
    "Choice",
    "LayerSensitivity",
    "Sensitivity",
    "allocate",
    "budget_from_spec",
    "measure_sensitivity",
    "plan_ranks",
]

DEFAULT_CANDIDATES: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The paper's candidate explained-variance thresholds."""

LossFn = Callable[[Any, Any], torch.Tensor]


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


def _check_threshold(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a float in (0, 1], got {value!r}")
    eps = float(value)
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"{where} must be in (0, 1], got {eps}")
    return eps


def _check_int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must be an int, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{where} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class Choice:
    """One candidate for one layer.

    Attributes
    ----------
    threshold : float
        Explained-variance threshold in (0, 1] the ranks come from.
    ranks : tuple of int
        Tucker rank per mode of the layer's input (empty for synthetic
        instances that only exercise :func:`allocate`).
    nbytes : int
        Bytes the compressed input keeps at ``ranks`` (core + factors).
    error : float
        Mean relative error ``||dW_compressed - dW|| / ||dW||`` of the
        layer's weight gradient over the measured batches.
    """

    threshold: float
    ranks: tuple[int, ...]
    nbytes: int
    error: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _check_threshold(self.threshold, "threshold"))
        ranks = tuple(_check_int(r, f"ranks[{k}]", 1) for k, r in enumerate(self.ranks))
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "nbytes", _check_int(self.nbytes, "nbytes", 0))
        err = float(self.error)
        if not math.isfinite(err) or err < 0.0:
            raise ValueError(f"error must be a finite number >= 0, got {self.error!r}")
        object.__setattr__(self, "error", err)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "threshold": self.threshold,
            "ranks": list(self.ranks),
            "nbytes": self.nbytes,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Choice:
        """Inverse of :meth:`to_dict`."""
        return cls(d["threshold"], tuple(d["ranks"]), d["nbytes"], d["error"])


@dataclass(frozen=True)
class LayerSensitivity:
    """The candidates measured for one layer.

    Attributes
    ----------
    name : str
        Qualified name of the layer in the model.
    choices : tuple of Choice
        One per candidate threshold, in increasing threshold order.
    input_shape : tuple of int
        Shape of the layer's input in the first batch (the one that fixed the ranks).
    itemsize : int
        Bytes per element of the input (float32: 4).
    kind : str
        ``"Conv1d"``, ``"Conv2d"`` or ``"Linear"`` (informational).
    """

    name: str
    choices: tuple[Choice, ...]
    input_shape: tuple[int, ...] = ()
    itemsize: int = 4
    kind: str = ""

    def __post_init__(self) -> None:
        choices = tuple(self.choices)
        if not choices:
            raise ValueError(f"layer {self.name!r} has no choices; give at least one candidate")
        if any(not isinstance(c, Choice) for c in choices):
            raise TypeError(f"layer {self.name!r}: choices must be Choice objects")
        thresholds = [c.threshold for c in choices]
        if any(a >= b for a, b in itertools.pairwise(thresholds)):
            raise ValueError(
                f"layer {self.name!r}: choice thresholds must be strictly increasing, "
                f"got {thresholds}"
            )
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "input_shape", tuple(int(n) for n in self.input_shape))

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The candidate thresholds, increasing."""
        return tuple(c.threshold for c in self.choices)

    def choice(self, threshold: float) -> Choice:
        """The choice measured at ``threshold`` (``KeyError`` if it was not a candidate)."""
        for c in self.choices:
            if c.threshold == threshold:
                return c
        raise KeyError(
            f"layer {self.name!r} was not measured at {threshold}; candidates {self.thresholds}"
        )

    @property
    def full_bytes(self) -> int:
        """Bytes of the uncompressed input (0 when the shape is unknown)."""
        return math.prod(self.input_shape) * self.itemsize if self.input_shape else 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "name": self.name,
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "itemsize": self.itemsize,
            "choices": [c.to_dict() for c in self.choices],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerSensitivity:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=d["name"],
            choices=tuple(Choice.from_dict(c) for c in d["choices"]),
            input_shape=tuple(d.get("input_shape", ())),
            itemsize=int(d.get("itemsize", 4)),
            kind=d.get("kind", ""),
        )


@dataclass(frozen=True)
class Sensitivity:
    """What :func:`measure_sensitivity` measured: one entry per selected layer.

    Attributes
    ----------
    layers : tuple of LayerSensitivity
        In selection order (execution order for :func:`~tensorcompress.torch.last_layers`).
    n_batches : int
        Number of batches the errors are averaged over.
    """

    layers: tuple[LayerSensitivity, ...]
    n_batches: int = 1

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be unique, got {names}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "n_batches", _check_int(self.n_batches, "n_batches", 1))

    @property
    def names(self) -> tuple[str, ...]:
        """Layer names, in order."""
        return tuple(layer.name for layer in self.layers)

    def __getitem__(self, name: str) -> LayerSensitivity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}; layers are {list(self.names)}")

    def bytes_at(self, threshold: float) -> int:
        """Total bytes every layer keeps at ``threshold`` (HOSVD with one threshold)."""
        return sum(layer.choice(threshold).nbytes for layer in self.layers)

    def error_at(self, threshold: float) -> float:
        """Total error of every layer at ``threshold``, summed in layer order."""
        total = 0.0
        for layer in self.layers:
            total += layer.choice(threshold).error
        return total

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"n_batches": self.n_batches, "layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sensitivity:
        """Inverse of :meth:`to_dict`."""
        return cls(
            layers=tuple(LayerSensitivity.from_dict(x) for x in d["layers"]),
            n_batches=int(d.get("n_batches", 1)),
        )

    def to_json(self, **kwargs: Any) -> str:
        """JSON text (``kwargs`` go to :func:`json.dumps`, e.g. ``indent=2``)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Sensitivity:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Allocation:
    """One candidate per layer, chosen by :func:`allocate`.

    Attributes
    ----------
    names : tuple of str
        Layer names, in the sensitivity's order.
    choices : tuple of Choice
        The chosen candidate of each layer.
    budget_bytes : int
        The budget the choice was made under.
    total_bytes : int
        Sum of the chosen bytes (never above ``budget_bytes``).
    total_error : float
        Sum of the chosen errors, in layer order (the minimum under the budget).

    Examples
    --------
    ``convert(model, method="asi", rank=alloc.ranks, layers=list(alloc.ranks))``
    runs ASI with the chosen ranks.
    """

    names: tuple[str, ...]
    choices: tuple[Choice, ...]
    budget_bytes: int
    total_bytes: int
    total_error: float
    _by_name: dict[str, Choice] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names, choices = tuple(self.names), tuple(self.choices)
        if len(names) != len(choices):
            raise ValueError(f"{len(names)} names but {len(choices)} choices")
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be unique, got {list(names)}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "_by_name", dict(zip(names, choices)))

    def __getitem__(self, name: str) -> Choice:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no layer {name!r}; layers are {list(self.names)}") from None

    @property
    def ranks(self) -> dict[str, tuple[int, ...]]:
        """Per-layer Tucker ranks: the ``rank=`` dict ``convert`` takes."""
        return {n: c.ranks for n, c in zip(self.names, self.choices)}

    @property
    def thresholds(self) -> dict[str, float]:
        """Per-layer chosen threshold."""
        return {n: c.threshold for n, c in zip(self.names, self.choices)}

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "budget_bytes": self.budget_bytes,
            "total_bytes": self.total_bytes,
            "total_error": self.total_error,
            "layers": [{"name": n, **c.to_dict()} for n, c in zip(self.names, self.choices)],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Allocation:
        """Inverse of :meth:`to_dict`."""
        layers = d["layers"]
        return cls(
            names=tuple(x["name"] for x in layers),
            choices=tuple(Choice.from_dict(x) for x in layers),
            budget_bytes=int(d["budget_bytes"]),
            total_bytes=int(d["total_bytes"]),
            total_error=float(d["total_error"]),
        )

    def to_json(self, **kwargs: Any) -> str:
        """JSON text (``kwargs`` go to :func:`json.dumps`, e.g. ``indent=2``)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Allocation:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------
# Allocation: exact multiple-choice knapsack
# ---------------------------------------------------------------------------


def allocate(sensitivity: Sensitivity, budget_bytes: int) -> Allocation:
    """Choose one candidate per layer: least total error within ``budget_bytes``.

    Exact multiple-choice knapsack by dynamic programming over the exact byte
    totals: layer by layer, the reachable ``(bytes, error)`` totals are kept as
    a Pareto frontier (a total is dropped only when another one has no more
    bytes and no more error; since floating-point addition is monotone, no
    completion of a dropped total can beat the same completion of the one that
    dominates it). Totals that cannot be completed within the budget, even
    with every remaining layer at its cheapest candidate, are dropped too. The
    frontier never holds more entries than there are distinct byte totals, and
    in practice far fewer.

    Parameters
    ----------
    sensitivity : Sensitivity
        Per-layer candidates (:func:`measure_sensitivity`).
    budget_bytes : int
        Largest total bytes allowed.

    Returns
    -------
    Allocation
        Minimum total error; among equal errors, the fewest bytes; among
        those, the first in the order the candidates are listed (so the
        result is deterministic).

    Raises
    ------
    ValueError
        If there are no layers, or the budget is below the cheapest choice
        (every layer at its smallest candidate).
    """
    if not isinstance(sensitivity, Sensitivity):
        raise TypeError(f"sensitivity must be a Sensitivity, got {type(sensitivity).__name__}")
    budget = _check_int(budget_bytes, "budget_bytes", -(2**63))
    layers = sensitivity.layers
    if not layers:
        raise ValueError("sensitivity has no layers; there is nothing to allocate")
    cheapest = [min(c.nbytes for c in layer.choices) for layer in layers]
    # rest[i]: the least the layers from i on can take.
    rest = [sum(cheapest[i:]) for i in range(len(layers) + 1)]
    if rest[0] > budget:
        detail = ", ".join(f"{layer.name}: {b}" for layer, b in zip(layers, cheapest))
        raise ValueError(
            f"budget_bytes={budget} is below the smallest allocation, {rest[0]} bytes "
            f"(every layer at its cheapest candidate: {detail})"
        )
    # A frontier entry: (bytes, error, index of its parent in the previous
    # frontier, choice index). Sorted by bytes with strictly decreasing error.
    frontier: list[tuple[int, float, int, int]] = [(0, 0.0, -1, -1)]
    history: list[list[tuple[int, float, int, int]]] = []
    for i, layer in enumerate(layers):
        cap = budget - rest[i + 1]
        reached = [
            (b + c.nbytes, e + c.error, s, j)
            for s, (b, e, _, _) in enumerate(frontier)
            for j, c in enumerate(layer.choices)
            if b + c.nbytes <= cap
        ]
        reached.sort()
        frontier = []
        for entry in reached:
            if not frontier or entry[1] < frontier[-1][1]:
                frontier.append(entry)
        history.append(frontier)
    # The last entry has the least error (and, among equal errors, the fewest bytes).
    total_bytes, total_error, parent, j = frontier[-1]
    picks = [0] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        picks[i] = j
        if i > 0:
            _, _, parent, j = history[i - 1][parent]
    chosen = tuple(layer.choices[p] for layer, p in zip(layers, picks))
    return Allocation(
        names=sensitivity.names,
        choices=chosen,
        budget_bytes=budget,
        total_bytes=total_bytes,
        total_error=total_error,
    )


_SPEC_HOSVD = re.compile(r"^\s*hosvd\s*@\s*(?P<eps>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")
_SPEC_SIZE = re.compile(
    r"^\s*(?P<value>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>B|KB|KiB|MB|MiB|GB|GiB)?\s*$"
)
_UNITS = {
    None: 1,
    "B": 1,
    "KB": 2**10,
    "KiB": 2**10,
    "MB": MB,
    "MiB": MB,
    "GB": 2**30,
    "GiB": 2**30,
}
_SPEC_HELP = (
    "'hosvd@EPS' (the bytes HOSVD at threshold EPS keeps in these layers), or a size "
    "such as '123456', '123456B', '12.5MB' (MB = 2**20 bytes, the project's convention)"
)


def _spec_threshold(spec: str) -> float | None:
    m = _SPEC_HOSVD.match(spec)
    if m is None:
        return None
    return _check_threshold(float(m["eps"]), f"the threshold in budget {spec!r}")


def budget_from_spec(spec: str, sensitivity: Sensitivity) -> int:
    """Bytes meant by a budget string.

    Parameters
    ----------
    spec : str
        ``"hosvd@0.8"``: the bytes HOSVD at that threshold keeps in the
        measured layers (the paper's budget; the threshold must be one of the
        measured candidates). ``"12.5MB"``, ``"300KB"``, ``"123456"`` or
        ``"123456B"``: a size (MB = 2**20 bytes, KB = 2**10), rounded down to
        whole bytes.
    sensitivity : Sensitivity
        What :func:`measure_sensitivity` measured.

    Returns
    -------
    int
        The budget in bytes.

    Raises
    ------
    ValueError
        On a string of neither form, a threshold outside (0, 1], or one that
        was not a measured candidate.
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str, got {type(spec).__name__}")
    eps = _spec_threshold(spec)
    if eps is not None:
        missing = [layer.name for layer in sensitivity.layers if eps not in layer.thresholds]
        if missing or not sensitivity.layers:
            cands = sensitivity.layers[0].thresholds if sensitivity.layers else ()
            raise ValueError(
                f"budget {spec!r} needs the threshold {eps} among the measured candidates "
                f"(layers {missing} lack it; candidates {cands}); measure with it, or use "
                "plan_ranks, which adds it"
            )
        return sensitivity.bytes_at(eps)
    m = _SPEC_SIZE.match(spec)
    if m is None:
        raise ValueError(f"budget {spec!r} is not understood; expected {_SPEC_HELP}")
    return int(float(m["value"]) * _UNITS[m["unit"]])


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


def _check_candidates(candidates: Iterable[float]) -> tuple[float, ...]:
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Iterable):
        raise TypeError(f"candidates must be a sequence of floats, got {candidates!r}")
    values = [_check_threshold(c, f"candidates[{k}]") for k, c in enumerate(candidates)]
    if not values:
        raise ValueError("candidates is empty; give at least one threshold in (0, 1]")
    return tuple(sorted(set(values)))


def _select_layers(
    model: nn.Module, layers: LayerSelection, example_input: Any
) -> dict[str, nn.Module]:
    """The selected layers, by name, in selection order (as ``convert`` selects)."""
    named = dict(model.named_modules())
    chosen = {n: named[n] for n in select_layers(model, layers, example_input, subclasses=True)}
    if not chosen:
        raise ValueError("layers selects no Conv1d, Conv2d or Linear module")
    for n, m in chosen.items():
        if isinstance(m, CompressedModule) and m.compression.method != "vanilla":
            raise ValueError(
                f"layer {n!r} is compressed (method={m.compression.method!r}), so its weight "
                "gradient is not the exact one; measure the plain model (restore() it first)"
            )
        weight = m.weight
        if not (isinstance(weight, torch.Tensor) and weight.requires_grad):
            raise ValueError(f"layer {n!r} has a frozen weight; sensitivity needs its gradient")
    return chosen


def _kind_name(module: nn.Module) -> str:
    return next(kind.__name__ for kind in SUPPORTED_LAYERS if isinstance(module, kind))


class _Capture:
    """Input and output gradient of one layer in one forward/backward."""

    def __init__(self, module: nn.Module) -> None:
        self.spec: ConvSpec | None = None
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            self.spec = ConvSpec.from_module(module)
        self.calls = 0
        self.x: torch.Tensor | None = None
        self.gy: torch.Tensor | None = None

    def reset(self) -> None:
        self.calls, self.x, self.gy = 0, None, None

    def forward_hook(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self.calls += 1
        self.x = args[0].detach()
        if isinstance(out, torch.Tensor) and out.requires_grad:
            # Registered before any in-place op on ``out`` (an inplace ReLU),
            # so it receives the gradient of the layer's own output.
            out.register_hook(self._grad_hook)

    def _grad_hook(self, g: torch.Tensor) -> None:
        self.gy = g.detach()


class _LayerState:
    """Per-layer accumulator across batches: fixed ranks and summed errors."""

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind
        self.ranks: list[tuple[int, ...]] | None = None
        self.input_shape: tuple[int, ...] = ()
        self.itemsize = 4
        self.errors: list[float] = []


def _mode_bases(x: torch.Tensor) -> list[tuple[np.ndarray, torch.Tensor]]:
    """Per mode: squared singular values (descending) and the matching left singular vectors.

    The same computation as :func:`tensorcompress.hosvd.mode_basis` (Gram +
    ``eigh`` when the unfolding is short and wide, thin SVD otherwise), kept
    whole so every threshold can be sliced from it.
    """
    out = []
    for k in range(x.ndim):
        n = int(x.shape[k])
        if n <= x.numel() // n:
            w, v = torch.linalg.eigh(tenalg.gram(x, k))
            sv2, basis = w.flip(0), v.flip(1)
        else:
            u, s, _ = torch.linalg.svd(tenalg.unfold(x, k), full_matrices=False)
            sv2, basis = s * s, u
        out.append((np.clip(sv2.double().cpu().numpy(), 0.0, None), basis))
    return out


def _layer_errors(
    cap: _Capture,
    exact: torch.Tensor,
    state: _LayerState,
    candidates: Sequence[float],
) -> None:
    """Add one batch's weight-gradient errors of every candidate to ``state``."""
    assert cap.x is not None and cap.gy is not None
    x, gy = cap.x, cap.gy
    if cap.spec is None and x.ndim == 1:
        x = x.unsqueeze(0)  # as the adapter does: one sample is a (1, C_in) matrix
    if x.dtype in (torch.float16, torch.bfloat16):
        x, gy = x.float(), gy.float()  # decompositions run in float32 (as the core does)
    bases = _mode_bases(x)
    if state.ranks is None:
        # The first batch fixes each candidate's ranks (ASI's cold start does too).
        rtol = 4 * float(torch.finfo(x.dtype).eps)  # hosvd's slack, so the ranks match it
        state.ranks = [
            tuple(_rank.rank_for_threshold(sv2, eps, rtol) for sv2, _ in bases)
            for eps in candidates
        ]
        state.input_shape = tuple(int(n) for n in cap.x.shape)
        state.itemsize = cap.x.element_size()
    # A later batch of another shape (a smaller last batch) caps the ranks, as the layer does.
    ranks = [tuple(min(r, int(b.shape[1])) for r, (_, b) in zip(rs, bases)) for rs in state.ranks]
    top = [max(rs[k] for rs in ranks) for k in range(x.ndim)]
    # Project once onto the largest candidate's bases (largest reduction first);
    # every candidate's core is a slice of this, since the bases are nested.
    core = x
    for k in sorted(range(x.ndim), key=lambda k: top[k] / x.shape[k]):
        core = tenalg.mode_dot(core, bases[k][1][:, : top[k]].transpose(0, 1), k)
    w_shape = tuple(exact.shape)
    exact = exact.to(gy.dtype)
    # Norms in the working dtype: float32 is ample for a relative error, and
    # a float64 copy of every candidate's weight gradient would cost more
    # than the gradient itself.
    exact_norm = float(torch.linalg.vector_norm(exact))
    errors = []
    for rs in ranks:
        res = TuckerResult(
            core=core[tuple(slice(0, r) for r in rs)].contiguous(),
            factors=tuple(b[:, :r].contiguous() for r, (_, b) in zip(rs, bases)),
        )
        if cap.spec is None:
            g = linear_weight_grad(res, gy.reshape(*x.shape[:-1], gy.shape[-1]))
        else:
            g = conv_weight_grad(res, gy, w_shape, cap.spec)
        diff = float(torch.linalg.vector_norm(g - exact))
        errors.append(diff / exact_norm if exact_norm > 0 else diff)
    state.errors = [a + b for a, b in zip(state.errors, errors)] if state.errors else errors


def _default_loss(output: Any, target: Any) -> torch.Tensor:
    return F.cross_entropy(output, target)


def _split_batch(batch: Any, index: int) -> tuple[Any, Any]:
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence) or len(batch) != 2:
        raise TypeError(
            f"batch {index} must be an (inputs, targets) pair, got {type(batch).__name__}"
        )
    return batch[0], batch[1]


def measure_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    layers: LayerSelection = None,
    candidates: Iterable[float] = DEFAULT_CANDIDATES,
    loss_fn: LossFn | None = None,
) -> Sensitivity:
    """Measure, per layer and candidate threshold, the ranks, bytes and weight-gradient error.

    Parameters
    ----------
    model : nn.Module
        The plain model (no compressed layers among the selected ones). It
        runs in training mode; training flags, buffers and ``.grad`` are left
        as they were.
    batches : iterable of (inputs, targets)
        A few batches (two or more give a steadier average); each runs one
        forward (``model(inputs)``) and one backward. Use the training batch
        size: the batch-mode rank is measured at this size.
    layers : LastLayers, callable, list of str or None
        Which layers, as in :func:`~tensorcompress.torch.convert`
        (:func:`~tensorcompress.torch.last_layers` is resolved in execution
        order on the first batch); ``None`` selects every Conv1d/Conv2d/Linear.
        Each must run exactly once per forward, with a trainable weight.
    candidates : iterable of float, default (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
        Explained-variance thresholds in (0, 1] (sorted, duplicates dropped).
    loss_fn : callable, optional
        ``loss_fn(model(inputs), targets)`` returning a scalar;
        cross-entropy by default.

    Returns
    -------
    Sensitivity
        Per layer (in selection order) and candidate (increasing): HOSVD's
        ranks at the candidate on the first batch, the bytes they keep (core +
        factors in the input's dtype), and the relative error of the weight
        gradient computed from the input compressed at those ranks against the
        exact one, averaged over the batches.

    Raises
    ------
    ValueError, TypeError
        On empty or bad candidates, no batches, a bad layer selection, a
        compressed or frozen selected layer, or a layer that does not run
        exactly once per forward.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tensorcompress.torch.budget import allocate, measure_sensitivity
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> g = torch.Generator().manual_seed(0)
    >>> batches = [(torch.randn(4, 3, 12, 12, generator=g), torch.tensor([0, 1, 2, 3]))
    ...            for _ in range(2)]
    >>> sens = measure_sensitivity(net, batches, layers=["0", "2"], candidates=(0.5, 0.9))
    >>> [c.threshold for c in sens["2"].choices]
    [0.5, 0.9]
    >>> alloc = allocate(sens, sens.bytes_at(0.9))
    >>> alloc.total_error <= sens.error_at(0.9)
    True
    """
    cands = _check_candidates(candidates)
    loss_fn = _default_loss if loss_fn is None else loss_fn
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("batches is empty; give at least one (inputs, targets) pair") from None
    selected = _select_layers(model, layers, _split_batch(first, 0)[0])
    captures = {n: _Capture(m) for n, m in selected.items()}
    states = {n: _LayerState(n, _kind_name(m)) for n, m in selected.items()}
    weights = [m.weight for m in selected.values()]
    handles = [m.register_forward_hook(captures[n].forward_hook) for n, m in selected.items()]
    n_batches = 0
    try:
        with preserved_training_state(model), torch.enable_grad():
            for index, batch in enumerate(itertools.chain([first], it)):
                inputs, targets = _split_batch(batch, index)
                for cap in captures.values():
                    cap.reset()
                loss = loss_fn(model(inputs), targets)
                # Only the selected weights: .grad stays untouched, and no
                # gradient is computed for earlier layers' parameters.
                grads = torch.autograd.grad(loss, weights, allow_unused=True)  # type: ignore[arg-type]
                with torch.no_grad():
                    for (name, cap), exact in zip(captures.items(), grads):
                        if cap.calls != 1 or cap.gy is None or exact is None:
                            why = (
                                f"ran {cap.calls} times in one forward"
                                if cap.calls != 1
                                else "is not on the loss's gradient path"
                            )
                            raise ValueError(
                                f"layer {name!r} {why}; each selected layer must run exactly "
                                "once per forward and feed the loss"
                            )
                        _layer_errors(cap, exact, states[name], cands)
                        cap.reset()
                del loss, grads
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    layer_results = []
    for name, st in states.items():
        assert st.ranks is not None
        choices = tuple(
            Choice(
                threshold=eps,
                ranks=rs,
                nbytes=analytic_bytes("asi", st.input_shape, itemsize=st.itemsize, ranks=rs),
                error=err / n_batches,
            )
            for eps, rs, err in zip(cands, st.ranks, st.errors)
        )
        layer_results.append(
            LayerSensitivity(
                name=name,
                choices=choices,
                input_shape=st.input_shape,
                itemsize=st.itemsize,
                kind=st.kind,
            )
        )
    return Sensitivity(layers=tuple(layer_results), n_batches=n_batches)


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
    cands = list(_check_candidates(candidates))
    if isinstance(budget, str):
        eps = _spec_threshold(budget)
        if eps is not None:
            cands.append(eps)
        elif _SPEC_SIZE.match(budget) is None:
            raise ValueError(f"budget {budget!r} is not understood; expected {_SPEC_HELP}")
    elif isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise TypeError(f"budget must be an int (bytes) or a str, got {budget!r}")
    sens = measure_sensitivity(model, batches, layers, cands, loss_fn)
    budget_bytes = budget_from_spec(budget, sens) if isinstance(budget, str) else int(budget)
    return allocate(sens, budget_bytes)
