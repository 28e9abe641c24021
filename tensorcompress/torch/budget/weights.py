"""Weight sensitivity: what each candidate weight rank costs a layer, and how much it hurts.

The weight-side twin of :mod:`~tensorcompress.torch.budget.sensitivity`, for
the factored training of :mod:`tensorcompress.torch.wasi` (``W ~ L R``).
:func:`measure_weight_sensitivity` measures, per selected layer and candidate
threshold ``eps`` of its weight's spectrum, the rank ``k`` that
:func:`~tensorcompress.torch.wasi.to_wasi` would give it, the bytes of its
factors (``k (out + in)``, a conv's ``in`` counting its kernel) and the
relative error of the layer's output with ``W`` truncated to rank ``k``,
``||op(x, W - W_k)|| / ||op(x, W)||``, averaged over a few batches of real
inputs. The result is a :class:`~tensorcompress.torch.budget.Sensitivity`,
so :func:`~tensorcompress.torch.budget.allocate` gives each layer its own rank
under one byte budget; :func:`plan_weight_ranks` does both.

Why the output error and not the weight's: a weight's spectrum says how much
of ``W`` a rank keeps, not how much of what the layer computes on its inputs,
which may lie mostly in a few of its directions. And why it is cheap: with
``W = U S V^T``, ``op(x, W) = sum_j s_j u_j op(x, v_j)`` and the ``u_j`` are
orthonormal, so ``||op(x, W - W_k)||^2 = sum_{j >= k} s_j^2 ||op(x, v_j)||^2``.
One product of the input with ``V`` per layer and batch gives the error of
every candidate.

The outputs' own basis. The rank-``k`` weight closest to ``W`` on the
layer's outputs is not the truncated SVD but ``L L^T W`` with ``L`` the
leading eigenvectors of the outputs' Gram matrix ``Y^T Y``
(:func:`output_grams`; :func:`~tensorcompress.torch.lowrank.output_basis`).
Given those Gram matrices, :func:`measure_weight_sensitivity` measures the
errors of that factorization (what ``to_wasi(..., output_grams=...)``
trains), with the same ranks and bytes: in a basis ``B`` of the outputs,
``||op(x, W - B_k B_k^T W)||^2 = sum_{j >= k} ||op(x, b_j^T W)||^2``, the
same sum with the rows of ``B^T W`` in place of ``s_j v_j``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from tensorcompress.torch.budget._checks import check_candidates, check_threshold
from tensorcompress.torch.budget.knapsack import (
    Allocation,
    Choice,
    LayerSensitivity,
    Sensitivity,
    allocate,
)
from tensorcompress.torch.budget.sensitivity import DEFAULT_CANDIDATES, _peek, _split_batch
from tensorcompress.torch.lowrank import check_output_gram, output_basis, weight_rank, weight_svd
from tensorcompress.torch.modules import CompressedModule
from tensorcompress.torch.selection import (
    LayerSelection,
    call_model,
    check_per_layer,
    select_layers,
)
from tensorcompress.torch.state import preserved_training_state

__all__ = ["measure_weight_sensitivity", "output_grams", "plan_weight_ranks"]


def _factorable(model: nn.Module, layers: LayerSelection, example: Any) -> dict[str, nn.Module]:
    named = dict(model.named_modules())
    chosen = {n: named[n] for n in select_layers(model, layers, example, subclasses=True)}
    if not chosen:
        raise ValueError("layers selects no Linear or Conv2d module")
    for n, m in chosen.items():
        if isinstance(m, CompressedModule):
            raise ValueError(f"layer {n!r} is already {type(m).__name__}; measure the plain model")
        if not (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)):
            raise TypeError(
                f"layer {n!r} ({type(m).__name__}) cannot be factored as L R: weights "
                "factor for nn.Linear and nn.Conv2d (groups=1) only; leave it out of `layers`"
            )
    return chosen


def _output(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``op(x, weight)`` without bias, as ``(rows, channels)``: a Linear's rows,
    a conv's pixels (a weight of any number of output channels)."""
    if isinstance(module, nn.Conv2d):
        z = module._conv_forward(x, weight.reshape(-1, *module.weight.shape[1:]), None)
        return z.transpose(0, 1).reshape(z.shape[1], -1).transpose(0, 1)
    return x.reshape(-1, x.shape[-1]) @ weight.transpose(0, 1)


