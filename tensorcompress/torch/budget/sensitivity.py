"""Sensitivity measurement: what each candidate threshold costs a layer, and how much it hurts.

:func:`measure_sensitivity` measures, per selected layer and per candidate
threshold ``eps``, the Tucker ranks HOSVD picks at ``eps``, the bytes they
keep (core + factors, :func:`tensorcompress.torch.measure.analytic_bytes`)
and the relative error of the layer's weight gradient computed from the
compressed input against the exact one (the paper's "perplexity"), averaged
over a few batches. The result, a
:class:`~tensorcompress.torch.budget.knapsack.Sensitivity`, is the instance
:func:`~tensorcompress.torch.budget.knapsack.allocate` solves.

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

Cost against one plain training step (forward + backward of the whole model),
for the last 4 convs of ResNet-18, batch 16 at 224x224, 2 batches and the 6
default candidates, as medians of interleaved repeats in the same run::

    python benchmarks/test_budget_cost.py --threads 1

The ratio depends on the machine: compare ``--threads 1`` with the default,
since LAPACK's multi-threaded ``eigh`` (the same one every HOSVD step and ASI
cold start runs) slows down badly on an oversubscribed machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tensorcompress import rank as _rank
from tensorcompress import tenalg
from tensorcompress.results import TuckerResult
from tensorcompress.torch.budget._checks import check_candidates
from tensorcompress.torch.budget.knapsack import Choice, LayerSensitivity, Sensitivity
from tensorcompress.torch.functions import ConvSpec, conv_weight_grad, linear_weight_grad
from tensorcompress.torch.measure import analytic_bytes
from tensorcompress.torch.modules import CompressedModule
from tensorcompress.torch.selection import (
    SUPPORTED_LAYERS,
    LayerSelection,
    call_model,
    select_layers,
)
from tensorcompress.torch.state import preserved_training_state

__all__ = ["DEFAULT_CANDIDATES", "measure_sensitivity"]

DEFAULT_CANDIDATES: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The paper's candidate explained-variance thresholds."""

LossFn = Callable[[Any, Any], torch.Tensor]
"""``loss_fn(model(inputs), targets) -> scalar tensor``."""


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


def _peek(batches: Iterable[Any]) -> tuple[Any, Iterator[Any]]:
    """The first batch (to select layers on) and an iterator over all of them."""
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("batches is empty; give at least one (inputs, targets) pair") from None
    return first, itertools.chain([first], it)


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
        forward (``model(inputs)``; a tuple of inputs is the positional
        arguments and a dict the keyword arguments, as a Hugging Face
        model's batch) and one backward. Use the training batch size: the
        batch-mode rank is measured at this size.
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
    cands = check_candidates(candidates)
    loss_fn = _default_loss if loss_fn is None else loss_fn
    first, every = _peek(batches)
    selected = _select_layers(model, layers, _split_batch(first, 0)[0])
    captures = {n: _Capture(m) for n, m in selected.items()}
    states = {n: _LayerState(n, _kind_name(m)) for n, m in selected.items()}
    weights = [m.weight for m in selected.values()]
    handles = [m.register_forward_hook(captures[n].forward_hook) for n, m in selected.items()]
    n_batches = 0
    try:
        with preserved_training_state(model), torch.enable_grad():
            for index, batch in enumerate(every):
                inputs, targets = _split_batch(batch, index)
                for cap in captures.values():
                    cap.reset()
                loss = loss_fn(call_model(model, inputs), targets)
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
