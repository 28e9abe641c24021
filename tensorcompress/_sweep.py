"""The plan of a sequential sweep over a tensor's modes (ST-HOSVD and warm ASI).

A sweep visits the modes in turn, each on the tensor already projected onto
the earlier modes' factors. This module chooses the order of least estimated
cost and, where that is cheaper, visits a block of small trailing modes (the
7 x 7 spatial modes of a late conv's input) jointly: one Gram matrix of the
block's joint unfolding gives every mode of the block its Gram matrix by a
partial trace, and one product with the Kronecker product of the block's
factors projects the tensor. Narrow products (width 4 or 7) run far below
the BLAS's speed, so this replaces four narrow passes over the tensor by two
wide ones.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

from tensorcompress import rank as _rank
from tensorcompress import tenalg
from tensorcompress._array import Array, device

# A product narrower than this is bound by memory traffic, not arithmetic: one
# pass over the tensor costs about as much as a product this wide.
_MIN_WIDTH = 16

Step = tuple[int, ...]
"""One mode, or a block of trailing modes visited jointly."""


def _pass(size: int, width: int, batched: bool) -> int:
    # A middle mode runs as many small batched products, about half as fast
    # as one large product on these shapes.
    return size * max(width, _MIN_WIDTH) * (2 if batched else 1)


def _batched(shape: Sequence[int], mode: int) -> bool:
    return math.prod(shape[:mode]) > 1 and math.prod(shape[mode + 1 :]) > 1


def gram_is_cheaper(shape: Sequence[int], mode: int, rank: int) -> bool:
    """Whether a subspace-iteration step should use the Gram matrix (one wide
    pass over the tensor) rather than two thin products (two narrow passes)."""
    size, batched = math.prod(shape), _batched(shape, mode)
    return _pass(size, int(shape[mode]), batched) <= 2 * _pass(size, rank, batched)


def step_cost(shape: Sequence[int], mode: int, rank: int, iterate: bool) -> int:
    """Estimated cost of one mode's step on a tensor of ``shape``.

    An exact basis needs the Gram matrix (one pass of width ``dim``); a
    subspace-iteration step the cheaper of that and two thin products (two
    passes of width ``rank``). Both then project (a pass of width ``rank``).
    Counted in multiply-adds, with narrow and batched products charged as
    memory-bound (see ``_MIN_WIDTH``). A mode kept whole costs nothing.
    """
    n, size, batched = int(shape[mode]), math.prod(shape), _batched(shape, mode)
    if rank == n:
        return 0
    gram = _pass(size, n, batched)
    basis = min(gram, 2 * _pass(size, rank, batched)) if iterate else gram
    return basis + _pass(size, rank, batched)


def _best_order(
    shape: Sequence[int],
    ranks: Sequence[_rank.ModeRank],
    modes: Sequence[int],
    iterate: bool,
    gram_only: int | None = None,
) -> tuple[tuple[int, ...], int]:
    # Least total cost, by enumeration up to 6 modes and greedily beyond.
    def total(order: Sequence[int]) -> int:
        current, cost = [int(n) for n in shape], 0
        for k in order:
            r = int(ranks[k])
            cost += step_cost(current, k, r, iterate and k != gram_only)
            current[k] = r
        return cost

    if len(modes) <= 6:
        best = min(itertools.permutations(modes), key=total)
    else:
        best, left = (), list(modes)
        while left:
            k = min(left, key=lambda m: total((*best, m)))
            best, left = (*best, k), [m for m in left if m != k]
    return best, total(best)


@functools.lru_cache(maxsize=256)
def plan(
    shape: tuple[int, ...], ranks: tuple[_rank.ModeRank, ...], iterate: bool = False
) -> tuple[Step, ...]:
    """Steps of a sequential sweep, in the order of least estimated cost.

    Parameters
    ----------
    shape : tuple of int
        Shape of the tensor.
    ranks : tuple of int or float
        Per-mode ranks; floats are thresholds whose rank is not known yet.
    iterate : bool, default False
        Steps are subspace iterations (ASI) rather than exact bases (HOSVD).

    Returns
    -------
    tuple of tuple of int
        Each step is one mode, or a block of trailing modes with fixed ranks
        visited jointly through their joint Gram matrix (see
        :func:`block_sweep`), its modes in the order they are visited. Modes
        with fixed ranks come first, in the order of least :func:`step_cost`;
        threshold modes last, smallest first.
    """
    ndim = len(shape)
    fixed = [k for k in range(ndim) if isinstance(ranks[k], int)]
    rest = sorted((k for k in range(ndim) if k not in fixed), key=lambda k: shape[k])
    order, cost = _best_order(shape, ranks, fixed, iterate)
    steps: list[Step] = [(k,) for k in order]
    # Merge the modes from `head` on into one mode that always uses its Gram
    # matrix, while they all have fixed ranks; keep the cheapest plan.
    for head in range(ndim - 2, 0, -1):
        if not all(isinstance(r, int) for r in ranks[head:]):
            break
        merged, merged_cost = _best_order(
            (*shape[:head], math.prod(shape[head:])),
            (*ranks[:head], math.prod(int(r) for r in ranks[head:])),
            [k for k in fixed if k <= head],
            iterate,
            gram_only=head,
        )
        if merged_cost < cost:
            block = tuple(k for k in order if k >= head)
            steps = [block if k == head else (k,) for k in merged]
            cost = merged_cost
    return (*steps, *((k,) for k in rest))


def _mode_gram(xp: Any, g: Array, dims: Sequence[int], i: int) -> Array:
    # g has shape (*dims, *dims); trace out every index pair but i's.
    b = len(dims)
    others = [j for j in range(b) if j != i]
    rest = math.prod(dims[j] for j in others)
    moved = xp.permute_dims(g, (i, *others, b + i, *(b + j for j in others)))
    return tenalg.partial_trace(xp.reshape(moved, (dims[i], rest, dims[i], rest)), xp=xp)


def block_sweep(
    xp: Any,
    t: Array,
    modes: Sequence[int],
    ranks: Sequence[_rank.ModeRank],
    basis: Callable[[int, Array], tuple[Array, float]],
) -> tuple[Array, dict[int, Array], dict[int, float]]:
    """Visit a block of trailing modes jointly.

    Parameters
    ----------
    xp : namespace
        Array namespace of ``t``.
    t : array
        Tensor whose trailing modes are ``sorted(modes)``.
    modes : sequence of int
        The block's modes, in the order they are visited.
    ranks : sequence
        Rank of every mode of ``t`` (ints on the block); a mode kept whole
        gets the identity.
    basis : callable
        ``basis(mode, g)`` returns the mode's factor and its explained
        variance from the Gram matrix ``g`` of the mode's unfolding of ``t``
        already projected onto the block's earlier factors.

    Returns
    -------
    projected : array
        ``t`` projected onto every factor of the block, in one product.
    factors, explained : dict
        Factor and explained variance of each mode of the block.
    """
    first = min(modes)
    lead, dims = [int(n) for n in t.shape[:first]], [int(n) for n in t.shape[first:]]
    b = len(dims)
    flat = xp.reshape(t, (-1, math.prod(dims)))
    g = xp.reshape(tenalg.gram(flat, 1, xp=xp), (*dims, *dims))
    factors: dict[int, Array] = {}
    explained: dict[int, float] = {}
    for k in modes:
        i = k - first
        if ranks[k] == dims[i]:
            factors[k] = xp.eye(dims[i], dtype=t.dtype, device=device(t))
            explained[k] = 1.0
            continue
        factors[k], explained[k] = basis(k, _mode_gram(xp, g, dims, i))
        ut = xp.matrix_transpose(factors[k])
        g = tenalg.mode_dot(tenalg.mode_dot(g, ut, i, xp=xp), ut, b + i, xp=xp)
        dims[i] = int(ranks[k])
    op = factors[first]
    for k in range(first + 1, first + b):
        op = tenalg.kron(op, factors[k], xp=xp)
    return xp.reshape(flat @ op, (*lead, *dims)), factors, explained
