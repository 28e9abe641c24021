"""Which layers a method applies to, in which order they run, and what trains.

Every part of the adapter and the experiments that picks layers goes through
this module: :func:`select_layers` (the one selector), :func:`execution_order`
(the one forward tracer) and :func:`fine_tuned_modules` (the one freeze rule).

Layer selection (``layers=``):

- ``None``: every ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear``, plain or compressed;
- :func:`last_layers` ``(n)``: the last ``n`` convolutions (and Linears with
  ``include_linear=True``) in **execution order**, found by running the model
  once on ``example_input`` (in eval mode, without gradients, then restoring
  every module's mode); a layer called several times counts at its first
  call, and a layer never called is not a candidate. Without
  ``example_input`` it falls back to **module order**
  (``model.named_modules()``), which equals execution order for the models of
  :mod:`tensorcompress.models` but not for a model whose ``forward`` calls its
  children in another order;
- a ``filter_fn(module, qualified_name) -> bool``, asked about every supported
  layer;
- a list of qualified names (each must name a supported layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import nn

from tensorcompress.torch.modules import CompressedModule

__all__ = [
    "SUPPORTED_LAYERS",
    "FilterFn",
    "LastLayers",
    "LayerSelection",
    "call_model",
    "execution_order",
    "fine_tuned_modules",
    "last_layers",
    "plain_type",
    "select_layers",
    "split_example",
    "trainable_only",
]

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
"""The layer types the adapter compresses (exactly these types, or their compressed twins)."""

_CONVS = (nn.Conv1d, nn.Conv2d)

FilterFn: TypeAlias = Callable[[nn.Module, str], bool]


# ---------------------------------------------------------------------------
# Calling a model on an example
# ---------------------------------------------------------------------------


def split_example(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for ``model(...)`` from an example input.

    A tuple is the positional arguments, a mapping the keyword arguments,
    anything else the single positional argument.
    """
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    if isinstance(example_input, tuple):
        return example_input, {}
    return (example_input,), {}


def call_model(model: nn.Module, example_input: Any) -> Any:
    """``model(example_input)``, with the argument convention of :func:`split_example`."""
    args, kwargs = split_example(example_input)
    return model(*args, **kwargs)


# ---------------------------------------------------------------------------
# Execution order
# ---------------------------------------------------------------------------


def plain_type(module: nn.Module) -> type[nn.Module] | None:
    """``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` for a supported layer (plain or compressed).

    ``None`` for anything else, subclasses of those types included: a
    subclass may change ``forward``, so it is not converted.
    """
    if isinstance(module, CompressedModule):
        return module._plain_type
    t = type(module)
    return t if t in SUPPORTED_LAYERS else None


def _parameter_owners(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(False))}


def execution_order(
    model: nn.Module, example_input: Any, candidates: Mapping[str, nn.Module] | None = None
) -> list[str]:
    """Names of ``candidates`` in the order ``model(example_input)`` first calls them.

    Parameters
    ----------
    model : nn.Module
        The model; it runs once in eval mode under ``torch.no_grad()`` (no
        BatchNorm statistics change) and every module's training flag is
        restored afterwards.
    example_input : tensor, tuple or dict
        As in :func:`call_model`.
    candidates : mapping of name to module, optional
        The modules to order; by default every module that owns parameters.

    Returns
    -------
    list of str
        Qualified names, each at its first call; modules that never run are absent.
    """
    if candidates is None:
        candidates = _parameter_owners(model)
    names = {id(m): name for name, m in candidates.items()}
    order: list[str] = []
    seen: set[int] = set()

    def hook(module: nn.Module, args: Any) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            order.append(names[id(module)])

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(hook) for m in candidates.values()]
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return order


# ---------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LastLayers:
    """Selector of the last ``n`` layers; build it with :func:`last_layers`."""

    n: int
    include_linear: bool = False

    def candidates(self, model: nn.Module) -> dict[str, nn.Module]:
        """Supported layers of ``model`` this selector counts, in module order."""
        kinds = SUPPORTED_LAYERS if self.include_linear else _CONVS
        return {
            name: m
            for name, m in model.named_modules()
            if (base := plain_type(m)) is not None and issubclass(base, kinds)
        }

    def select(self, model: nn.Module, example_input: Any = None) -> list[str]:
        """Qualified names of the selected layers, in execution (or module) order."""
        cands = self.candidates(model)
        if example_input is None:
            order = list(cands)
        else:
            order = execution_order(model, example_input, cands)
        if self.n > len(order):
            kind = "conv/linear" if self.include_linear else "conv"
            raise ValueError(
                f"last_layers({self.n}) but the model has only {len(order)} {kind} layers"
                + (" that run on example_input" if example_input is not None else "")
            )
        return order[len(order) - self.n :]


