"""The plan of a sequential sweep over a tensor's modes (ST-HOSVD and warm ASI).

A sweep visits the modes in turn, each on the tensor already projected onto
the earlier modes' factors. A plan fixes the order, whether a block of small
trailing modes (the 7 x 7 spatial modes of a late conv's input) is visited
jointly (one Gram matrix of the block's joint unfolding gives every mode of
the block its Gram matrix by a partial trace, and one product with the
Kronecker product of the block's factors projects the tensor), and, for ASI,
whether each mode iterates on its Gram matrix or on two thin products.

An estimate of the multiply-adds ranks the plans (:func:`plans`); the
fastest one depends on the BLAS and the thread count, so :func:`run` times
the best estimates on a large tensor's first sweep and keeps the winner.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

from tensorcompress import _measured, tenalg
from tensorcompress import rank as _rank
from tensorcompress._array import Array, cast, device

# A product narrower than this is bound by memory traffic, not arithmetic: one
# pass over the tensor costs about as much as a product this wide.
_MIN_WIDTH = 16
# LAPACK's symmetric eigendecomposition of an n x n matrix takes about as
# long as this many times n^3 multiply-adds in a large product (measured:
# n = 384 and 512 on torch's CPU build).
_EIGH = 6
# A plan estimated this many times the cheapest is never worth running.
_WORTH_TIMING = 4
# The most entries of a block of trailing modes visited jointly (its Gram
# matrix has the square of this).
_BLOCK = 1024

R = TypeVar("R")


class Step(NamedTuple):
    """One step of a sweep."""

    modes: tuple[int, ...]
    """One mode, or a block of trailing modes visited jointly (in this order)."""
    gram: bool = True
    """The basis comes from the Gram matrix (one wide pass over the tensor);
    False: a subspace-iteration step by two thin products (ASI only)."""
    unfolded: bool = False
    """A thin-product step on a middle mode runs its three products as single
    GEMMs on one mode-first copy of the tensor, instead of batched products
    over the leading modes (narrow ones when the trailing modes are short)."""


Plan = tuple[Step, ...]
"""The steps of a sweep, in the order they run."""


def _pass(size: int, width: int, batched: bool) -> int:
    # A middle mode runs as many small batched products, about half as fast
    # as one large product on these shapes.
    return size * max(width, _MIN_WIDTH) * (2 if batched else 1)


def _batched(shape: Sequence[int], mode: int) -> bool:
    return math.prod(shape[:mode]) > 1 and math.prod(shape[mode + 1 :]) > 1


def step_cost(
    shape: Sequence[int], mode: int, rank: int, gram: bool = True, exact: bool = False
) -> int:
    """Estimated cost of one mode's step on a tensor of ``shape``.

    The Gram matrix costs one pass of width ``dim``; a subspace-iteration
    step by thin products (``gram=False``) two passes of width ``rank``. Both
    then project (a pass of width ``rank``). An exact basis (``exact``,
    HOSVD) adds the symmetric eigendecomposition of the smaller Gram matrix
    of the unfolding. Counted in multiply-adds, with narrow and batched
    products charged as memory-bound (see ``_MIN_WIDTH``) and the
    eigendecomposition as ``_EIGH`` n^3. A mode kept whole costs nothing.
    """
    n, size, batched = int(shape[mode]), math.prod(shape), _batched(shape, mode)
    if rank == n:
        return 0
    basis = _pass(size, n, batched) if gram else 2 * _pass(size, rank, batched)
    if exact:
        basis += _EIGH * min(n, size // n) ** 3
    return basis + _pass(size, rank, batched)


def _cost(shape: Sequence[int], ranks: Sequence[_rank.ModeRank], steps: Plan, exact: bool) -> int:
    # A block is charged as one mode of the joint size (its Gram matrix; the
    # eigendecompositions of its small modes are negligible).
    current, cost = [int(n) for n in shape], 0
    for step in steps:
        first = min(step.modes)
        rank = math.prod(int(ranks[k]) for k in step.modes)
        if len(step.modes) > 1:
            merged = (*current[:first], math.prod(current[first:]))
            cost += step_cost(merged, first, rank, step.gram)
        else:
            cost += step_cost(current, first, rank, step.gram, exact)
        for k in step.modes:
            current[k] = int(ranks[k])
    return cost


def _with_gram_choices(
    shape: Sequence[int],
    ranks: Sequence[_rank.ModeRank],
    units: Sequence[tuple[int, ...]],
    iterate: bool,
) -> Plan:
    # Each single mode takes the cheaper basis on the tensor it will see.
    current, steps = [int(n) for n in shape], []
    for modes in units:
        gram = True
        if iterate and len(modes) == 1:
            (k,) = modes
            r = int(ranks[k])
            gram = step_cost(current, k, r, True) <= step_cost(current, k, r, False)
        steps.append(Step(modes, gram))
        for k in modes:
            current[k] = int(ranks[k])
    return tuple(steps)


@functools.lru_cache(maxsize=256)
def plans(
    shape: tuple[int, ...], ranks: tuple[_rank.ModeRank, ...], iterate: bool = False
) -> tuple[Plan, ...]:
    """Every candidate plan of a sequential sweep, cheapest estimate first.

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
    tuple of Plan
        Modes with fixed ranks come first, in every order (up to 6 of them;
        beyond, the greedy order of least cost), each optionally with a block
        of small trailing fixed modes (at most ``_BLOCK`` entries jointly)
        visited through their joint Gram matrix (see :func:`block_sweep`);
        threshold modes last, smallest first. Each mode takes the basis (Gram
        or thin products) of least :func:`step_cost`. Sorted by estimated
        total cost; plans estimated above ``_WORTH_TIMING`` times the
        cheapest are left out.
    """
    ndim = len(shape)
    fixed = [k for k in range(ndim) if isinstance(ranks[k], int)]
    rest = tuple(
        Step((k,))
        for k in sorted((k for k in range(ndim) if k not in fixed), key=lambda k: shape[k])
    )
    groupings: list[list[tuple[int, ...]]] = [[(k,) for k in fixed]]
    for head in range(ndim - 2, 0, -1):
        if not all(isinstance(r, int) for r in ranks[head:]) or math.prod(shape[head:]) > _BLOCK:
            break
        # The block's own modes run largest first, the last mode first on ties.
        block = tuple(sorted(range(head, ndim), key=lambda k: (-shape[k], -k)))
        groupings.append([*((k,) for k in fixed if k < head), block])
    found: dict[Plan, int] = {}
    for units in groupings:
        orders = (
            itertools.permutations(units)
            if len(units) <= 6
            else [_greedy(shape, ranks, units, iterate)]
        )
        for order in orders:
            # Threshold modes run on the whole tensor in every plan: not costed.
            steps = _with_gram_choices(shape, ranks, order, iterate)
            found.setdefault((*steps, *rest), _cost(shape, ranks, steps, not iterate))
    cheapest = min(found.values())
    return tuple(
        p for p in sorted(found, key=found.__getitem__) if found[p] <= _WORTH_TIMING * cheapest
    )


def _greedy(
    shape: Sequence[int],
    ranks: Sequence[_rank.ModeRank],
    units: Sequence[tuple[int, ...]],
    iterate: bool,
) -> tuple[tuple[int, ...], ...]:
    order: tuple[tuple[int, ...], ...] = ()
    left = list(units)
    while left:
        best = min(
            left,
            key=lambda u: _cost(
                shape, ranks, _with_gram_choices(shape, ranks, (*order, u), iterate), not iterate
            ),
        )
        order, left = (*order, best), [u for u in left if u != best]
    return order


def plan(shape: tuple[int, ...], ranks: tuple[_rank.ModeRank, ...], iterate: bool = False) -> Plan:
    """The plan of least estimated cost (see :func:`plans`)."""
    return plans(shape, ranks, iterate)[0]


def gram_flips(steps: Plan) -> Iterator[Plan]:
    """``steps`` with one single-mode step's basis switched (Gram / thin products)."""
    for i, step in enumerate(steps):
        if len(step.modes) == 1:
            yield (*steps[:i], step._replace(gram=not step.gram), *steps[i + 1 :])


