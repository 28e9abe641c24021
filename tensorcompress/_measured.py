"""Choices made by timing the candidates on this machine, once per process.

Which sweep plan, product order or product shape is fastest depends on the
BLAS and the thread count, which no estimate knows. The first call for a
shape (with its dtype and the torch thread count) on a large CPU tensor times
each candidate a few times, interleaved, and keeps the fastest for the rest
of the process (:func:`fastest`; the sweeps' plans in
:func:`tensorcompress._sweep.run`). :func:`measured_plans` turns it off.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from tensorcompress._array import Array, device

R = TypeVar("R")
K = TypeVar("K")

# Sweeps over fewer entries take a few milliseconds, where the estimate is
# good enough; measuring would cost more than it saves. (From 2**19, the ViT's
# 64x65x192 token inputs would be measured too: a small gain in time, and a
# transient memory that then depends on the plan the timing picks.)
MEASURE_FROM = 1 << 20
# Runs of each candidate, interleaved; the fastest counts.
_ROUNDS = 3

_measuring = True
_chosen_options: dict[tuple[Any, ...], str] = {}


def measured_plans(enabled: bool) -> bool:
    """Turn the measured choice of sweep plans on or off.

    When on (the default), the first sequential sweep (``hosvd.decompose``,
    a warm ``asi.decompose``) of each shape, ranks, method, dtype and torch
    thread count, over at least :data:`MEASURE_FROM` entries on a CPU, times
    a few candidate plans on its own input (the cheapest estimates, then the
    winner with each mode's basis switched between Gram matrix and thin
    products, then with each thin-product middle mode switched to a
    mode-first copy) and keeps the fastest for the rest of the process. The fastest
    order and product shapes depend on the BLAS and the thread count, which
    an estimate cannot know. The same switch covers the other measured
    choices (:func:`fastest`: the contraction order of a Linear's weight
    gradient from a Tucker input; a compressed 1x1 conv's forward and input
    gradient as a conv or a matrix product). Every order is a valid ST-HOSVD / ASI
    sweep, but the order changes the result slightly: turn measuring off
    where results must not depend on the machine.

    Parameters
    ----------
    enabled : bool
        Measure (True) or always take the estimated plan (False).

    Returns
    -------
    bool
        The previous setting.
    """
    global _measuring
    previous, _measuring = _measuring, bool(enabled)
    return previous


def chosen_options() -> dict[tuple[Any, ...], str]:
    """The other measured choices made in this process (:func:`fastest`).

    Returns
    -------
    dict
        ``(operation, *shapes, dtype, threads)`` to the name of the option
        kept: for ``"linear weight gradient"``, ``"projecting"`` or
        ``"expanding"``; for ``"1x1 conv"`` (a compressed 1x1 conv's forward
        or input gradient), ``"conv"`` or ``"matmul"``.
    """
    return dict(_chosen_options)


def worth_measuring(x: Array) -> bool:
    """Whether a choice on ``x`` is timed: measuring on, a CPU, MEASURE_FROM entries or more."""
    return _measuring and math.prod(x.shape) >= MEASURE_FROM and str(device(x)) == "cpu"


def timed(fns: Mapping[K, Callable[[], Any]], fastest: list[Any]) -> dict[K, float]:
    """The fastest of :data:`_ROUNDS` runs of each of ``fns``, in seconds.

    The runs are interleaved round by round, so a burst of other load on a
    shared machine slows every candidate alike instead of one; the first
    round also pays one-time costs. ``fastest`` holds ``[seconds, result]``
    of the fastest run seen so far and is updated, so only that run's result
    stays alive.
    """
    seconds = dict.fromkeys(fns, math.inf)
    for _ in range(_ROUNDS):
        for key, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            seconds[key] = min(seconds[key], elapsed)
            if elapsed < fastest[0]:
                fastest[:] = [elapsed, result]
            del result
    return seconds


def fastest(key: tuple[Any, ...], options: dict[str, Callable[[], R]], like: Array) -> R:
    """The result of whichever of ``options`` computes it fastest here.

    For the products whose fastest order depends on the BLAS and the thread
    count (a weight gradient contracted in factored form, say). Under the
    same conditions as the sweeps' measured plans (:func:`measured_plans`
    on, ``like`` on a CPU and at least :data:`MEASURE_FROM` entries), the
    first call for ``key`` (with ``like``'s dtype and the thread count)
    times every option three times, interleaved, and keeps the fastest for
    the process; otherwise the first option runs.

    Parameters
    ----------
    key : tuple
        What fixes the choice: the operation's name and shapes.
    options : dict of str to callable
        Ways to compute the same result, the default first.
    like : array
        The operation's largest input.

    Returns
    -------
    object
        The chosen option's result.
    """
    names = list(options)
    if len(names) == 1 or not worth_measuring(like):
        return options[names[0]]()
    full = (*key, str(like.dtype), threads(like))
    name = _chosen_options.get(full)
    if name is not None:
        return options[name]()
    best: list[Any] = [math.inf, None]
    seconds = timed(options, best)
    _chosen_options[full] = min(seconds, key=seconds.__getitem__)
    result: R = best[1]
    return result


def threads(x: Array) -> int | None:
    """Torch's intra-op thread count for a torch ``x``, else None (part of every choice's key)."""
    # Torch's intra-op threads set the fastest products; numpy's BLAS threads
    # are not visible without another dependency.
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None and isinstance(x, torch.Tensor) else None
