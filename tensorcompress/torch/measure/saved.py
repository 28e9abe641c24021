"""Saved-tensor accounting: the activation memory a training forward keeps for backward.

Measured and analytic activation memory of compressed (and vanilla) layers.
Two numbers per layer, both in bytes, reported side by side:

- **measured**: the storages of the tensors autograd actually saved while the
  layer ran its training forward, recorded with
  :func:`torch.autograd.graph.saved_tensors_hooks`;
- **analytic**: what the method's formula says the layer keeps (see
  :func:`analytic_bytes`).

Counting rules (the ones that make the two comparable and honest):

- A saved tensor is counted by its **storage** (``untyped_storage().nbytes()``),
  deduplicated by ``(device, storage data_ptr)``: a view keeps its whole base
  alive, so the storage is what memory really holds, and a tensor saved twice
  (``x * x``) or saved once as itself and once as a view (``x.view(-1, n)``) is
  counted once. A compressed layer that saves a narrow view of a big buffer is
  therefore charged for the buffer, which is the point of measuring.
- Parameters and buffers (weights, BatchNorm running statistics) that autograd
  saves are model state, not activations: any saved tensor sharing storage with
  a parameter or buffer, or cast from a trainable one (autocast's low-precision
  weight copies), goes to ``parameter_bytes`` and nowhere else.
- Under autocast a layer computes, and keeps, its input in autocast's dtype:
  the formulas use that dtype's item size.
- A save is attributed to every selected layer on the module stack when it
  happens (forward pre/post hooks track the stack); saves outside any selected
  layer go to ``other_bytes`` under the innermost running module. A storage
  saved both by a selected layer and elsewhere (a ReLU's output that the next
  conv saves as its input) belongs to the layer: vanilla training of that
  layer would keep it anyway.
- Tensors a custom autograd Function keeps as plain ``ctx`` attributes bypass
  ``saved_tensors_hooks``; the layer's autograd nodes are searched for them and
  they are added to the layer's measured bytes (and shown as ``unhooked_bytes``),
  so keeping activations outside ``save_for_backward`` cannot hide memory.

MB means 2**20 bytes. The paper convention (Mem = inputs kept by the last N
fine-tuned convs, float32) is ``report.kept_mb`` with ``method="vanilla"``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorcompress.results import SVDResult, TuckerResult
from tensorcompress.torch.functions import autocast_dtype
from tensorcompress.torch.gradient_filter import PatchAverage
from tensorcompress.torch.modules import METHODS, CompressedModule
from tensorcompress.torch.selection import (
    SUPPORTED_LAYERS,
    LayerSelection,
    select_layers,
    split_example,
)
from tensorcompress.torch.state import preserved_training_state

__all__ = [
    "MB",
    "LayerMemory",
    "MemoryReport",
    "activation_memory",
    "analytic_bytes",
]

MB = 2**20
"""Bytes in one MB (the paper's convention: MiB)."""

StorageKey = tuple[str, int]


@dataclass(frozen=True)
class LayerMemory:
    """Activation memory kept by one selected layer for its backward pass.

    Attributes
    ----------
    name : str
        Qualified module name (as in ``model.named_modules()``).
    kind : str
        ``"Conv1d"``, ``"Conv2d"`` or ``"Linear"``.
    method : str
        Compression method (``"vanilla"`` for an unconverted layer).
    input_shape, output_shape : tuple of int
        Shapes seen on the (first) call.
    dtype : str
        Dtype the layer computes in, e.g. ``"float32"``: the input's, or
        autocast's when autocast applies to the layer.
    measured_bytes : int
        Distinct storages autograd saved during the layer's forward (plus any
        tensor kept on its autograd nodes outside ``save_for_backward``).
    analytic_bytes : int
        What the method's formula says the layer keeps.
    vanilla_bytes : int
        The input activation's bytes: what the same layer keeps in vanilla
        training.
    ranks : tuple of int or None
        Ranks of the kept decomposition (Tucker: one per mode; SVD: one), or
        ``None`` for methods without ranks.
    saved_shapes : tuple of tuple of int
        Shapes of the non-parameter tensors the layer saved, in save order.
    unhooked_bytes : int
        Part of ``measured_bytes`` found on autograd nodes outside
        ``save_for_backward`` (should be 0).
    calls : int
        Forward calls of the layer during the measurement (bytes are summed).
    """

    name: str
    kind: str
    method: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    dtype: str
    measured_bytes: int
    analytic_bytes: int
    vanilla_bytes: int
    ranks: tuple[int, ...] | None = None
    saved_shapes: tuple[tuple[int, ...], ...] = ()
    unhooked_bytes: int = 0
    calls: int = 1

    @property
    def measured_mb(self) -> float:
        """``measured_bytes`` in MB (2**20 bytes)."""
        return self.measured_bytes / MB

    @property
    def analytic_mb(self) -> float:
        """``analytic_bytes`` in MB (2**20 bytes)."""
        return self.analytic_bytes / MB

    @property
    def vanilla_mb(self) -> float:
        """``vanilla_bytes`` in MB (2**20 bytes)."""
        return self.vanilla_bytes / MB

    @property
    def compression_ratio(self) -> float:
        """``vanilla_bytes / measured_bytes`` (``inf`` when nothing was kept)."""
        return self.vanilla_bytes / self.measured_bytes if self.measured_bytes else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (lists for shapes, MB fields added)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "method": self.method,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "dtype": self.dtype,
            "measured_bytes": self.measured_bytes,
            "analytic_bytes": self.analytic_bytes,
            "vanilla_bytes": self.vanilla_bytes,
            "ranks": None if self.ranks is None else list(self.ranks),
            "saved_shapes": [list(s) for s in self.saved_shapes],
            "unhooked_bytes": self.unhooked_bytes,
            "calls": self.calls,
            "measured_mb": self.measured_mb,
            "analytic_mb": self.analytic_mb,
            "vanilla_mb": self.vanilla_mb,
        }


