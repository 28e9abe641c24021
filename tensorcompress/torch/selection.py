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
- :func:`last_blocks` ``(n)``: every supported layer of the last ``n``
  elements of the model's repeated block list (a transformer's layers; see
  :func:`find_blocks`), in execution order with ``example_input``, module
  order without;
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
    "LastBlocks",
    "LastLayers",
    "LayerSelection",
    "call_model",
    "check_per_layer",
    "execution_order",
    "find_blocks",
    "fine_tuned_modules",
    "last_blocks",
    "last_layers",
    "plain_type",
    "select_layers",
    "shared_inputs",
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
    return [call.name for call in _first_calls(model, example_input, candidates)]


@dataclass(frozen=True)
class _FirstCall:
    name: str
    input: torch.Tensor | None = None  # the first tensor argument, when recorded
    version: int | None = None  # its version counter at the call


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


def _first_calls(
    model: nn.Module,
    example_input: Any,
    candidates: Mapping[str, nn.Module],
    record_inputs: bool = False,
) -> list[_FirstCall]:
    """The one tracer: each candidate at its first call of ``model(example_input)``.

    With ``record_inputs`` every call keeps its first tensor argument, so no
    two recorded inputs can share an ``id`` (the list holds them alive).
    """
    names = {id(m): name for name, m in candidates.items()}
    calls: list[_FirstCall] = []
    seen: set[int] = set()

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if not record_inputs:
            calls.append(_FirstCall(names[id(module)]))
            return
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        version = None if x is None else _version(x)
        calls.append(_FirstCall(names[id(module)], x, version))

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in candidates.values()]
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return calls


def shared_inputs(model: nn.Module, layers: Sequence[str], example_input: Any) -> list[list[str]]:
    """Groups of ``layers`` that read the same tensor, found by tracing a forward.

    Parameters
    ----------
    model : nn.Module
        The model; it runs once as in :func:`execution_order`.
    layers : sequence of str
        Qualified names of the layers to group.
    example_input : tensor, tuple or dict
        As in :func:`call_model`.

    Returns
    -------
    list of list of str
        Each group (two or more layers whose first call received the same
        tensor object, unmodified in between: q/k/v, gate/up) in execution
        order; groups ordered by their first layer. Layers reading a tensor
        of their own are in no group.

    Raises
    ------
    ValueError
        A name that is not a module of the model.
    """
    named = dict(model.named_modules())
    missing = [name for name in layers if name not in named]
    if missing:
        raise ValueError(f"layers names {missing}, which are not modules of the model")
    calls = _first_calls(model, example_input, {n: named[n] for n in layers}, record_inputs=True)
    by_input: dict[tuple[int, int], list[str]] = {}
    for call in calls:
        if call.input is not None and call.version is not None:
            by_input.setdefault((id(call.input), call.version), []).append(call.name)
    return [group for group in by_input.values() if len(group) > 1]


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


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------


def _hf_conv1d(module: nn.Module) -> bool:
    """A ``transformers.pytorch_utils.Conv1D`` (GPT-2's Linear), recognised without importing it."""
    t = type(module)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers.")


def _layer_like(module: nn.Module) -> bool:
    """A layer a block is made of: supported, factored (WSI/WASI, low-rank), or one
    :class:`LastBlocks` refuses to skip."""
    # lowrank imports this module (through convert): import it when first needed.
    from tensorcompress.torch.lowrank import LowRankModule

    return (
        plain_type(module) is not None
        or isinstance(module, (nn.MultiheadAttention, LowRankModule))
        or _hf_conv1d(module)
    )


