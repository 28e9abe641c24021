"""Swap a model's layers for compressed ones (and back).

``convert(model, config, layers)`` replaces the selected
``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` modules in place by
:class:`~tensorcompress.torch.modules.CompressedConv2d` & co., which share
their parameters (so ``state_dict`` keys and tensors are unchanged);
``restore(model)`` puts plain modules back and undoes everything ``convert``
did. Which layers: see :mod:`tensorcompress.torch.selection`.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Any

from torch import nn

from tensorcompress.torch.modules import (
    CompressedConv1d,
    CompressedConv2d,
    CompressedLinear,
    CompressedModule,
    CompressionConfig,
)
from tensorcompress.torch.selection import (
    LayerSelection,
    plain_type,
    select_layers,
    trainable_only,
)

__all__ = ["compressed_layers", "convert", "restore"]

_WRAPPERS: dict[type[nn.Module], type[CompressedModule]] = {
    nn.Conv1d: CompressedConv1d,
    nn.Conv2d: CompressedConv2d,
    nn.Linear: CompressedLinear,
}

# requires_grad flags that convert(freeze_others=True) changed, per model, for restore().
_FROZEN: weakref.WeakKeyDictionary[nn.Module, list[tuple[nn.Parameter, bool]]] = (
    weakref.WeakKeyDictionary()
)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child (a shared layer is replaced everywhere)."""
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new


def convert(
    model: nn.Module,
    config: CompressionConfig | None = None,
    layers: LayerSelection = None,
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
    config : CompressionConfig, optional
        How every selected layer compresses its input. Without it, one is
        built from ``**options``.
    layers : LastLayers, callable, list of str or None
        Which layers (see :mod:`tensorcompress.torch.selection`); ``None``
        selects every Conv1d/Conv2d/Linear.
    example_input : tensor, tuple or dict, optional
        An input for ``model``, to find execution order for
        :func:`~tensorcompress.torch.selection.last_layers`.
    freeze_others : bool, default False
        If True, only the selected layers' parameters keep ``requires_grad``
        (see :func:`~tensorcompress.torch.selection.trainable_only` to add,
        e.g., the classifier); :func:`restore` gives the flags back.
    **options
        Keyword form of the config: any :class:`CompressionConfig` field
        (``method``, ``rank``, ``n_iter``, ``patch``, ``check_finite``,
        ``seed``). With ``config`` they replace its fields. ``rank`` may also
        be a dict from qualified name to rank with exactly one entry per
        selected layer.

    Returns
    -------
    nn.Module
        ``model`` (or the compressed layer itself if ``model`` is a single
        selected layer).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tensorcompress.torch import CompressionConfig, convert, last_layers, restore
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    >>> net = convert(net, CompressionConfig(method="asi", rank=0.8), last_layers(1))
    >>> type(net[2]).__name__
    'CompressedConv2d'
    >>> net = convert(restore(net), method="hosvd", rank=0.9, layers=["0"])  # keyword form
    >>> net[0].compression.method
    'hosvd'
    >>> type(restore(net)[0]).__name__
    'Conv2d'
    """
    if config is not None and not isinstance(config, CompressionConfig):
        raise TypeError(
            f"config must be a CompressionConfig, got {type(config).__name__} {config!r}; "
            "pass method=..., rank=... as keywords for the keyword form"
        )
    fields = {f.name for f in dataclasses.fields(CompressionConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(
            f"unknown options {unknown}; expected CompressionConfig fields {sorted(fields)}"
        )
    names = select_layers(model, layers, example_input)
    rank = options.pop("rank", None if config is None else config.rank)
    base = (
        CompressionConfig(**options) if config is None else dataclasses.replace(config, **options)
    )
    if isinstance(rank, Mapping):
        missing = [n for n in names if n not in rank]
        extra = [n for n in rank if n not in names]
        if missing or extra:
            raise ValueError(
                "a rank dict needs exactly one entry per selected layer: "
                f"missing {missing}, not selected {extra}"
            )
    configs = {
        name: base
        if rank is None
        else dataclasses.replace(base, rank=rank[name] if isinstance(rank, Mapping) else rank)
        for name in names
    }
    modules = dict(model.named_modules())
    root = model
    for name in names:
        old = modules[name]
        kind = plain_type(old)
        assert kind is not None
        new = _WRAPPERS[kind].from_module(old, configs[name], name=name)
        if name == "":
            root = new
        else:
            _replace(model, old, new)
    if freeze_others:
        flags = _FROZEN.setdefault(root, [])
        seen = {id(p) for p, _ in flags}
        flags.extend((p, p.requires_grad) for p in root.parameters() if id(p) not in seen)
        trainable_only(root, names)
    return root


def restore(model: nn.Module) -> nn.Module:
    """Put plain ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` back, in place.

    Parameters, buffers and hooks are the same objects; compression state is
    dropped, and ``requires_grad`` flags that ``convert(..., freeze_others=True)``
    changed are given back. Returns ``model`` (or the plain layer if ``model``
    is one).
    """
    for p, flag in _FROZEN.pop(model, []):
        p.requires_grad_(flag)
    if isinstance(model, CompressedModule):
        return model.to_plain()
    for _name, m in list(model.named_modules()):
        if isinstance(m, CompressedModule):
            _replace(model, m, m.to_plain())
    return model


def compressed_layers(model: nn.Module) -> dict[str, CompressedModule]:
    """The compressed layers of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedModule)}