@dataclass(frozen=True)
class MemoryReport:
    """Activation memory of one training forward, per selected layer and in total.

    Attributes
    ----------
    layers : tuple of LayerMemory
        Selected layers in execution order (first call).
    other_bytes : int
        Distinct activation storages saved outside the selected layers
        (BatchNorm inputs, ReLU outputs, pooling indices, unselected layers).
    other_by_module : tuple of (str, int)
        ``other_bytes`` split by the innermost module running at the save
        (``""`` is the root module's own forward).
    parameter_bytes : int
        Distinct parameter/buffer storages autograd saved (not activations;
        never part of any other count).
    total_bytes : int
        All distinct activation storages autograd saved: the selected layers'
        (counted once even when shared) plus ``other_bytes``.
    shared_bytes : int
        Bytes counted by more than one selected layer (two convs reading the
        same input): ``kept_bytes - shared_bytes + other_bytes == total_bytes``.
    dtype : str
        Compute dtype of the first selected layer (``""`` without layers).
    """

    layers: tuple[LayerMemory, ...]
    other_bytes: int
    other_by_module: tuple[tuple[str, int], ...] = field(default=())
    parameter_bytes: int = 0
    total_bytes: int = 0
    shared_bytes: int = 0
    dtype: str = ""

    @property
    def kept_bytes(self) -> int:
        """Sum of the selected layers' measured bytes (the paper's Mem)."""
        return sum(layer.measured_bytes for layer in self.layers)

    @property
    def analytic_bytes(self) -> int:
        """Sum of the selected layers' analytic bytes."""
        return sum(layer.analytic_bytes for layer in self.layers)

    @property
    def vanilla_bytes(self) -> int:
        """Sum of the selected layers' input activations (vanilla training's Mem)."""
        return sum(layer.vanilla_bytes for layer in self.layers)

    @property
    def kept_mb(self) -> float:
        """``kept_bytes`` in MB (2**20 bytes)."""
        return self.kept_bytes / MB

    @property
    def analytic_mb(self) -> float:
        """``analytic_bytes`` in MB (2**20 bytes)."""
        return self.analytic_bytes / MB

    @property
    def vanilla_mb(self) -> float:
        """``vanilla_bytes`` in MB (2**20 bytes)."""
        return self.vanilla_bytes / MB

    @property
    def other_mb(self) -> float:
        """``other_bytes`` in MB (2**20 bytes)."""
        return self.other_bytes / MB

    @property
    def total_mb(self) -> float:
        """``total_bytes`` in MB (2**20 bytes)."""
        return self.total_bytes / MB

    @property
    def compression_ratio(self) -> float:
        """``vanilla_bytes / kept_bytes`` over the selected layers."""
        return self.vanilla_bytes / self.kept_bytes if self.kept_bytes else math.inf

    def __getitem__(self, name: str) -> LayerMemory:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no selected layer named {name!r}; have {[x.name for x in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict, totals and MB figures included."""
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "other_bytes": self.other_bytes,
            "other_by_module": {name: nbytes for name, nbytes in self.other_by_module},
            "parameter_bytes": self.parameter_bytes,
            "total_bytes": self.total_bytes,
            "shared_bytes": self.shared_bytes,
            "dtype": self.dtype,
            "kept_bytes": self.kept_bytes,
            "analytic_bytes": self.analytic_bytes,
            "vanilla_bytes": self.vanilla_bytes,
            "kept_mb": self.kept_mb,
            "analytic_mb": self.analytic_mb,
            "vanilla_mb": self.vanilla_mb,
            "other_mb": self.other_mb,
            "total_mb": self.total_mb,
        }


# ---------------------------------------------------------------------------
# Analytic formulas
# ---------------------------------------------------------------------------


def analytic_bytes(
    method: str,
    input_shape: Sequence[int],
    *,
    itemsize: int = 4,
    ranks: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
    patch: int | None = None,
    mode: int = 0,
) -> int:
    """Bytes a layer keeps for its weight gradient, by the method's formula.

    Parameters
    ----------
    method : {"vanilla", "asi", "hosvd", "svd", "gradient_filter"}
        Compression method.
    input_shape : sequence of int
        Shape of the tensor the method compresses (the layer's input).
    itemsize : int, default 4
        Bytes per element of the kept tensors (float32: 4).
    ranks : sequence of int, optional
        Tucker ranks, one per mode of ``input_shape`` (``asi``, ``hosvd``), or
        the single rank of the truncated SVD (``svd``).
    output_shape : sequence of int, optional
        ``gradient_filter`` only: the layer's output shape ``(B, C_out, *spatial)``.
    patch : int, optional
        ``gradient_filter`` only: the patch size R.
    mode : int, default 0
        ``svd`` only: the unfolding mode.

    Returns
    -------
    int
        - vanilla: ``prod(input_shape) * itemsize``;
        - asi / hosvd: ``(prod(ranks) + sum(n_k * r_k)) * itemsize`` (core + factors);
        - svd of the mode-``m`` unfolding ``(n, q)`` at rank ``r``:
          ``(n * r + r + r * q) * itemsize`` (U, S, Vh);
        - gradient_filter: ``B * C_in * prod(ceil(s_out / R)) * itemsize``, the
          input averaged on a grid sized by the output's spatial dims.

    Raises
    ------
    ValueError
        On an unknown method or a missing/inconsistent argument.
    """
    shape = tuple(int(n) for n in input_shape)
    if method == "vanilla":
        return math.prod(shape) * itemsize
    if method in ("asi", "hosvd"):
        if ranks is None or len(ranks) != len(shape):
            raise ValueError(
                f"method={method!r} needs one rank per mode of input_shape {shape}, got {ranks!r}"
            )
        rk = tuple(int(k) for k in ranks)
        return (math.prod(rk) + sum(n * k for n, k in zip(shape, rk))) * itemsize
    if method == "svd":
        if ranks is None or len(ranks) != 1:
            raise ValueError(f"method='svd' needs ranks=(r,), got {ranks!r}")
        r = int(ranks[0])
        n = shape[mode]
        q = math.prod(shape) // n
        return (n * r + r + r * q) * itemsize
    if method == "gradient_filter":
        if patch is None or patch < 1 or output_shape is None:
            raise ValueError(
                "method='gradient_filter' needs patch (a positive int) and output_shape, "
                f"got patch={patch!r}, output_shape={output_shape!r}"
            )
        spatial = tuple(int(n) for n in output_shape[2:])
        return shape[0] * shape[1] * math.prod(-(-s // patch) for s in spatial) * itemsize
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# ---------------------------------------------------------------------------
# Recording what autograd saves
# ---------------------------------------------------------------------------


def _storage(t: torch.Tensor) -> tuple[StorageKey, int] | None:
    """``((device, data_ptr), nbytes)`` of the storage behind ``t``, if it has one."""
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None  # sparse, nested or otherwise storage-less tensors
    return (str(t.device), int(s.data_ptr())), int(s.nbytes())


@dataclass
class _Save:
    key: StorageKey
    nbytes: int
    shape: tuple[int, ...]
    stack: tuple[str, ...]  # module names running at the save, outermost first
    state: bool  # shares storage with a parameter or buffer


@dataclass
class _Call:
    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    stop: set[Any]  # grad_fns of the inputs: where the layer's own graph ends
    output_shape: tuple[int, ...] = ()
    output_node: Any = None
    before: Any = None  # the layer's last_result when the call started
    result: Any = None  # what the call compressed its input to (None: not compressed)


@dataclass
class _Recorder:
    selected: Mapping[str, nn.Module]
    state_keys: set[StorageKey]
    names: dict[int, str]
    stack: list[str] = field(default_factory=list)
    saves: list[_Save] = field(default_factory=list)
    calls: list[_Call] = field(default_factory=list)
    open_calls: list[_Call] = field(default_factory=list)
    # Saved tensors are held until the report is built, so a freed storage's
    # address cannot be reused by a later one and merged with it.
    hold: list[torch.Tensor] = field(default_factory=list)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        found = _storage(t)
        if found is not None:
            key, nbytes = found
            state = key in self.state_keys or self._from_state(t)
            self.saves.append(_Save(key, nbytes, tuple(t.shape), tuple(self.stack), state))
            self.hold.append(t)
        return t

    def _from_state(self, t: torch.Tensor, max_depth: int = 4) -> bool:
        """Whether ``t`` is a copy of a parameter (an autocast cast, ``w.to(dtype)``).

        Follows single-input autograd nodes back to a leaf; the copy has its
        own storage, but it is model state, not an activation.
        """
        node = t.grad_fn
        for _ in range(max_depth):
            if node is None or len(node.next_functions) != 1:
                return False
            node = node.next_functions[0][0]
            leaf = getattr(node, "variable", None)  # an AccumulateGrad node
            if isinstance(leaf, torch.Tensor):
                found = _storage(leaf)
                return found is not None and found[0] in self.state_keys
        return False

    def pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = self.names[id(module)]
        self.stack.append(name)
        if name in self.selected:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if not tensors:
                raise TypeError(f"selected layer {name!r} was called without a tensor input")
            x = tensors[0]
            stop = {a.grad_fn for a in tensors if a.grad_fn is not None}
            before = getattr(module, "last_result", None)
            self.open_calls.append(
                # Under autocast the layer computes (and keeps) in autocast's dtype.
                _Call(
                    name, module, tuple(x.shape), autocast_dtype(x) or x.dtype, stop, before=before
                )
            )

    def post(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        name = self.names[id(module)]
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        if name in self.selected and self.open_calls and self.open_calls[-1].name == name:
            call = self.open_calls.pop()
            if isinstance(out, torch.Tensor):
                call.output_shape = tuple(out.shape)
                call.output_node = out.grad_fn
            after = getattr(module, "last_result", None)
            # A compressed layer replaces last_result on every compressing call;
            # an unchanged one ran the plain layer (eval, frozen weight, vanilla).
            if after is not None and after is not call.before:
                call.result = after
            self.calls.append(call)


def _state_keys(model: nn.Module) -> set[StorageKey]:
    keys = set()
    for t in (*model.parameters(), *model.buffers()):
        found = _storage(t)
        if found is not None and found[1] > 0:
            keys.add(found[0])
    return keys


def _ctx_tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors reachable from a ctx attribute (through containers and dataclasses)."""
    if depth > 4 or isinstance(obj, nn.Module):
        return  # a module reference leads to parameters, which are not activations
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _ctx_tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _ctx_tensors(v, depth + 1)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _ctx_tensors(getattr(obj, name, None), depth + 1)
    elif callable(obj) and getattr(obj, "__closure__", None):
        # A rebuild function stored on ctx can close over tensors too.
        for cell in obj.__closure__:
            with contextlib.suppress(ValueError):  # an empty cell
                yield from _ctx_tensors(cell.cell_contents, depth + 1)


def _unhooked(call: _Call, max_nodes: int = 256) -> list[torch.Tensor]:
    """Tensors held as attributes of the custom-Function nodes the call created.

    Walks the autograd graph from the layer's output back to its inputs'
    grad_fns; ``saved_tensors_hooks`` never sees such tensors.
    """
    found: list[torch.Tensor] = []
    todo = [call.output_node] if call.output_node is not None else []
    seen: set[int] = set()
    while todo and len(seen) < max_nodes:
        node = todo.pop()
        if node is None or id(node) in seen or node in call.stop:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            for value in vars(node).values():
                found.extend(_ctx_tensors(value))
        todo.extend(nxt for nxt, _ in node.next_functions)
    return found


# ---------------------------------------------------------------------------
# activation_memory
# ---------------------------------------------------------------------------


def _select(model: nn.Module, layers: LayerSelection, example: Any) -> dict[str, nn.Module]:
    named = dict(model.named_modules())
    return {n: named[n] for n in select_layers(model, layers, example, subclasses=True)}


def _kind(module: nn.Module) -> str:
    for cls in SUPPORTED_LAYERS:
        if isinstance(module, cls):
            return cls.__name__
    return type(module).__name__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def activation_memory(
    model: nn.Module,
    example_input: torch.Tensor | tuple[Any, ...] | Mapping[str, Any],
    *,
    layers: LayerSelection = None,
) -> MemoryReport:
    """Measure the activation memory one training forward keeps for backward.

    Runs ``model`` once in training mode with gradients enabled and records
    every tensor autograd saves (see the module docstring for the counting
    rules), then compares each selected layer with its analytic formula.

    Parameters
    ----------
    model : nn.Module
        Any model, converted (:func:`tensorcompress.torch.convert`) or not.
        Parameters that do not require grad stay frozen, so the autograd
        graph (and what it saves) is the fine-tuning one.
    example_input : Tensor, tuple or dict
        The batch (a tuple is passed as positional arguments, a dict as
        keyword arguments).
    layers : LastLayers, filter_fn, sequence of names or None
        Layers to report: :func:`~tensorcompress.torch.last_layers` ``(n)``
        (resolved in execution order on ``example_input``), a
        ``filter_fn(module, name) -> bool``, qualified names, or ``None`` for
        every ``Conv1d``, ``Conv2d`` and ``Linear`` (as everywhere, see
        :mod:`tensorcompress.torch.selection`). Plain layers are reported as
        ``method="vanilla"``, as is a compressed layer that did not compress
        (its weight frozen).
        Selected modules that never run are skipped.

    Returns
    -------
    MemoryReport
        Per-layer measured, analytic and vanilla bytes, plus ``other_bytes``,
        ``parameter_bytes`` and totals.

    Raises
    ------
    ValueError, TypeError
        On a selection naming unknown modules or modules that are not
        ``Conv1d``/``Conv2d``/``Linear``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tensorcompress.torch.measure import activation_memory
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    >>> report = activation_memory(net, torch.randn(2, 3, 10, 10), layers=["2"])
    >>> report["2"].measured_bytes == 2 * 8 * 8 * 8 * 4
    True
    """
    args, kwargs = split_example(example_input)
    selected = _select(model, layers, example_input)
    names = {id(m): n for n, m in model.named_modules()}
    rec = _Recorder(selected=selected, state_keys=_state_keys(model), names=names)
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(rec.pre, with_kwargs=True))
        handles.append(m.register_forward_hook(rec.post, with_kwargs=True, always_call=True))
    try:
        with (
            preserved_training_state(model),
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t),
        ):
            out = model(*args, **kwargs)
        # `out` keeps the graph (and every saved tensor) alive while we look.
        report = _build_report(rec)
        del out
    finally:
        for h in handles:
            h.remove()
        rec.hold.clear()
    return report


def _build_report(rec: _Recorder) -> MemoryReport:
    state_sizes: dict[StorageKey, int] = {}
    act_sizes: dict[StorageKey, int] = {}
    for s in rec.saves:
        (state_sizes if s.state else act_sizes)[s.key] = s.nbytes

    per_layer_keys: dict[str, dict[StorageKey, int]] = {}
    per_layer_shapes: dict[str, list[tuple[int, ...]]] = {}
    for s in rec.saves:
        if s.state:
            continue
        for name in s.stack:
            if name in rec.selected:
                per_layer_keys.setdefault(name, {})[s.key] = s.nbytes
                per_layer_shapes.setdefault(name, []).append(s.shape)

    calls_by_layer: dict[str, list[_Call]] = {}
    for call in rec.calls:
        calls_by_layer.setdefault(call.name, []).append(call)

    unhooked_by_layer: dict[str, int] = {}
    for name, calls in calls_by_layer.items():
        keys = per_layer_keys.setdefault(name, {})
        extra = 0
        for call in calls:
            for t in _unhooked(call):
                found = _storage(t)
                if found is None or found[0] in rec.state_keys or found[0] in keys:
                    continue
                keys[found[0]] = found[1]
                act_sizes[found[0]] = found[1]
                extra += found[1]
        unhooked_by_layer[name] = extra

    layer_reports = []
    for name in sorted(calls_by_layer, key=lambda n: rec.calls.index(calls_by_layer[n][0])):
        calls = calls_by_layer[name]
        first = calls[0]
        itemsize = first.dtype.itemsize
        method, ranks, analytic = _describe(first.module, calls, itemsize)
        layer_reports.append(
            LayerMemory(
                name=name,
                kind=_kind(first.module),
                method=method,
                input_shape=first.input_shape,
                output_shape=first.output_shape,
                dtype=_dtype_name(first.dtype),
                measured_bytes=sum(per_layer_keys.get(name, {}).values()),
                analytic_bytes=analytic,
                vanilla_bytes=sum(math.prod(c.input_shape) * itemsize for c in calls),
                ranks=ranks,
                saved_shapes=tuple(per_layer_shapes.get(name, [])),
                unhooked_bytes=unhooked_by_layer.get(name, 0),
                calls=len(calls),
            )
        )

    layer_keys: set[StorageKey] = set()
    for keys in per_layer_keys.values():
        layer_keys.update(keys)
    union_bytes = sum(act_sizes[k] for k in layer_keys)
    other: dict[str, int] = {}
    counted: set[StorageKey] = set(layer_keys)
    for s in rec.saves:
        if s.state or s.key in counted:
            continue
        counted.add(s.key)
        owner = s.stack[-1] if s.stack else ""
        other[owner] = other.get(owner, 0) + s.nbytes
    other_bytes = sum(other.values())
    kept = sum(r.measured_bytes for r in layer_reports)
    return MemoryReport(
        layers=tuple(layer_reports),
        other_bytes=other_bytes,
        other_by_module=tuple(other.items()),
        parameter_bytes=sum(state_sizes.values()),
        total_bytes=union_bytes + other_bytes,
        shared_bytes=kept - union_bytes,
        dtype=_dtype_name(rec.calls[0].dtype) if rec.calls else "",
    )


def _describe(
    module: nn.Module, calls: Sequence[_Call], itemsize: int
) -> tuple[str, tuple[int, ...] | None, int]:
    """Method, kept ranks (last call) and analytic bytes (summed over calls) of a layer.

    A call that did not compress (the plain layer ran: eval mode, frozen
    weight, ``method="vanilla"``) is vanilla for the formula; the layer's
    method is reported as ``"vanilla"`` when none of its calls compressed.
    """
    total = 0
    ranks: tuple[int, ...] | None = None
    method = "vanilla"
    for call in calls:
        res = call.result
        if res is None:
            total += analytic_bytes("vanilla", call.input_shape, itemsize=itemsize)
            continue
        method = module.compression.method if isinstance(module, CompressedModule) else "?"
        total += _result_analytic(method, res, call, itemsize)
        ranks = res.ranks
    return method, ranks, total


def _result_analytic(method: str, res: Any, call: _Call, itemsize: int) -> int:
    """The method's formula for what one call kept, from the shapes it decomposed."""
    if isinstance(res, TuckerResult):
        shape = res.shape  # the input's (a 1-D Linear input is decomposed as (1, C))
        return analytic_bytes(method, shape, itemsize=itemsize, ranks=res.ranks)
    if isinstance(res, SVDResult):
        return analytic_bytes("svd", res.shape, itemsize=itemsize, ranks=res.ranks, mode=res.mode)
    if isinstance(res, PatchAverage):
        return analytic_bytes(
            "gradient_filter",
            call.input_shape,
            itemsize=itemsize,
            output_shape=call.output_shape,
            patch=res.patch,
        )
    raise TypeError(f"layer {call.name!r} kept an unknown {type(res).__name__}")