def _is_block_list(module: nn.Module) -> bool:
    """Elements of one class, each a container holding at least one layer."""
    elements = list(module.children())
    if not elements or len({type(e) for e in elements}) != 1 or _layer_like(elements[0]):
        return False
    return all(any(_layer_like(m) for m in e.modules()) for e in elements)


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.Module]:
    """The model's list of repeated blocks: its qualified name and the list.

    The rule: among the ``nn.ModuleList`` modules whose elements all have one
    class and each hold at least one layer (a ``Conv1d``/``Conv2d``/
    ``Linear``, an ``nn.MultiheadAttention`` or a transformers ``Conv1D``),
    ignoring lists nested inside another such list's elements (a
    mixture-of-experts list inside a decoder layer), the longest. It finds
    Hugging Face ViT's ``vit.layers``, Llama/Mistral/Qwen's ``model.layers``,
    GPT-2's ``transformer.h`` and ``nn.TransformerEncoder``'s ``layers``.

    Parameters
    ----------
    model : nn.Module
        The model.
    blocks : str, optional
        Name the list instead (an ``nn.ModuleList`` or ``nn.Sequential``, e.g.
        a timm ViT's ``"blocks"`` or a ResNet stage ``"layer4"``): for models
        whose blocks are an ``nn.Sequential``, or with two lists of the same
        length (an encoder and a decoder).

    Returns
    -------
    tuple of (str, nn.Module)
        The list's qualified name and the list itself.

    Raises
    ------
    ValueError
        No such list, two or more of the longest length (the message names
        them), or a ``blocks`` name that is not a module of the model.
    TypeError
        A ``blocks`` name of a module that is not an ``nn.ModuleList`` or
        ``nn.Sequential``.
    """
    named = dict(model.named_modules())
    if blocks is not None:
        if blocks not in named:
            raise ValueError(f"blocks={blocks!r} is not a module of the model")
        found = named[blocks]
        if not isinstance(found, (nn.ModuleList, nn.Sequential)):
            raise TypeError(
                f"blocks={blocks!r} is a {type(found).__name__}, not an nn.ModuleList or "
                "nn.Sequential of blocks"
            )
        return blocks, found
    lists = [n for n, m in named.items() if isinstance(m, nn.ModuleList) and _is_block_list(m)]
    outer = [
        n for n in lists if not any(o != n and (o == "" or n.startswith(o + ".")) for o in lists)
    ]
    if not outer:
        raise ValueError(
            f"found no repeated blocks in {type(model).__name__}: blocks are the elements of the "
            "longest nn.ModuleList whose elements share one class and hold Linear or conv layers "
            "(HF ViT's vit.layers, Llama's model.layers, GPT-2's transformer.h, "
            "nn.TransformerEncoder's layers). Name the list with last_blocks(n, blocks=...), or "
            "select layers with last_layers(n) or a list of names"
        )
    longest = max(len(named[n]) for n in outer)
    tied = [n for n in outer if len(named[n]) == longest]
    if len(tied) > 1:
        raise ValueError(
            f"{len(tied)} block lists of {longest} blocks each: {tied}; name one with "
            "last_blocks(n, blocks=...)"
        )
    return tied[0], named[tied[0]]


