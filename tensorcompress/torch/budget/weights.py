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
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
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
from tensorcompress.torch.lowrank import weight_rank, weight_svd
from tensorcompress.torch.modules import CompressedModule
from tensorcompress.torch.selection import LayerSelection, select_layers
from tensorcompress.torch.state import preserved_training_state

__all__ = ["measure_weight_sensitivity", "plan_weight_ranks"]


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


class _WeightProbe:
    """One layer's spectrum, and the output errors of every candidate over the batches."""

    def __init__(
        self, name: str, module: nn.Module, thresholds: tuple[float, ...], only_if_smaller: bool
    ) -> None:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        self.module = module
        matrix = weight.detach().reshape(weight.shape[0], -1)
        _, s, vh = weight_svd(matrix, name=name)
        self.s, self.vh = s, vh
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
        self.errors = [0.0] * len(thresholds)
        self.calls = 0

    def hook(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self.calls += 1
        x = args[0].detach().to(self.vh.dtype)
        if isinstance(module, nn.Conv2d):
            kernel = self.vh.reshape(-1, *module.weight.shape[1:])
            z = module._conv_forward(x, kernel, None)  # (N, full, H', W')
            per_direction = z.transpose(0, 1).reshape(z.shape[1], -1).square().sum(1)
        else:
            z = x.reshape(-1, x.shape[-1]) @ self.vh.transpose(0, 1)  # (N, full)
            per_direction = z.square().sum(0)
        energy = per_direction * self.s.square()  # s_j^2 ||op(x, v_j)||^2
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
        takes them; only ``model(inputs)`` runs.
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
        does not run exactly once per forward.

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
    first, every = _peek(batches)
    selected = _factorable(model, layers, _split_batch(first, 0)[0])
    probes = {n: _WeightProbe(n, m, cands, only_if_smaller) for n, m in selected.items()}
    handles = [m.register_forward_hook(probes[n].hook) for n, m in selected.items()]
    n_batches = 0
    try:
        with preserved_training_state(model), torch.no_grad():
            for index, batch in enumerate(every):
                for probe in probes.values():
                    probe.calls = 0
                model(_split_batch(batch, index)[0])
                for name, probe in probes.items():
                    if probe.calls != 1:
                        raise ValueError(
                            f"layer {name!r} ran {probe.calls} times in one forward; each "
                            "selected layer must run exactly once per forward"
                        )
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    return Sensitivity(
        layers=tuple(
            LayerSensitivity(
                name=name,
                choices=tuple(
                    Choice(eps, (k,), numbers * probe.itemsize, err / n_batches)
                    for eps, k, numbers, err in zip(cands, probe.ranks, probe.numbers, probe.errors)
                ),
                itemsize=probe.itemsize,
                kind=type(probe.module).__name__,
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
) -> Allocation:
    """Measure weight sensitivity and allocate weight ranks under a budget, in one call.

    Parameters
    ----------
    model, batches, layers, candidates, only_if_smaller
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
        layers=list(alloc.ranks), only_if_smaller=...)`` factors each layer at
        its chosen rank.
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
        model, batches, layers, cands, only_if_smaller=only_if_smaller
    )
    return allocate(sens, sens.bytes_at(eps) if eps is not None else int(budget))
