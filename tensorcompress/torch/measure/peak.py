"""Peak live memory: the most bytes allocated at once while some code runs.

Saved-tensor accounting (:mod:`tensorcompress.torch.measure.saved`) says what
autograd keeps for backward; this module says how high allocation climbs on
the way, transients included (unfoldings, Gram matrices, convolution
workspaces, gradients, optimizer state).

- :func:`track_memory` is the primitive. It runs any zero-argument callable
  and reports the highest net allocation reached and what stays allocated
  when it returns, both net of what was allocated before it started: on CPU
  from the profiler's allocation events, on CUDA from the caching allocator's
  statistics. The callable can be a layer's forward or a whole training step
  (forward, backward, optimizer step).
- :func:`peak_forward_memory` uses it for one training forward of a single
  layer, after warm-up steps, and relates the peak to the input's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["PeakMemory", "TrackedMemory", "peak_forward_memory", "track_memory"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class TrackedMemory:
    """Memory allocated while a callable ran (:func:`track_memory`).

    Both figures are net of what was allocated before the callable started.

    Attributes
    ----------
    peak_bytes : int
        Highest net allocation reached while it ran.
    retained_bytes : int
        Net allocation once it returned (its result and any state it created).
    device : str
        The device tracked, e.g. ``"cpu"`` or ``"cuda:0"``.
    """

    peak_bytes: int
    retained_bytes: int
    device: str

    @property
    def transient_bytes(self) -> int:
        """``peak_bytes - retained_bytes``: memory needed only while running."""
        return self.peak_bytes - self.retained_bytes

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``transient_bytes`` included)."""
        return {
            "peak_bytes": self.peak_bytes,
            "retained_bytes": self.retained_bytes,
            "device": self.device,
            "transient_bytes": self.transient_bytes,
        }


def track_memory(fn: Callable[[], _T], device: torch.device | str) -> tuple[_T, TrackedMemory]:
    """Run ``fn()`` and track the memory it allocates on ``device``.

    The allocation-tracking primitive of this module: :func:`peak_forward_memory`
    passes a layer's forward; pass a whole training step to get the step's
    peak over forward and backward (and the optimizer step, if it is in ``fn``).

    Parameters
    ----------
    fn : callable
        Called once with no arguments. Its result is returned, so whatever it
        keeps alive (an output and its autograd graph) is still allocated when
        ``retained_bytes`` is read.
    device : torch.device or str
        ``"cpu"`` or a CUDA device: the one whose allocations are tracked
        (allocations on other devices are not counted).

    Returns
    -------
    result : object
        What ``fn()`` returned.
    memory : TrackedMemory
        Peak and retained bytes, net of what was allocated before ``fn`` ran.

    Raises
    ------
    ValueError
        On a device that is neither CPU nor CUDA.

    Notes
    -----
    On CPU the peak is rebuilt from the profiler's allocation events
    (``torch.profiler.profile(profile_memory=True)``), which see every
    allocation of the CPU allocator, including oneDNN workspaces. The profiler
    does not report frees of blocks allocated before it started (a previous
    step's state released during this one, gradients set to ``None`` by
    ``zero_grad``), so on CPU ``retained_bytes`` and ``peak_bytes`` are upper
    bounds; run a warm-up step first so ``fn`` measures a steady state.

    On CUDA the device is synchronised and its peak statistics reset
    (:func:`torch.cuda.reset_peak_memory_stats`) before ``fn``, then the peak is
    ``torch.cuda.max_memory_allocated`` over ``fn``: tensors, not the caching
    allocator's reserved blocks. Calls do not nest (nor does the CPU profiler).

    Examples
    --------
    A whole training step:

    >>> import torch
    >>> from torch import nn
    >>> from tensorcompress.torch.measure import track_memory
    >>> model = nn.Linear(64, 10)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    >>> def step() -> float:
    ...     opt.zero_grad()
    ...     loss = nn.functional.cross_entropy(model(x), y)
    ...     loss.backward()
    ...     opt.step()
    ...     return loss.item()
    >>> _ = step()  # warm-up: gradients and momentum buffers exist from here on
    >>> loss, mem = track_memory(step, "cpu")
    >>> mem.peak_bytes >= mem.retained_bytes >= 0
    True
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return _cuda_track(fn, dev)
    if dev.type == "cpu":
        return _cpu_track(fn)
    raise ValueError(f"device must be a CPU or CUDA device, got {str(dev)!r}")


def _cpu_track(fn: Callable[[], _T]) -> tuple[_T, TrackedMemory]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    # Raw allocation events (signed sizes) in time order; the FunctionEvent view
    # folds them into ops and loses the order that a running peak needs.
    events = sorted(
        (e.start_ns(), int(e.nbytes()))
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return out, TrackedMemory(peak_bytes=peak, retained_bytes=current, device="cpu")


def _cuda_track(fn: Callable[[], _T], dev: torch.device) -> tuple[_T, TrackedMemory]:
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    retained = torch.cuda.memory_allocated(dev) - base
    return out, TrackedMemory(peak_bytes=peak, retained_bytes=retained, device=str(dev))


@dataclass(frozen=True)
class PeakMemory:
    """Memory allocated during one training forward of a single layer.

    All figures are net of what was allocated before the forward started.

    Attributes
    ----------
    peak_bytes : int
        Highest net allocation reached during the forward: output, kept
        tensors and every transient (unfoldings, Gram matrices, workspaces).
    retained_bytes : int
        Net allocation once the forward returned: the output plus what the
        layer keeps for backward (and any state it updated).
    input_bytes : int
        Bytes of the input activation.
    output_bytes : int
        Bytes of the output.
    device : str
        Where it was measured (``"cpu"`` uses the profiler's allocation
        events, CUDA the caching allocator's peak statistics; see
        :func:`track_memory`).
    """

    peak_bytes: int
    retained_bytes: int
    input_bytes: int
    output_bytes: int
    device: str

    @property
    def factor(self) -> float:
        """``peak_bytes / input_bytes``: the transient cost in units of the activation."""
        return self.peak_bytes / self.input_bytes

    @property
    def transient_bytes(self) -> int:
        """``peak_bytes - retained_bytes``: memory needed only while computing."""
        return self.peak_bytes - self.retained_bytes

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``factor`` included)."""
        return {
            "peak_bytes": self.peak_bytes,
            "retained_bytes": self.retained_bytes,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "device": self.device,
            "factor": self.factor,
        }


