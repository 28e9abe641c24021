"""Whole-step memory of training: weights, gradients, optimizer state, activations, peak.

:func:`training_memory` measures one training step of a model as it is
(vanilla, converted, checkpointed, LoRA...) and reports, in bytes:

- ``weights_bytes``, ``buffers_bytes``: the model's parameters and buffers;
- ``gradients_bytes``: the parameter gradients one backward creates;
- ``optimizer_bytes``: the optimizer's state after a real step (momentum,
  Adam's moments and step counters);
- ``activations_bytes``: the tensors autograd saved for backward during the
  model's forward (:func:`~tensorcompress.torch.measure.activation_memory`'s
  ``total_bytes``; a loss computed outside the model by ``loss_fn`` is not
  part of it, but is part of the peak), split by kind of the module that
  saved them;
- ``peak_activation_bytes``: the highest memory, over forward and backward,
  held by tensors other than the parameters, buffers, gradients and
  optimizer state (saved tensors, outputs, gradients of activations,
  recomputation, workspaces), measured by
  :func:`~tensorcompress.torch.measure.track_memory`;
- ``peak_bytes``: ``weights + buffers + gradients + optimizer + peak_activation``;
- ``live_at_peak``: what is allocated at that peak, grouped by who allocated it.

How the step is measured (the caller's model and optimizer end as they began):

1. the trainable parameters, their gradients, the buffers, the optimizer
   state and the random number generators are saved;
2. one real step runs (forward, backward, ``optimizer.step()``): the
   gradients and the optimizer state now exist, and are measured as tensors
   (storages, deduplicated);
3. the gradients are zeroed in place (not set to ``None``) and one forward
   and backward run under :func:`~tensorcompress.torch.measure.track_memory`,
   with saved-tensor accounting during the forward; gradients accumulate in
   place, so everything the tracker sees allocated is activation memory.
   With gradients set to ``None`` instead, a real step allocates them during
   backward: its peak is at most ``peak_bytes``;
4. the same forward and backward run once more under the profiler with
   allocation addresses, which names what is live at the peak (``attribute=False``
   skips it);
5. everything saved in 1 is put back. Compressed layers' warm-start state
   does advance, as on any training step.

Notes
-----
Memory that existed before the step is not counted in
``peak_activation_bytes``: the batch, and a compressed layer's warm start
from the previous step, which the forward replaces by the new factors. On
CPU the profiler does not report the release of blocks allocated before it
started (see :func:`~tensorcompress.torch.measure.track_memory`), so the old
factors count as released from the start; that is exact once the forward has
passed every compressed layer, which is where a training step's peak lies
(in backward) in every case measured here.
The optimizer step's own transients are not part of the peak (forward and
backward only).

The split of ``activations_bytes`` (``activations_by_kind``) attributes each
saved storage to the innermost module running when it was saved
(:func:`module_kind`): ``"compressed"``
(factors kept by a compressed layer), ``"layer_input"`` (a plain
Conv/Linear's input), ``"attention"``, ``"norm"``, ``"activation"``
(activation-function modules) and ``"other"`` (the loss, products written in
a module's own ``forward``). A storage saved by several modules goes to the
first of that order.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorcompress.torch.measure.peak import track_memory
from tensorcompress.torch.measure.saved import (
    MB,
    MemoryReport,
    StorageKey,
    _build_report,
    _Recorder,
    _select,
    _state_keys,
    _storage,
)
from tensorcompress.torch.modules import CompressedModule
from tensorcompress.torch.selection import LayerSelection, call_model
from tensorcompress.torch.state import preserved_training_state

__all__ = ["KINDS", "LiveGroup", "TrainingMemory", "module_kind", "training_memory"]

KINDS = ("compressed", "layer_input", "attention", "norm", "activation", "other")
"""Kinds of saved tensors, in the order that settles a storage saved by several modules."""


@dataclass(frozen=True)
class LiveGroup:
    """Allocations live at the peak, grouped by who allocated them.

    Attributes
    ----------
    phase : str
        ``"saved"`` (a tensor autograd saved in the forward and still holds),
        ``"forward"`` (allocated in the forward and still referenced: outputs,
        inputs kept by checkpointing, a compressed layer's new state) or
        ``"backward"`` (gradients of activations, recomputation, workspaces).
    kind : str
        For saved tensors the kind of the module that saved them (:data:`KINDS`);
        otherwise the operator that allocated them (``"aten::mm"``).
    where : str
        The module (qualified name) running at the allocation, or in backward
        the autograd node (``"GeluBackward0"``) when no module runs.
    nbytes : int
        Bytes of the group's allocations.
    count : int
        Number of allocations.
    """

    phase: str
    kind: str
    where: str
    nbytes: int
    count: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return {
            "phase": self.phase,
            "kind": self.kind,
            "where": self.where,
            "nbytes": self.nbytes,
            "count": self.count,
        }


@dataclass(frozen=True)
class TrainingMemory:
    """Memory of one training step (see :mod:`tensorcompress.torch.measure.training`).

    Attributes
    ----------
    weights_bytes : int
        Distinct parameter storages of the model (trainable or not).
    buffers_bytes : int
        Distinct buffer storages (BatchNorm statistics...).
    gradients_bytes : int
        Distinct storages of the parameter gradients after a step.
    optimizer_bytes : int
        Distinct storages of the optimizer's state tensors after a step.
    activations_bytes : int
        Storages autograd saved for backward, at the end of the forward
        (``saved.total_bytes``).
    activations_by_kind : tuple of (str, int)
        ``activations_bytes`` split by :data:`KINDS` (every kind listed; they
        sum to ``activations_bytes``).
    peak_activation_bytes : int
        Highest memory over forward and backward held by anything but the
        weights, buffers, gradients and optimizer state: measured by
        :func:`~tensorcompress.torch.measure.track_memory`.
    live_at_peak : tuple of LiveGroup
        What is allocated at the peak, largest group first (empty with
        ``attribute=False``).
    attributed_peak_bytes : int
        The peak of the attribution pass, whose allocations ``live_at_peak``
        lists (0 with ``attribute=False``); a second run of the same step, so
        it equals ``peak_activation_bytes`` up to run-to-run differences.
    saved : MemoryReport
        The saved-tensor report of the measured forward (per layer, analytic
        formulas; ``saved.kept_bytes`` is the paper's Mem for its layers).
    optimizer : str
        The optimizer's class name.
    device : str
        Where it was measured.
    """

    weights_bytes: int
    buffers_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    activations_by_kind: tuple[tuple[str, int], ...]
    peak_activation_bytes: int
    live_at_peak: tuple[LiveGroup, ...] = ()
    attributed_peak_bytes: int = 0
    saved: MemoryReport = field(default_factory=lambda: MemoryReport(layers=(), other_bytes=0))
    optimizer: str = ""
    device: str = "cpu"

    @property
    def state_bytes(self) -> int:
        """``weights + buffers + gradients + optimizer``: held for the whole step."""
        return self.weights_bytes + self.buffers_bytes + self.gradients_bytes + self.optimizer_bytes

    @property
    def peak_bytes(self) -> int:
        """``state_bytes + peak_activation_bytes``: the step's highest live memory."""
        return self.state_bytes + self.peak_activation_bytes

    @property
    def kept_bytes(self) -> int:
        """The paper's convention: inputs kept by the reported layers (``saved.kept_bytes``)."""
        return self.saved.kept_bytes

    def kind_bytes(self, kind: str) -> int:
        """Saved bytes of one kind (see :data:`KINDS`)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return dict(self.activations_by_kind)[kind]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict, MB figures included."""
        out: dict[str, Any] = {
            "weights_bytes": self.weights_bytes,
            "buffers_bytes": self.buffers_bytes,
            "gradients_bytes": self.gradients_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "activations_bytes": self.activations_bytes,
            "activations_by_kind": dict(self.activations_by_kind),
            "peak_activation_bytes": self.peak_activation_bytes,
            "peak_bytes": self.peak_bytes,
            "kept_bytes": self.kept_bytes,
            "attributed_peak_bytes": self.attributed_peak_bytes,
            "live_at_peak": [g.to_dict() for g in self.live_at_peak],
            "optimizer": self.optimizer,
            "device": self.device,
        }
        for key in list(out):
            if key.endswith("_bytes"):
                out[key.removesuffix("_bytes") + "_mb"] = out[key] / MB
        return out

    def format(self, top: int = 8) -> str:
        """A short text report: the figures in MB and the largest groups live at the peak."""
        lines = [
            f"weights {self.weights_bytes / MB:.2f} MB, gradients {self.gradients_bytes / MB:.2f} "
            f"MB, optimizer ({self.optimizer}) {self.optimizer_bytes / MB:.2f} MB",
            f"saved after the forward {self.activations_bytes / MB:.2f} MB: "
            + ", ".join(f"{k} {b / MB:.2f}" for k, b in self.activations_by_kind if b),
            f"peak activation memory {self.peak_activation_bytes / MB:.2f} MB, "
            f"peak {self.peak_bytes / MB:.2f} MB",
        ]
        if self.live_at_peak:
            lines.append("live at the peak:")
            for g in self.live_at_peak[:top]:
                lines.append(
                    f"  {g.nbytes / MB:8.2f} MB  {g.phase:8s} {g.kind:24s} {g.where} (x{g.count})"
                )
            rest = sum(g.nbytes for g in self.live_at_peak[top:])
            if rest:
                lines.append(f"  {rest / MB:8.2f} MB  (the rest)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def module_kind(module: nn.Module) -> str:
    """What kind of tensor a module's own saves are (the split of the memory reports).

    Returns
    -------
    str
        ``"compressed"`` (a compressed layer, a WASI layer), ``"layer_input"``
        (a plain Conv/Linear, a WSI or low-rank layer), ``"norm"`` (a class
        name containing ``Norm``),
        ``"activation"`` (``torch.nn`` activation modules and Hugging Face's
        ``...Activation`` classes), ``"attention"`` (a class name containing
        ``Attention``), else ``"other"``.
    """
    from tensorcompress.torch.lowrank import LowRankModule  # lowrank imports convert

    if isinstance(module, CompressedModule):
        return "compressed"
    if isinstance(module, LowRankModule):
        # A WASI layer keeps its input's decomposition; WSI and inference layers the input.
        config = getattr(module, "config", None)
        return "compressed" if getattr(config, "method", None) == "wasi" else "layer_input"
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "layer_input"
    name = type(module).__name__
    if isinstance(module, nn.MultiheadAttention) or "Attention" in name:
        return "attention"
    if "Norm" in name:
        return "norm"
    if name.endswith("Activation") or type(module).__module__ in (
        "torch.nn.modules.activation",
        "transformers.activations",
    ):
        return "activation"
    return "other"


def _storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    sizes: dict[StorageKey, int] = {}
    for t in tensors:
        found = _storage(t)
        if found is not None:
            sizes[found[0]] = found[1]
    return sum(sizes.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


def _default_loss(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if not isinstance(out, torch.Tensor):
        out = getattr(out, "logits", None) if hasattr(out, "logits") else out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            "cannot find a loss in the model's output; pass loss_fn=lambda out: ... "
            f"(got {type(out).__name__})"
        )
    return out.float().square().mean()


def _default_layers(module: nn.Module, name: str) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.requires_grad


def _device(model: nn.Module, example: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    if isinstance(example, torch.Tensor):
        return example.device
    return torch.device("cpu")


@contextmanager
def _step_undone(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Parameters, gradients, optimizer state and RNGs as they were, after the block."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    values = [(p, p.detach().clone()) for p in params]
    grads = [(p, p.grad) for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    devices = [p.device for p in params if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices), preserved_training_state(model):
        try:
            for p in model.parameters():
                p.grad = None
            yield
        finally:
            with torch.no_grad():
                for p, value in values:
                    p.copy_(value)
            for p, grad in grads:
                p.grad = grad
            optimizer.load_state_dict(state)


def _kind_of(stack: tuple[str, ...], modules: Mapping[str, nn.Module]) -> str:
    return module_kind(modules[stack[-1]]) if stack else "other"


def _split_by_kind(
    rec: _Recorder, report: MemoryReport, modules: Mapping[str, nn.Module]
) -> tuple[tuple[str, int], ...]:
    rank = {k: i for i, k in enumerate(KINDS)}
    best: dict[StorageKey, tuple[str, int]] = {}
    for s in rec.saves:
        if s.state:
            continue
        kind = _kind_of(s.stack, modules)
        if s.key not in best or rank[kind] < rank[best[s.key][0]]:
            best[s.key] = (kind, s.nbytes)
    totals = dict.fromkeys(KINDS, 0)
    for kind, nbytes in best.values():
        totals[kind] += nbytes
    for layer in report.layers:  # tensors kept on custom-Function nodes
        totals["compressed" if layer.method != "vanilla" else "layer_input"] += layer.unhooked_bytes
    return tuple(totals.items())


# ---------------------------------------------------------------------------
# Attribution: what is live at the peak
# ---------------------------------------------------------------------------

_SCOPE = "## "  # prefix of the module scopes recorded for the attribution pass
_BACKWARD = "tensorcompress::backward"
_ENGINE = "autograd::engine::evaluate_function: "


@dataclass
class _Alloc:
    time: int
    ptr: int
    nbytes: int
    scopes: tuple[str, ...]


def _allocations(prof: Any, device: torch.device) -> tuple[list[_Alloc], int]:
    """Allocation events on ``device`` in time order, and the backward's start time."""
    from torch._C._profiler import _EventType

    out: list[_Alloc] = []
    backward_start = math.inf
    todo: list[tuple[Any, tuple[str, ...]]] = [
        (e, ()) for e in prof.profiler.kineto_results.experimental_event_tree()
    ]
    while todo:
        event, scopes = todo.pop()
        if event.tag == _EventType.Allocation:
            f = event.extra_fields
            dev = f.device
            if dev.type == device.type and (device.index is None or dev.index == device.index):
                out.append(_Alloc(event.start_time_ns, int(f.ptr), int(f.alloc_size), scopes))
            continue
        if event.name == _BACKWARD:
            backward_start = min(backward_start, event.start_time_ns)
        inner = (*scopes, event.name)
        todo.extend((child, inner) for child in event.children)
    out.sort(key=lambda a: a.time)
    return out, int(backward_start) if backward_start != math.inf else 2**63


def _group(
    live: Mapping[int, _Alloc],
    saved: Mapping[int, tuple[str, str]],
    forward_end: Mapping[int, _Alloc],
    backward_start: int,
) -> tuple[LiveGroup, ...]:
    groups: dict[tuple[str, str, str], list[int]] = {}
    for ptr, a in live.items():
        module = next((s[len(_SCOPE) :] for s in reversed(a.scopes) if s.startswith(_SCOPE)), None)
        op = next((s for s in reversed(a.scopes) if s.startswith("aten::")), "")
        # Saved tensors are known by address at the forward's end: an earlier allocation
        # at an address reused since is not one of them.
        if ptr in saved and forward_end.get(ptr) is a:
            phase, (kind, where) = "saved", saved[ptr]
        elif a.time < backward_start:
            phase, kind, where = "forward", op or "?", module if module is not None else "?"
        else:
            engine = (s[len(_ENGINE) :] for s in reversed(a.scopes) if s.startswith(_ENGINE))
            node = next(engine, "")
            phase, kind = "backward", op or "?"
            where = f"{module} (recomputed)" if module is not None else node or "?"
        entry = groups.setdefault((phase, kind, where), [0, 0])
        entry[0] += a.nbytes
        entry[1] += 1
    return tuple(
        sorted(
            (LiveGroup(p, k, w, n, c) for (p, k, w), (n, c) in groups.items()),
            key=lambda g: -g.nbytes,
        )
    )


def _attribute(
    model: nn.Module,
    run: Callable[[Callable[[Any], Any] | None], Any],
    device: torch.device,
) -> tuple[tuple[LiveGroup, ...], int]:
    """Run the step under the profiler and group the allocations live at its peak."""
    from torch.profiler import ProfilerActivity, profile, record_function

    names = {id(m): n for n, m in model.named_modules()}
    open_scopes: list[Any] = []

    def enter(module: nn.Module, args: Any) -> None:
        scope = record_function(_SCOPE + (names.get(id(module)) or "<root>"))
        scope.__enter__()
        open_scopes.append(scope)

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        if open_scopes:
            open_scopes.pop().__exit__(None, None, None)

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave, always_call=True))
    saved_at_end: dict[int, tuple[str, str]] = {}
    modules = dict(model.named_modules())

    def on_forward_end(rec: _Recorder) -> None:
        rank = {k: i for i, k in enumerate(KINDS)}
        for s in rec.saves:
            if s.state:
                continue
            kind = _kind_of(s.stack, modules)
            where = s.stack[-1] if s.stack else "<root>"
            ptr = s.key[1]
            if ptr not in saved_at_end or rank[kind] < rank[saved_at_end[ptr][0]]:
                saved_at_end[ptr] = (kind, where or "<root>")

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    try:
        with profile(activities=activities, profile_memory=True) as prof:
            run(on_forward_end)
    finally:
        for h in handles:
            h.remove()
        while open_scopes:
            open_scopes.pop().__exit__(None, None, None)
    allocs, backward_start = _allocations(prof, device)
    live: dict[int, _Alloc] = {}
    current = peak = 0
    at_peak: dict[int, _Alloc] = {}
    forward_end: dict[int, _Alloc] | None = None
    for a in allocs:
        if forward_end is None and a.time >= backward_start:
            forward_end = dict(live)
        if a.nbytes > 0:
            live[a.ptr] = a
        else:
            live.pop(a.ptr, None)
        current += a.nbytes
        if current > peak:
            peak, at_peak = current, dict(live)
    ends = forward_end if forward_end is not None else live
    return _group(at_peak, saved_at_end, ends, backward_start), peak


# ---------------------------------------------------------------------------
# training_memory
# ---------------------------------------------------------------------------


def training_memory(
    model: nn.Module,
    example: Any,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    layers: LayerSelection | Callable[[nn.Module, str], bool] = _default_layers,
    attribute: bool = True,
) -> TrainingMemory:
    """Measure the memory of one training step of ``model`` on ``example``.

    Parameters
    ----------
    model : nn.Module
        The model as it will train: converted, checkpointed, wrapped by PEFT...
        Parameters that do not require grad stay frozen.
    example : tensor, tuple or dict
        One batch (a tuple is passed as positional arguments, a dict as
        keyword arguments, e.g. ``{"pixel_values": x, "labels": y}``).
    optimizer : torch.optim.Optimizer
        The optimizer over the model's trainable parameters. One real step is
        taken and undone (see the module docstring).
    loss_fn : callable, optional
        ``loss_fn(output) -> scalar tensor``. By default the output's ``loss``
        (a Hugging Face model given labels), else the mean square of the
        output (or of its ``logits``): a stand-in whose gradient has the
        output's shape, as a real loss's has.
    layers : LastLayers, LastBlocks, callable, sequence of str or None
        The layers of the saved-tensor report ``saved`` (whose ``kept_bytes``
        is the paper's convention); by default every Conv/Linear whose weight
        trains.
    attribute : bool, default True
        Also run the attribution pass that fills ``live_at_peak``.

    Returns
    -------
    TrainingMemory

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tensorcompress.torch.measure import training_memory
    >>> model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> mem = training_memory(model, torch.randn(32, 64), opt)
    >>> n = sum(p.numel() for p in model.parameters())
    >>> mem.weights_bytes == mem.gradients_bytes == mem.optimizer_bytes == 4 * n
    True
    >>> mem.kind_bytes("activation") == 32 * 256 * 4  # the GELU's input
    True
    >>> mem.peak_activation_bytes >= mem.activations_bytes
    True
    """
    loss_of = _default_loss if loss_fn is None else loss_fn
    device = _device(model, example)
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}

    with _step_undone(model, optimizer):
        # 1. One real step: gradients and optimizer state exist from here on.
        optimizer.zero_grad(set_to_none=True)
        loss_of(call_model(model, example)).backward()
        optimizer.step()
        params = list(model.parameters())
        weights = _storage_bytes(iter(params))
        buffers = _storage_bytes(model.buffers())
        grads = _storage_bytes(p.grad for p in params if p.grad is not None)
        opt_bytes = _storage_bytes(_optimizer_tensors(optimizer))
        selected = _select(model, layers, example)
        state_keys = _state_keys(model)

        def run(on_forward_end: Callable[[_Recorder], Any] | None) -> Any:
            """Forward with saved-tensor accounting, then backward; gradients accumulate."""
            optimizer.zero_grad(set_to_none=False)
            for p in params:
                if p.grad is not None:
                    p.grad.zero_()
            rec = _Recorder(selected=selected, state_keys=state_keys, names=names)
            handles = []
            for m in model.modules():
                handles.append(m.register_forward_pre_hook(rec.pre, with_kwargs=True))
                handles.append(
                    m.register_forward_hook(rec.post, with_kwargs=True, always_call=True)
                )
            try:
                with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
                    out = call_model(model, example)
            finally:
                for h in handles:
                    h.remove()
            loss = loss_of(out)
            del out
            result = on_forward_end(rec) if on_forward_end is not None else None
            rec.hold.clear()
            from torch.profiler import record_function

            with record_function(_BACKWARD):
                loss.backward()
            return result

        def measured(rec: _Recorder) -> tuple[MemoryReport, tuple[tuple[str, int], ...]]:
            report = _build_report(rec)
            return report, _split_by_kind(rec, report, modules)

        (report, by_kind), tracked = track_memory(lambda: run(measured), device)
        live: tuple[LiveGroup, ...] = ()
        attributed = 0
        if attribute:
            live, attributed = _attribute(model, run, device)

    return TrainingMemory(
        weights_bytes=weights,
        buffers_bytes=buffers,
        gradients_bytes=grads,
        optimizer_bytes=opt_bytes,
        activations_bytes=report.total_bytes,
        activations_by_kind=by_kind,
        peak_activation_bytes=tracked.peak_bytes,
        live_at_peak=live,
        attributed_peak_bytes=attributed,
        saved=report,
        optimizer=type(optimizer).__name__,
        device=str(device),
    )