_GRAM_ROWS = 1 << 14
"""Rows of a layer's output cast to float64 at a time by :func:`output_grams`."""

_Observer = Callable[[str, nn.Module, torch.Tensor], None]


def _run_forwards(
    model: nn.Module,
    batches: Iterable[Any],
    layers: LayerSelection,
    observer: Callable[[dict[str, nn.Module]], _Observer],
) -> int:
    """Run ``model`` on each batch without gradients (training mode, state restored);
    ``observer(selected)``, given the selected factorable layers by name, returns
    what is called with ``(name, module, input)`` at each of their forwards.
    Returns the number of batches. Each layer must run exactly once per forward."""
    first, every = _peek(batches)
    selected = _factorable(model, layers, _split_batch(first, 0)[0])
    observe = observer(selected)
    calls = dict.fromkeys(selected, 0)

    def hook(name: str) -> Callable[..., None]:
        def run(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            calls[name] += 1
            observe(name, module, args[0].detach())

        return run

    handles = [m.register_forward_hook(hook(n)) for n, m in selected.items()]
    n_batches = 0
    try:
        with preserved_training_state(model), torch.no_grad():
            for index, batch in enumerate(every):
                calls.update(dict.fromkeys(calls, 0))
                call_model(model, _split_batch(batch, index)[0])
                for name, count in calls.items():
                    if count != 1:
                        raise ValueError(
                            f"layer {name!r} ran {count} times in one forward; each "
                            "selected layer must run exactly once per forward"
                        )
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    return n_batches


def output_grams(
    model: nn.Module, batches: Iterable[Any], layers: LayerSelection = None
) -> dict[str, torch.Tensor]:
    """The Gram matrix ``Y^T Y`` of each selected layer's outputs over a few batches.

    ``Y`` is the layer's output without its bias, one row per sample (a
    Linear's rows, a conv's pixels), over every batch: ``(out, out)``, in
    float64. Passed to :func:`~tensorcompress.torch.wasi.to_wasi` (and to
    :func:`measure_weight_sensitivity`) as ``output_grams``, it factors each
    weight in the basis that keeps most of what the layer computes on such
    inputs (:func:`~tensorcompress.torch.lowrank.output_basis`).

    Parameters
    ----------
    model, batches, layers
        As in :func:`measure_weight_sensitivity`: the plain model, batches of
        ``(inputs, targets)`` (only ``model(inputs)`` runs, forwards only, in
        training mode, state restored), and Linear or Conv2d layers (groups
        1) that run exactly once per forward.

    Returns
    -------
    dict
        From qualified name to its ``(out, out)`` float64 Gram matrix, in
        selection order.

    Raises
    ------
    ValueError, TypeError
        As :func:`measure_weight_sensitivity`.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> x = torch.randn(8, 16)
    >>> grams = output_grams(net, [(x, None)], ["0"])
    >>> y = (x @ net[0].weight.T).double()
    >>> torch.allclose(grams["0"], y.T @ y)
    True
    """
    grams: dict[str, torch.Tensor] = {}

    def observer(selected: dict[str, nn.Module]) -> _Observer:
        for name, module in selected.items():
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            out = int(weight.shape[0])
            grams[name] = torch.zeros(out, out, dtype=torch.float64, device=weight.device)

        def observe(name: str, module: nn.Module, x: torch.Tensor) -> None:
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            y = _output(module, x.to(weight.dtype), weight.detach())
            # float64 a block of rows at a time: no float64 copy of a large output.
            for rows in y.split(_GRAM_ROWS):
                rows64 = rows.double()
                grams[name] += rows64.transpose(0, 1) @ rows64

        return observe

    _run_forwards(model, batches, layers, observer)
    return grams


class _WeightProbe:
    """One layer's candidate ranks and bytes, and their output errors over the batches.

    The directions are the rows of ``B^T W`` for an orthonormal basis ``B`` of
    the outputs, leading first: ``S V^T`` for the SVD's ``B = U``, or those of
    the outputs' own basis. Rank ``k`` keeps the first ``k``.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        thresholds: tuple[float, ...],
        only_if_smaller: bool,
        gram: torch.Tensor | None,
    ) -> None:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        matrix = weight.detach().reshape(weight.shape[0], -1)
        _, s, vh = weight_svd(matrix, name=name)
        if gram is None:
            self.directions = s[:, None] * vh
        else:
            check_output_gram(gram, matrix.shape[0], name)
            basis = output_basis(gram.to(matrix.device))
            self.directions = (basis.transpose(0, 1) @ matrix.double()).to(vh.dtype)
        self.ranks = [weight_rank(s, eps) for eps in thresholds]
        # With only_if_smaller, a rank at or above break-even leaves the weight dense.
        self.dense = [
            only_if_smaller and k * sum(matrix.shape) >= matrix.numel() for k in self.ranks
        ]
        self.numbers = [
            matrix.numel() if dense else k * sum(matrix.shape)
            for k, dense in zip(self.ranks, self.dense)
        ]
        self.itemsize = weight.element_size()
        self.kind = type(module).__name__
        self.errors = [0.0] * len(thresholds)

    def observe(self, module: nn.Module, x: torch.Tensor) -> None:
        # ||op(x, d_j)||^2 for every direction d_j: their tail sums are the errors.
        energy = _output(module, x.to(self.directions.dtype), self.directions).square().sum(0)
        total = float(energy.sum())
        # tail[k]: the energy of directions k, k+1, ... (what rank k drops).
        tail = [*energy.flip(0).cumsum(0).flip(0).tolist(), 0.0]
        for i, (k, dense) in enumerate(zip(self.ranks, self.dense)):
            if total > 0 and not dense:
                self.errors[i] += (max(tail[k], 0.0) / total) ** 0.5


def measure_weight_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    layers: LayerSelection = None,
    candidates: Iterable[float] = DEFAULT_CANDIDATES,
    *,
    only_if_smaller: bool = False,
    output_grams: Mapping[str, torch.Tensor] | None = None,
) -> Sensitivity:
    """Measure, per layer and candidate threshold, the weight rank, its factors' bytes
    and the layer's output error with the weight truncated to that rank.

    Parameters
    ----------
    model : nn.Module
        The plain model (the selected layers not yet factored or compressed).
        It runs forwards only, without gradients, in training mode (as
        fine-tuning does); training flags and buffers are restored after.
    batches : iterable of (inputs, targets)
        A few batches, as :func:`~tensorcompress.torch.budget.measure_sensitivity`
        takes them (inputs a tensor, a tuple of positional arguments or a
        dict of keyword arguments); only ``model(inputs)`` runs.
    layers : LastLayers, LastBlocks, callable, list of str or None
        Which layers, as in :func:`~tensorcompress.torch.wasi.to_wasi`; each
        a Linear or a Conv2d with groups 1, run exactly once per forward.
    candidates : iterable of float, default (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
        Explained-variance thresholds of each weight's spectrum, in (0, 1].
    only_if_smaller : bool, default False
        Measure for ``to_wasi(..., only_if_smaller=True)``, which leaves a
        layer dense where its factors would hold at least as many numbers
        as its weight: such a candidate costs the dense weight's bytes and
        has no error.
    output_grams : dict, optional
        One Gram matrix of outputs per selected layer (:func:`output_grams`):
        measure the factorization ``to_wasi(..., output_grams=...)`` makes,
        in the outputs' basis (same ranks and bytes, errors at most the
        SVD's on those outputs). ``None``: the truncated SVD's.

    Returns
    -------
    Sensitivity
        Per layer (in selection order) and candidate (increasing): ``ranks``
        is ``(k,)``, the rank ``to_wasi(rank=eps)`` gives the layer;
        ``nbytes`` the bytes of its factors ``L`` and ``R`` in the weight's
        dtype (above the break-even rank, more than the dense weight's,
        unless ``only_if_smaller``);
        ``error`` the relative error of the layer's output (bias aside) with
        the weight truncated to rank ``k``, averaged over the batches.

    Raises
    ------
    ValueError, TypeError
        On bad candidates, no batches, a selection with nothing in it, a layer
        that cannot factor or is already factored or compressed, or one that
        does not run exactly once per forward; ``output_grams`` without one
        ``(out, out)`` finite matrix per selected layer.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tensorcompress.torch.budget import allocate, measure_weight_sensitivity
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> g = torch.Generator().manual_seed(0)
    >>> batches = [(torch.randn(8, 16, generator=g), torch.zeros(8)) for _ in range(2)]
    >>> sens = measure_weight_sensitivity(net, batches, ["0", "2"], candidates=(0.5, 0.9))
    >>> alloc = allocate(sens, sens.bytes_at(0.9))
    >>> alloc.total_error <= sens.error_at(0.9)
    True
    """
    cands = check_candidates(candidates)
    probes: dict[str, _WeightProbe] = {}

    def observer(selected: dict[str, nn.Module]) -> _Observer:
        if output_grams is not None:
            check_per_layer("output_grams", output_grams, list(selected))
        for name, module in selected.items():
            gram = None if output_grams is None else output_grams[name]
            probes[name] = _WeightProbe(name, module, cands, only_if_smaller, gram)
        return lambda name, module, x: probes[name].observe(module, x)

    n_batches = _run_forwards(model, batches, layers, observer)
    return Sensitivity(
        layers=tuple(
            LayerSensitivity(
                name=name,
                choices=tuple(
                    Choice(eps, (k,), numbers * probe.itemsize, err / n_batches)
                    for eps, k, numbers, err in zip(cands, probe.ranks, probe.numbers, probe.errors)
                ),
                itemsize=probe.itemsize,
                kind=probe.kind,
            )
            for name, probe in probes.items()
        ),
        n_batches=n_batches,
    )


def plan_weight_ranks(
    model: nn.Module,
    batches: Iterable[Any],
    layers: LayerSelection = None,
    budget: int | float = 0.8,
    candidates: Iterable[float] = DEFAULT_CANDIDATES,
    *,
    only_if_smaller: bool = False,
    output_grams: Mapping[str, torch.Tensor] | None = None,
) -> Allocation:
    """Measure weight sensitivity and allocate weight ranks under a budget, in one call.

    Parameters
    ----------
    model, batches, layers, candidates, only_if_smaller, output_grams
        As in :func:`measure_weight_sensitivity`; with ``only_if_smaller``,
        1.0 joins the candidates, so that leaving a layer dense is a choice.
    budget : int or float, default 0.8
        Bytes of all the selected layers' factors together, or a threshold
        in (0, 1]: the bytes their factors take when every weight keeps that
        share of its spectrum (the threshold joins the candidates), so the
        allocation spends what ``to_wasi(rank=budget)`` would, layer by layer
        where it hurts the outputs least.

    Returns
    -------
    Allocation
        ``to_wasi(model, rank={n: k for n, (k,) in alloc.ranks.items()},
        layers=list(alloc.ranks), only_if_smaller=..., output_grams=...)``
        factors each layer at its chosen rank.
    """
    cands = list(check_candidates(candidates))
    eps: float | None = None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be an int (bytes) or a float threshold, got {budget!r}")
    if not isinstance(budget, numbers.Integral):
        eps = check_threshold(float(budget), "budget")
        cands.append(eps)
    if only_if_smaller:
        cands.append(1.0)
    sens = measure_weight_sensitivity(
        model,
        batches,
        layers,
        cands,
        only_if_smaller=only_if_smaller,
        output_grams=output_grams,
    )
    return allocate(sens, sens.bytes_at(eps) if eps is not None else int(budget))