def unfold_flips(steps: Plan, ndim: int) -> Iterator[Plan]:
    """``steps`` with one thin-product step on a middle mode switched to or
    from its mode-first copy (see :attr:`Step.unfolded`)."""
    for i, step in enumerate(steps):
        if len(step.modes) == 1 and not step.gram and 0 < step.modes[0] < ndim - 1:
            yield (*steps[:i], step._replace(unfolded=not step.unfolded), *steps[i + 1 :])


# Measured choice
# ---------------------------------------------------------------------------

# Candidates timed: the cheapest estimates, then the winner's basis flips.
_CANDIDATES = 6

_chosen: dict[tuple[Any, ...], Plan] = {}


def chosen_plans() -> dict[tuple[Any, ...], Plan]:
    """The plans chosen by measurement in this process.

    Returns
    -------
    dict
        ``(shape, ranks, iterate, dtype, threads)`` to the :data:`Plan` kept;
        ``iterate`` is True for ASI's warm steps, False for HOSVD.
    """
    return dict(_chosen)


def run(
    x: Array,
    ranks: tuple[_rank.ModeRank, ...],
    iterate: bool,
    sweep: Callable[[Plan], R],
) -> R:
    """``sweep(plan)`` with the plan chosen for ``x``'s shape and ``ranks``.

    The estimated plan (:func:`plan`), or, for a large tensor on a CPU with
    :func:`measured_plans` on, the fastest of the candidates measured on the
    first call (cached).
    """
    shape = tuple(int(n) for n in x.shape)
    candidates = plans(shape, ranks, iterate)
    if len(candidates) == 1 or not _measured.worth_measuring(x):
        return sweep(candidates[0])
    key = (shape, ranks, iterate, str(x.dtype), _measured.threads(x))
    if key in _chosen:
        return sweep(_chosen[key])
    timed: dict[Plan, float] = {}
    fastest: list[Any] = [math.inf, None]

    def measure(plans: Iterable[Plan]) -> Plan:
        new = {steps: functools.partial(sweep, steps) for steps in plans if steps not in timed}
        timed.update(_measured.timed(new, fastest))
        return min(timed, key=timed.__getitem__)

    winner = measure(candidates[:_CANDIDATES])
    if iterate:
        limit = _WORTH_TIMING * _cost(shape, ranks, candidates[0], False)
        winner = measure(s for s in gram_flips(winner) if _cost(shape, ranks, s, False) <= limit)
        # A copy against batched products: which is faster depends on the
        # shapes and the BLAS, so each is timed on the winner.
        winner = measure(unfold_flips(winner, len(shape)))
    _chosen[key] = winner
    result: R = fastest[1]
    return result


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
        already projected onto the block's earlier factors (in ``t``'s
        dtype); the factor may be in another dtype (the products cast it to
        ``t``'s).

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
        ut = xp.matrix_transpose(cast(xp, factors[k], g.dtype))
        g = tenalg.mode_dot(tenalg.mode_dot(g, ut, i, xp=xp), ut, b + i, xp=xp)
        dims[i] = int(ranks[k])
    op = cast(xp, factors[first], t.dtype)
    for k in range(first + 1, first + b):
        op = tenalg.kron(op, cast(xp, factors[k], t.dtype), xp=xp)
    return xp.reshape(flat @ op, (*lead, *dims)), factors, explained