def _warm_up(layer: nn.Module, x: torch.Tensor, steps: int) -> None:
    # A function of its own, so the warm-up graphs are freed when it returns.
    params = [p for p in layer.parameters() if p.requires_grad]
    for _ in range(steps):
        out = layer(x)
        if params and out.requires_grad:
            torch.autograd.grad(out.sum(), params)


def peak_forward_memory(layer: nn.Module, x: torch.Tensor, *, warmup: int = 2) -> PeakMemory:
    """Peak memory of one training forward of ``layer`` on ``x``.

    Parameters
    ----------
    layer : nn.Module
        A single layer (compressed or not); put in training mode.
    x : Tensor
        Its input (CPU or CUDA).
    warmup : int, default 2
        Full training steps (forward + backward, gradients discarded) run
        first, so the measured forward is a steady-state one: for ASI a warm
        subspace-iteration step, not the cold-start HOSVD, nor the first warm
        step, which on a large input times the candidate sweep plans
        (:func:`~tensorcompress.measured_plans`) and holds the fastest one's
        result while the others run.

    Returns
    -------
    PeakMemory
        ``factor = peak_bytes / input_bytes``. A vanilla conv with as many
        output as input elements already reaches about 1 (its output) plus
        the convolution's workspace.

    Raises
    ------
    ValueError
        On a bad ``warmup``, or an input neither on CPU nor on CUDA.

    Notes
    -----
    The forward is tracked by :func:`track_memory` on ``x.device`` (see there
    for how, and why CPU figures are upper bounds).

    Where the transient comes from: the conv's own workspace for a vanilla
    layer; for the Tucker methods, about one unfolding-sized copy after the
    conv has freed its workspace (on CUDA, the batched Gram product of a
    spatial mode, ``tenalg.cross_gram``); for the channel-unfolding SVD,
    ``torch.linalg.svd`` of the whole unfolding, several times the input.
    The figures depend on the machine and the torch build: measure them with
    this function rather than quoting them.
    """
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    layer.train()
    with torch.enable_grad():
        _warm_up(layer, x, warmup)
        result, memory = track_memory(lambda: layer(x), x.device)
    return PeakMemory(
        peak_bytes=memory.peak_bytes,
        retained_bytes=memory.retained_bytes,
        input_bytes=x.nelement() * x.element_size(),
        output_bytes=result.nelement() * result.element_size(),
        device=str(x.device),
    )
