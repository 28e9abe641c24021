"""Swap a model's layers for compressed ones (and back).

``convert(model, config, layers)`` replaces the selected
``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` modules in place by
:class:`~tensorcompress.torch.modules.CompressedConv2d` & co., which share
their parameters (so ``state_dict`` keys and tensors are unchanged);
``restore(model)`` puts plain modules back and undoes everything ``convert``
did. Which layers: see :mod:`tensorcompress.torch.selection`.

Layers that read the same tensor (a transformer block's q/k/v projections,
a gated MLP's gate and up projections) are found by tracing one forward on
``example_input`` and share one compressed form
(:class:`~tensorcompress.torch.modules.SharedInput`): the input is decomposed
once per step and its factors are saved once.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Any

from torch import nn

from tensorcompress.torch.modules import (
    SHAREABLE_METHODS,
    CompressedConv1d,
    CompressedConv2d,
    CompressedLinear,
    CompressedModule,
    CompressionConfig,
    SharedInput,
)
from tensorcompress.torch.selection import (
    LayerSelection,
    check_per_layer,
    plain_type,
    select_layers,
    shared_inputs,
    trainable_only,
)

__all__ = ["compressed_layers", "convert", "input_groups", "replace_module", "restore"]

_WRAPPERS: dict[type[nn.Module], type[CompressedModule]] = {
    nn.Conv1d: CompressedConv1d,
    nn.Conv2d: CompressedConv2d,
    nn.Linear: CompressedLinear,
}

# requires_grad flags that convert(freeze_others=True) changed, per model, for restore().
_FROZEN: weakref.WeakKeyDictionary[nn.Module, list[tuple[nn.Parameter, bool]]] = (
    weakref.WeakKeyDictionary()
)


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child of a module of ``model``, in place.

    A layer registered under several parents (shared) is replaced everywhere.
    """
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
    share_inputs: bool = True,
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
    layers : LastLayers, LastBlocks, callable, list of str or None
        Which layers (see :mod:`tensorcompress.torch.selection`); ``None``
        selects every Conv1d/Conv2d/Linear.
    example_input : tensor, tuple or dict, optional
        An input for ``model``, to find execution order for
        :func:`~tensorcompress.torch.selection.last_layers` and
        :func:`~tensorcompress.torch.selection.last_blocks`, and the layers
        that read the same tensor (``share_inputs``).
    freeze_others : bool, default False
        If True, only the selected layers' parameters keep ``requires_grad``
        (see :func:`~tensorcompress.torch.selection.trainable_only` to add,
        e.g., the classifier); :func:`restore` gives the flags back.
    share_inputs : bool, default True
        With ``example_input``: selected layers whose first call in one
        traced forward reads the same tensor, with the same type and config
        and method ``"asi"``, ``"hosvd"`` or ``"svd"``, form a
        :class:`~tensorcompress.torch.modules.SharedInput` group (see
        :func:`~tensorcompress.torch.selection.shared_inputs`). Without
        ``example_input`` (or with False) every layer decomposes its own
        input. Re-converting a layer of a group dissolves that group.
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
        check_per_layer("a rank dict", rank, names)
    configs = {
        name: base
        if rank is None
        else dataclasses.replace(base, rank=rank[name] if isinstance(rank, Mapping) else rank)
        for name in names
    }
    modules = dict(model.named_modules())
    for name in names:
        old = modules[name]
        if isinstance(old, CompressedModule) and old.shared_input is not None:
            old.shared_input.dissolve()
    root = model
    new_layers: dict[str, CompressedModule] = {}
    for name in names:
        old = modules[name]
        kind = plain_type(old)
        assert kind is not None
        new = _WRAPPERS[kind].from_module(old, configs[name], name=name)
        new_layers[name] = new
        if name == "":
            root = new
        else:
            replace_module(model, old, new)
    if share_inputs and example_input is not None and len(new_layers) > 1:
        _group(root, new_layers, example_input)
    if freeze_others:
        flags = _FROZEN.setdefault(root, [])
        seen = {id(p) for p, _ in flags}
        flags.extend((p, p.requires_grad) for p in root.parameters() if id(p) not in seen)
        trainable_only(root, names)
    return root


def _group(model: nn.Module, layers: Mapping[str, CompressedModule], example_input: Any) -> None:
    """Join the layers that read one tensor (and can share its decomposition) into groups."""
    for names in shared_inputs(model, list(layers), example_input):
        parts: list[list[CompressedModule]] = []  # one per (layer type, config)
        for layer in (layers[name] for name in names):
            if layer.compression.method not in SHAREABLE_METHODS:
                continue
            for part in parts:
                if (part[0]._plain_type, part[0].compression) == (
                    layer._plain_type,
                    layer.compression,
                ):
                    part.append(layer)
                    break
            else:
                parts.append([layer])
        for part in parts:
            if len(part) > 1:
                SharedInput(part)


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
            replace_module(model, m, m.to_plain())
    return model


def compressed_layers(model: nn.Module) -> dict[str, CompressedModule]:
    """The compressed layers of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedModule)}


def input_groups(model: nn.Module) -> list[SharedInput]:
    """The :class:`~tensorcompress.torch.modules.SharedInput` groups of ``model``'s layers.

    In module order of their first member found; each group once.
    """
    groups: dict[int, SharedInput] = {}
    for m in compressed_layers(model).values():
        if m.shared_input is not None:
            groups.setdefault(id(m.shared_input), m.shared_input)
    return list(groups.values())