def last_layers(n: int, include_linear: bool = False) -> LastLayers:
    """Select the last ``n`` convolutions (optionally counting Linears too).

    Execution order when an example input is given, module order otherwise
    (see :mod:`tensorcompress.torch.selection`). The paper's "last N layers"
    are convs only (the classifier is fine-tuned but not counted).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    >>> select_layers(net, last_layers(1), torch.randn(1, 3, 8, 8))
    ['2']
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return LastLayers(n, include_linear)


LayerSelection: TypeAlias = LastLayers | FilterFn | Iterable[str] | None


def select_layers(
    model: nn.Module,
    layers: LayerSelection = None,
    example_input: Any = None,
    *,
    subclasses: bool = False,
) -> list[str]:
    """Qualified names of the supported layers ``layers`` selects.

    Parameters
    ----------
    model : nn.Module
        The model.
    layers : LastLayers, callable, iterable of str or None
        See :mod:`tensorcompress.torch.selection`.
    example_input : tensor, tuple or dict, optional
        Resolves :func:`last_layers` in execution order.
    subclasses : bool, default False
        Also select subclasses of ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear``.
        Measuring one is fine; converting one is not (a subclass may change
        ``forward``), so ``convert`` leaves this False.

    Returns
    -------
    list of str
        Distinct names, in selection order (execution order for
        :func:`last_layers`, module order for ``None`` and a filter, the given
        order for a list).

    Raises
    ------
    TypeError
        A single string (not a list), or a name of a module that is not a
        supported layer.
    ValueError
        Names that are not modules of the model, a name given twice, or more
        layers asked of :func:`last_layers` than the model has.
    """

    def supported(m: nn.Module) -> bool:
        return plain_type(m) is not None or (subclasses and isinstance(m, SUPPORTED_LAYERS))

    named = dict(model.named_modules())
    if layers is None:
        return [name for name, m in named.items() if supported(m)]
    if isinstance(layers, LastLayers):
        return layers.select(model, example_input)
    if callable(layers):
        return [name for name, m in named.items() if supported(m) and layers(m, name)]
    if isinstance(layers, str):
        raise TypeError(
            f"layers must be a list of names, not a single string {layers!r}; wrap it in a list"
        )
    names = list(layers)
    missing = [name for name in names if name not in named]
    if missing:
        raise ValueError(f"layers names {missing}, which are not modules of the model")
    wrong = [
        f"{name!r} ({type(named[name]).__name__})" for name in names if not supported(named[name])
    ]
    if wrong:
        exact = "" if subclasses else " (exactly, or their compressed twins)"
        raise TypeError(
            f"layers {', '.join(wrong)} are not supported; only nn.Conv1d, nn.Conv2d and "
            f"nn.Linear{exact} can be selected"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"layers names a module more than once: {names}")
    return names


# ---------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------


def fine_tuned_modules(model: nn.Module, layers: Sequence[str], example_input: Any) -> list[str]:
    """Modules that train when ``layers`` (e.g. the last N convs) are fine-tuned.

    The rule of the paper's code, in execution order: every module owning
    parameters that runs at or after the first of ``layers`` (the selected
    layers, the BatchNorms between and after them, the classifier). Pass the
    result to :func:`trainable_only`.

    Parameters
    ----------
    model : nn.Module
        The model (plain or converted).
    layers : sequence of str
        Qualified names of the fine-tuned layers.
    example_input : tensor, tuple or dict
        One batch, to find execution order (see :func:`execution_order`).

    Returns
    -------
    list of str
        Names of parameter-owning modules, in execution order.

    Raises
    ------
    ValueError
        If ``layers`` is empty or names a module that does not run.
    """
    if not layers:
        raise ValueError("layers is empty; name at least one fine-tuned layer")
    order = execution_order(model, example_input)
    missing = [name for name in layers if name not in order]
    if missing:
        raise ValueError(f"layers {missing} do not run (or own no parameters) in the forward")
    first = min(order.index(name) for name in layers)
    return order[first:]


def trainable_only(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Keep ``requires_grad`` only on parameters of the modules named in ``names``.

    Every other parameter is frozen. A name selects the module and everything
    under it (``"fc"`` covers ``fc.weight`` and ``fc.bias``; ``""`` is the whole
    model). Returns ``model``.
    """
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise ValueError(f"{name!r} is not a module of the model")
    keep = {id(p) for name in names for p in modules[name].parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model
