"""Swap a model's layers for compressed ones (and back), and choose which.

``convert(model, method=..., rank=..., layers=...)`` replaces the selected
``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` modules in place by
:class:`~tensorcompress.torch.modules.CompressedConv2d` & co., which share
their parameters (so ``state_dict`` keys and tensors are unchanged);
``restore(model)`` puts plain modules back.

Layer selection (``layers=``):

- ``None``: every ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear``;
- :func:`last_layers` ``(n)``: the last ``n`` convolutions (and Linears with
  ``include_linear=True``) in **execution order**, found by running the model
  once on ``example_input`` (in eval mode, without gradients, then restoring
  every module's mode) with a pre-hook on every candidate; a layer called
  several times counts at its first call, and a layer never called is not a
  candidate. Without ``example_input`` it falls back to **module order**
  (``model.named_modules()``, i.e. registration order), which equals execution
  order for torchvision-style models (a BasicBlock runs conv1, conv2,
  downsample.0, which is also its registration order) but not for a model
  whose ``forward`` calls its children in another order;
- a ``filter_fn(module, qualified_name) -> bool``;
- a list of qualified names (each must name a supported layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorcompress.torch.modules import (
    CompressedConv1d,
    CompressedConv2d,
    CompressedLinear,
    CompressedModule,
    CompressionConfig,
)

__all__ = [
    "LastLayers",
    "compressed_layers",
    "convert",
    "last_layers",
    "restore",
    "trainable_only",
]

_WRAPPERS: dict[type[nn.Module], type[CompressedModule]] = {
    nn.Conv1d: CompressedConv1d,
    nn.Conv2d: CompressedConv2d,
    nn.Linear: CompressedLinear,
}
_CONVS = (nn.Conv1d, nn.Conv2d)

FilterFn = Callable[[nn.Module, str], bool]


def _base_type(m: nn.Module) -> type[nn.Module] | None:
    """``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` for a plain or compressed layer, else None."""
    if isinstance(m, CompressedModule):
        return m._plain_type
    t = type(m)
    return t if t in _WRAPPERS else None


def _run(model: nn.Module, example_input: Any) -> None:
    if isinstance(example_input, Mapping):
        model(**example_input)
    elif isinstance(example_input, tuple):
        model(*example_input)
    else:
        model(example_input)


def execution_order(
    model: nn.Module, example_input: Any, candidates: Mapping[str, nn.Module]
) -> list[str]:
    """Names of ``candidates`` in the order ``model(example_input)`` first calls them.

    Runs in eval mode under ``torch.no_grad()`` (no BatchNorm statistics
    change) and restores every module's training flag afterwards.
    """
    order: list[str] = []
    names: dict[int, str] = {id(m): name for name, m in candidates.items()}
    seen: set[int] = set()

    def hook(module: nn.Module, args: Any) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            order.append(names[id(module)])

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(hook) for m in candidates.values()]
    try:
        model.eval()
        with torch.no_grad():
            _run(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return order


@dataclass(frozen=True)
class LastLayers:
    """Selector of the last ``n`` layers; build it with :func:`last_layers`."""

    n: int
    include_linear: bool = False

    def candidates(self, model: nn.Module) -> dict[str, nn.Module]:
        """Supported layers of ``model`` in module order."""
        kinds = (*_CONVS, nn.Linear) if self.include_linear else _CONVS
        return {
            name: m
            for name, m in model.named_modules()
            if (base := _base_type(m)) is not None and issubclass(base, kinds)
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

    Execution order when ``convert`` gets ``example_input``, module order
    otherwise (see :mod:`tensorcompress.torch.convert`). The paper's "last N
    layers" are convs only (the classifier is fine-tuned but not counted).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return LastLayers(n, include_linear)


def _select(
    model: nn.Module,
    layers: LastLayers | FilterFn | Iterable[str] | None,
    example_input: Any,
) -> list[str]:
    supported = {name: m for name, m in model.named_modules() if _base_type(m) is not None}
    if layers is None:
        return list(supported)
    if isinstance(layers, LastLayers):
        return layers.select(model, example_input)
    if callable(layers):
        return [name for name, m in supported.items() if layers(m, name)]
    if isinstance(layers, str):
        raise TypeError("layers must be a list of names, not a single string; wrap it in a list")
    names = list(layers)
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise ValueError(f"layers names {name!r}, which is not a module of the model")
        if name not in supported:
            raise TypeError(
                f"layer {name!r} is a {type(modules[name]).__name__}; only nn.Conv1d, "
                "nn.Conv2d and nn.Linear (exactly) can be converted"
            )
    return names


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child (a shared layer is replaced everywhere)."""
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new


def convert(
    model: nn.Module,
    method: str = "asi",
    rank: Any = 0.8,
    layers: LastLayers | FilterFn | Iterable[str] | None = None,
    *,
    example_input: Any = None,
    freeze_others: bool = False,
    **options: Any,
) -> nn.Module:
    """Replace the selected layers by compressed ones, in place.

    Parameters
    ----------
    model : nn.Module
        The model; modified in place.
    method : {"asi", "hosvd", "svd", "gradient_filter", "vanilla"}
        Compression method.
    rank : int, float, sequence, rank policy or dict
        One rank for every selected layer, or a dict from qualified name to
        rank with exactly one entry per selected layer.
    layers : LastLayers, callable, list of str or None
        Which layers (see :mod:`tensorcompress.torch.convert`); ``None``
        selects every Conv1d/Conv2d/Linear.
    example_input : tensor, tuple or dict, optional
        An input for ``model``, to find execution order for :func:`last_layers`.
    freeze_others : bool, default False
        If True, only the selected layers' parameters keep ``requires_grad``
        (see :func:`trainable_only` to add, e.g., the classifier).
    **options
        Other :class:`~tensorcompress.torch.modules.CompressionConfig` fields:
        ``n_iter``, ``patch``, ``check_finite``, ``seed``.

    Returns
    -------
    nn.Module
        ``model`` (or the compressed layer itself if ``model`` is a single
        selected layer).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tensorcompress.torch import convert, last_layers, restore
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    >>> net = convert(net, method="asi", rank=0.8, layers=last_layers(1))
    >>> type(net[2]).__name__
    'CompressedConv2d'
    >>> type(restore(net)[2]).__name__
    'Conv2d'
    """
    allowed = {"n_iter", "patch", "check_finite", "seed"}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; expected some of {sorted(allowed)}")
    names = _select(model, layers, example_input)
    modules = dict(model.named_modules())
    if isinstance(rank, Mapping):
        missing = [n for n in names if n not in rank]
        extra = [n for n in rank if n not in names]
        if missing or extra:
            raise ValueError(
                "a rank dict needs exactly one entry per selected layer: "
                f"missing {missing}, not selected {extra}"
            )
    configs = {
        name: CompressionConfig(
            method=method, rank=rank[name] if isinstance(rank, Mapping) else rank, **options
        )
        for name in names
    }
    root = model
    for name in names:
        old = modules[name]
        base = _base_type(old)
        assert base is not None
        new = _WRAPPERS[base].from_module(old, configs[name], name=name)
        if name == "":
            root = new
        else:
            _replace(model, old, new)
    if freeze_others:
        trainable_only(root, names)
    return root


def restore(model: nn.Module) -> nn.Module:
    """Put plain ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` back, in place.

    Parameters, buffers and hooks are the same objects; compression state is
    dropped. Returns ``model`` (or the plain layer if ``model`` is one).
    """
    if isinstance(model, CompressedModule):
        return model.to_plain()
    for _name, m in list(model.named_modules()):
        if isinstance(m, CompressedModule):
            _replace(model, m, m.to_plain())
    return model


def compressed_layers(model: nn.Module) -> dict[str, CompressedModule]:
    """The compressed layers of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedModule)}


def trainable_only(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Keep ``requires_grad`` only on parameters of the modules named in ``names``.

    Every other parameter is frozen. A name selects the module and everything
    under it (``"fc"`` covers ``fc.weight`` and ``fc.bias``). Returns ``model``.
    """
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise ValueError(f"{name!r} is not a module of the model")
    keep = {id(p) for name in names for p in modules[name].parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model