@dataclass(frozen=True)
class LastBlocks:
    """Selector of the layers of the last ``n`` blocks; build it with :func:`last_blocks`."""

    n: int
    blocks: str | None = None

    def _last(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        name, found = find_blocks(model, self.blocks)
        items = [(k, m) for k, m in found._modules.items() if m is not None]
        if self.n > len(items):
            raise ValueError(f"last_blocks({self.n}) but {name!r} holds only {len(items)} blocks")
        prefix = f"{name}." if name else ""
        return [(prefix + k, m) for k, m in items[len(items) - self.n :]]

    def block_names(self, model: nn.Module) -> list[str]:
        """Qualified names of the last ``n`` blocks, in list order."""
        return [name for name, _ in self._last(model)]

    def candidates(self, model: nn.Module) -> dict[str, nn.Module]:
        """Supported layers of the last ``n`` blocks, in module order.

        Raises
        ------
        ValueError
            A block holding an ``nn.MultiheadAttention`` or a transformers
            ``Conv1D`` (see :func:`last_blocks`).
        """
        # A module shared between blocks (tied weights) goes by its first name in the model.
        canonical = {id(m): n for n, m in model.named_modules()}  # each module once
        inside = {canonical[id(m)]: m for _, block in self._last(model) for m in block.modules()}
        layers = {n: m for n, m in inside.items() if plain_type(m) is not None}
        mha = [n for n, m in inside.items() if isinstance(m, nn.MultiheadAttention)]
        if mha:
            raise ValueError(
                f"last_blocks({self.n}): {mha} are nn.MultiheadAttention modules, which compute "
                "q, k and v from one parameter (in_proj_weight) inside "
                "F.multi_head_attention_forward, not through Linear modules, so their input "
                "projection cannot be compressed; their out_proj (a Linear subclass) is never "
                "called as a module either (its weight is passed to the same function), so it is "
                "not converted. Rather than leave attention silently uncompressed, last_blocks "
                f"refuses: select the blocks' other layers by name, layers={sorted(layers)}, or "
                "use a model with separate q/k/v Linear layers (Hugging Face models)"
            )
        conv1d = [n for n, m in inside.items() if _hf_conv1d(m)]
        if conv1d:
            raise ValueError(
                f"last_blocks({self.n}): {conv1d} are transformers Conv1D layers (GPT-2 style: "
                "a Linear whose weight is stored transposed, not an nn.Linear), which the adapter "
                "does not compress. Rather than leave them silently uncompressed, last_blocks "
                + (
                    f"refuses: select the blocks' other layers by name, layers={sorted(layers)}"
                    if layers
                    else "refuses; the blocks hold no Conv1d/Conv2d/Linear layer to select"
                )
            )
        return layers

    def select(self, model: nn.Module, example_input: Any = None) -> list[str]:
        """Qualified names of the selected layers, in execution (or module) order."""
        cands = self.candidates(model)
        order = (
            list(cands) if example_input is None else execution_order(model, example_input, cands)
        )
        if not order:
            raise ValueError(
                f"last_blocks({self.n}): the last {self.n} blocks hold no Conv1d/Conv2d/Linear "
                "layer" + (" that runs on example_input" if example_input is not None else "")
            )
        return order


def last_blocks(n: int, blocks: str | None = None) -> LastBlocks:
    """Select the Linear (and conv) layers of the model's last ``n`` blocks.

    The blocks are found by :func:`find_blocks` (the longest ``nn.ModuleList``
    of one class of module, e.g. a transformer's layers), or named by
    ``blocks``. The selection is every ``nn.Linear``/``nn.Conv1d``/
    ``nn.Conv2d`` (exactly these types, or their compressed twins) inside
    those blocks, in execution order when an example input is given (module
    order otherwise). Layers outside the blocks (embeddings, the final norm,
    the classifier head) are not selected. Attention probabilities, norm and
    activation-function inputs are not layers and are never compressed.

    A selected block holding a layer the adapter cannot compress is refused
    (``ValueError`` naming it, when the selection is resolved) rather than
    left uncompressed in silence:

    - ``nn.MultiheadAttention`` keeps its q/k/v projection as a parameter
      (``in_proj_weight``) used inside ``F.multi_head_attention_forward``, so
      there is no Linear module to convert; its ``out_proj`` is a Linear
      subclass (``NonDynamicallyQuantizableLinear``) whose weight the same
      function uses without calling the module, so it is not converted either.
      ``nn.TransformerEncoder`` therefore needs its other layers selected by
      name (``linear1``, ``linear2``).
    - GPT-2's ``transformers.pytorch_utils.Conv1D`` is a Linear with a
      transposed weight, not an ``nn.Linear``; it is not supported.

    Parameters
    ----------
    n : int
        Number of blocks, counted from the last.
    blocks : str, optional
        Qualified name of the block list, when :func:`find_blocks` cannot
        find it (an ``nn.Sequential`` of blocks, two lists of equal length).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.ModuleDict({"blocks": nn.ModuleList(
    ...     nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)) for _ in range(3))})
    >>> select_layers(net, last_blocks(1))
    ['blocks.2.0', 'blocks.2.2']
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if blocks is not None and not isinstance(blocks, str):
        raise TypeError(f"blocks must be the qualified name of a module (a str), got {blocks!r}")
    return LastBlocks(n, blocks)


LayerSelection: TypeAlias = LastLayers | LastBlocks | FilterFn | Iterable[str] | None


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
    layers : LastLayers, LastBlocks, callable, iterable of str or None
        See :mod:`tensorcompress.torch.selection`.
    example_input : tensor, tuple or dict, optional
        Resolves :func:`last_layers` and :func:`last_blocks` in execution order.
    subclasses : bool, default False
        Also select subclasses of ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear``.
        Measuring one is fine; converting one is not (a subclass may change
        ``forward``), so ``convert`` leaves this False.

    Returns
    -------
    list of str
        Distinct names, in selection order (execution order for
        :func:`last_layers` and :func:`last_blocks`, module order for ``None``
        and a filter, the given order for a list).

    Raises
    ------
    TypeError
        A single string (not a list), or a name of a module that is not a
        supported layer.
    ValueError
        Names that are not modules of the model, a name given twice, more
        layers asked of :func:`last_layers` than the model has, or a
        :func:`last_blocks` selection that finds no blocks or refuses them.
    """

    def supported(m: nn.Module) -> bool:
        return plain_type(m) is not None or (subclasses and isinstance(m, SUPPORTED_LAYERS))

    named = dict(model.named_modules())
    if layers is None:
        return [name for name, m in named.items() if supported(m)]
    if isinstance(layers, (LastLayers, LastBlocks)):
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


def check_per_layer(what: str, given: Mapping[str, Any], names: Sequence[str]) -> None:
    """``ValueError`` unless ``given`` (a per-layer dict: ranks, Gram matrices) has
    exactly one entry per selected layer in ``names``; ``what`` names it in the message."""
    missing = [n for n in names if n not in given]
    extra = [n for n in given if n not in names]
    if missing or extra:
        raise ValueError(
            f"{what} needs exactly one entry per selected layer: "
            f"missing {missing}, not selected {extra}"
        )


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
