"""The knapsack: per-layer candidates, one chosen per layer under a byte budget.

Pure Python (no torch): the data the measurement produces and the allocation
consumes, the exact solver and the budget strings.

- :class:`Choice`, :class:`LayerSensitivity`, :class:`Sensitivity`: the
  instance, one group of candidates (ranks, bytes, weight-gradient error) per
  layer, as :func:`~tensorcompress.torch.budget.sensitivity.measure_sensitivity`
  measures it (or as built by hand).
- :func:`allocate`: one candidate per layer, least total error with the total
  bytes within the budget (a multiple-choice knapsack, solved exactly); the
  answer is an :class:`Allocation`.
- :func:`budget_from_spec`, :func:`spec_threshold`: budget strings such as
  ``"hosvd@0.8"`` (the bytes HOSVD at 0.8 keeps in the measured layers, the
  paper's comparison point) or ``"12.5MB"``.

Results are frozen dataclasses that serialise to JSON (``to_json`` /
``from_json``), so a sensitivity or an allocation can be saved and reused.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tensorcompress.torch.budget._checks import check_int, check_threshold

__all__ = [
    "Allocation",
    "Choice",
    "LayerSensitivity",
    "Sensitivity",
    "allocate",
    "budget_from_spec",
    "spec_threshold",
]

# ---------------------------------------------------------------------------
# The instance and the answer
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One candidate for one layer.

    Attributes
    ----------
    threshold : float
        Explained-variance threshold in (0, 1] the ranks come from.
    ranks : tuple of int
        Tucker rank per mode of the layer's input (empty for synthetic
        instances that only exercise :func:`allocate`); for a weight
        (:func:`~tensorcompress.torch.budget.measure_weight_sensitivity`),
        ``(k,)``.
    nbytes : int
        Bytes the compressed input keeps at ``ranks`` (core + factors); for
        a weight, the bytes of its factors.
    error : float
        Mean relative error ``||dW_compressed - dW|| / ||dW||`` of the
        layer's weight gradient over the measured batches; for a weight, of
        the layer's output with the weight truncated to rank ``k``.
    """

    threshold: float
    ranks: tuple[int, ...]
    nbytes: int
    error: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_threshold(self.threshold, "threshold"))
        ranks = tuple(check_int(r, f"ranks[{k}]", 1) for k, r in enumerate(self.ranks))
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "nbytes", check_int(self.nbytes, "nbytes", 0))
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
        object.__setattr__(self, "n_batches", check_int(self.n_batches, "n_batches", 1))

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
# The solver: exact multiple-choice knapsack
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
        Per-layer candidates
        (:func:`~tensorcompress.torch.budget.sensitivity.measure_sensitivity`).
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
    budget = check_int(budget_bytes, "budget_bytes", -(2**63))
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


# ---------------------------------------------------------------------------
# Budget strings
# ---------------------------------------------------------------------------

_SPEC_HOSVD = re.compile(r"^\s*hosvd\s*@\s*(?P<eps>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")
_SPEC_SIZE = re.compile(
    r"^\s*(?P<value>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>B|KB|KiB|MB|MiB|GB|GiB)?\s*$"
)
# MB = 2**20 bytes, the project's convention (tensorcompress.torch.measure.MB),
# written out here so that this module needs no torch.
_UNITS = {
    None: 1,
    "B": 1,
    "KB": 2**10,
    "KiB": 2**10,
    "MB": 2**20,
    "MiB": 2**20,
    "GB": 2**30,
    "GiB": 2**30,
}
_SPEC_HELP = (
    "'hosvd@EPS' (the bytes HOSVD at threshold EPS keeps in these layers), or a size "
    "such as '123456', '123456B', '12.5MB' (MB = 2**20 bytes, the project's convention)"
)


def spec_threshold(spec: str) -> float | None:
    """The threshold a budget string refers to, if it names one.

    Parameters
    ----------
    spec : str
        A budget string, as :func:`budget_from_spec` takes.

    Returns
    -------
    float or None
        ``EPS`` for ``"hosvd@EPS"`` (a threshold that must be among the
        measured candidates), ``None`` for a size such as ``"12.5MB"``.

    Raises
    ------
    ValueError
        On a string of neither form, or a threshold outside (0, 1].
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str, got {type(spec).__name__}")
    m = _SPEC_HOSVD.match(spec)
    if m is not None:
        return check_threshold(float(m["eps"]), f"the threshold in budget {spec!r}")
    if _SPEC_SIZE.match(spec) is None:
        raise ValueError(f"budget {spec!r} is not understood; expected {_SPEC_HELP}")
    return None


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
        What :func:`~tensorcompress.torch.budget.sensitivity.measure_sensitivity`
        measured.

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
    eps = spec_threshold(spec)
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
    assert m is not None  # spec_threshold refused every other string
    return int(float(m["value"]) * _UNITS[m["unit"]])
