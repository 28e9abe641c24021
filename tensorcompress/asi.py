"""Activation Subspace Iteration (ASI).

ASI tracks the Tucker subspaces of a stream of similar tensors (a layer's
activations over training steps). The first call runs an exact ST-HOSVD,
which also fixes the ranks when ``rank`` is a threshold. Each later call
starts from the previous factors and runs ``n_iter`` steps of subspace
iteration per mode, ``U <- qr(X_(k) X_(k)^T U)``, then projects onto them;
``n_iter`` and ``seed`` belong to these warm calls only.

Modes are visited in turn on the tensor already projected onto the earlier
modes' new factors (sequential truncation), in the order of least estimated
cost, so after the first mode every product runs on a smaller tensor. A mode
whose Gram matrix is cheaper than two thin products (one wide pass over the
tensor instead of two narrow ones) iterates on its Gram matrix; small trailing
modes (a 7 x 7 spatial pair) share one Gram matrix of their joint unfolding.
The energies behind ``explained_variance`` are read off the Gram matrices
where there are some, so no extra pass over the input is made. No product
builds a permuted copy of the tensor (see :mod:`tensorcompress.tenalg`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorcompress import _sweep, hosvd, tenalg
from tensorcompress import rank as _rank
from tensorcompress._array import (
    Array,
    Casts,
    as_compute,
    cast,
    check_tensor,
    device,
    from_numpy,
    to_float,
)
from tensorcompress.results import TuckerResult

__all__ = ["Seed", "decompose"]

Seed = int | np.random.Generator | None
"""A seed for the generator that pads subspaces: an int, a numpy Generator or None."""


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _orthonormal(xp: Any, a: Array) -> Array:
    q, _ = xp.linalg.qr(a)
    return q


def _fit_factor(
    xp: Any, factor: Array, dim: int, rank: int, like: Array, rng: np.random.Generator
) -> Array:
    """Adapt a previous factor to a mode of size ``dim`` and ``rank`` columns.

    Rows are cut, or padded with seeded Gaussian rows, when the mode changed
    size (a smaller last batch); columns are cut, or padded with seeded
    Gaussian columns, when the rank changed. The result is re-orthonormalised
    whenever it was changed.
    """
    u = cast(xp, factor, like.dtype)
    n, r = int(u.shape[0]), int(u.shape[1])
    if n == dim and r == rank:
        return u
    if n > dim:
        u = u[:dim, :]
    elif n < dim:
        pad = from_numpy(xp, rng.standard_normal((dim - n, r)) / np.sqrt(dim), like)
        u = xp.concat([u, pad], axis=0)
    if r > rank:
        u = u[:, :rank]
    elif r < rank:
        pad = from_numpy(xp, rng.standard_normal((dim, rank - r)), like)
        u = xp.concat([u, pad], axis=1)
    return _orthonormal(xp, u)


def _step_ranks(ranks: Sequence[_rank.ModeRank], warm: TuckerResult) -> tuple[int, ...]:
    # Thresholds were applied when the ranks were fixed by the cold start.
    return tuple(r if isinstance(r, int) else warm.ranks[k] for k, r in enumerate(ranks))


def _iterate_on_gram(xp: Any, g: Array, u: Array, n_iter: int) -> tuple[Array, float, float]:
    """Subspace iteration on the Gram matrix ``g = A A^T``.

    Returns the factor, ``||A||^2`` and ``||u^T A||^2`` (the energy the factor
    keeps), both read off ``g``.
    """
    for _ in range(n_iter):
        u = _orthonormal(xp, g @ u)
    total = to_float(xp.linalg.trace(g))
    kept = to_float(xp.linalg.trace(xp.matrix_transpose(u) @ g @ u))
    return u, total, kept


def _ratio(kept: float, total: float) -> float:
    return kept / total if total > 0 else 1.0


def _warm_step(
    xp: Any,
    x: Array,
    warm: TuckerResult,
    ranks: tuple[int, ...],
    n_iter: int,
    rng: np.random.Generator,
    casts: Casts,
) -> tuple[Array, list[Array], list[float]]:
    shape = tuple(int(n) for n in x.shape)
    x_products = casts.to_low(x)  # the one cast of the input (none without product_dtype)
    low, high = casts.to_low, casts.to_high

    def squared_norm(t: Array) -> float:
        return to_float(xp.linalg.vector_norm(x if t is x_products else high(t))) ** 2

    def start(k: int) -> Array:
        return _fit_factor(xp, warm.factors[k], shape[k], ranks[k], x, rng)

    def block_basis(k: int, g: Array) -> tuple[Array, float]:
        u, total, kept = _iterate_on_gram(xp, high(g), start(k), n_iter)
        return u, _ratio(kept, total)

    padding = rng.bit_generator.state

    def sweep(steps: _sweep.Plan) -> tuple[Array, list[Array], list[float]]:
        # Every candidate plan draws the same padding (see _sweep.run).
        rng.bit_generator.state = padding
        factors: list[Any] = [None] * x.ndim
        explained = [1.0] * x.ndim
        t = x_products
        energy: float | None = None  # ||t||^2, when known without a pass over t
        for step in steps:
            if len(step.modes) > 1:
                t, block, block_explained = _sweep.block_sweep(
                    xp, t, step.modes, ranks, block_basis
                )
                for k in step.modes:
                    factors[k], explained[k] = block[k], block_explained[k]
                energy = None
                continue
            (k,) = step.modes
            n, r = shape[k], ranks[k]
            if r == n:
                # A whole mode needs no subspace: the identity spans it.
                factors[k] = xp.eye(n, dtype=x.dtype, device=device(x))
                continue
            u = start(k)
            if step.gram:
                u, energy, kept = _iterate_on_gram(xp, high(tenalg.gram(t, k, xp=xp)), u, n_iter)
                t = tenalg.mode_dot(t, low(xp.matrix_transpose(u)), k, xp=xp)
            elif step.unfolded:
                # One mode-first copy serves all three products as single GEMMs.
                tf = tenalg.unfold(t, k, xp=xp)
                for _ in range(n_iter):
                    z = low(xp.matrix_transpose(u)) @ tf
                    u = _orthonormal(xp, high(tf @ xp.matrix_transpose(z)))
                if energy is None:
                    energy = squared_norm(t)
                tf = low(xp.matrix_transpose(u)) @ tf
                kept = squared_norm(tf)
                t = tenalg.fold(tf, k, (*t.shape[:k], r, *t.shape[k + 1 :]), xp=xp)
            else:
                for _ in range(n_iter):
                    z = tenalg.mode_dot(t, low(xp.matrix_transpose(u)), k, xp=xp)
                    u = _orthonormal(xp, high(tenalg.cross_gram(t, z, k, xp=xp)))
                if energy is None:
                    energy = squared_norm(t)
                t = tenalg.mode_dot(t, low(xp.matrix_transpose(u)), k, xp=xp)
                kept = squared_norm(t)
            factors[k], explained[k] = u, _ratio(kept, energy)
            energy = kept
        return high(t), factors, explained

    return _sweep.run(x_products, ranks, True, sweep)


def decompose(
    x: Array,
    rank: _rank.RankLike,
    *,
    warm_start: TuckerResult | None = None,
    n_iter: int | None = None,
    seed: Seed = None,
    product_dtype: Any = None,
    check_finite: bool = True,
) -> TuckerResult:
    """Tucker decomposition by Activation Subspace Iteration.

    Parameters
    ----------
    x : array
        numpy array or torch tensor with ``ndim >= 2``, real floating dtype.
    rank : int, float, sequence or policy
        See :mod:`tensorcompress.rank`. Thresholds (floats) are resolved by the
        cold start; with a warm start they keep the warm start's ranks. An int
        rank that differs from the warm start's pads or cuts its subspace.
    warm_start : TuckerResult, optional
        A previous result (typically the previous training step's); its factors
        are the starting subspaces. Modes may have changed size (a smaller last
        batch): rows are then cut or padded and re-orthonormalised. ``None``
        runs the cold start: the exact ST-HOSVD, deterministic and without
        iterations (``n_iter`` of the result is 0).
    n_iter : int, optional
        Subspace-iteration steps per mode of a warm step (1 when not given).
        Only with ``warm_start``: the cold start is exact, so an ``n_iter``
        there could not change it and is refused rather than ignored.
    seed : int, numpy Generator or None
        Seeds the Gaussian rows or columns that pad a warm start's subspaces
        (rank or size changes). Only with ``warm_start``, like ``n_iter``.
        Never touches the global RNG.
    product_dtype : dtype, optional
        The dtype the tensor products run in (the input is cast once, each
        factor as it is used), in the cold start (see
        :func:`tensorcompress.hosvd.decompose`) and the warm steps:
        ``torch.bfloat16`` runs them on a CPU's AMX or a GPU's tensor cores.
        The bases are orthonormalised, the energies summed and the result
        returned in ``x``'s dtype. ``None`` (the default) computes in ``x``'s
        dtype. The subspaces then carry the products' rounding (about 1e-3
        relative for bfloat16), far below what a truncated decomposition
        leaves out; ``benchmarks/test_decompositions.py --product-dtype
        bfloat16`` prints the errors and speed-ups.
    check_finite : bool, default True
        Refuse NaN/Inf input (costs one pass over ``x``).

    Returns
    -------
    TuckerResult
        ``explained_variance`` has one float per mode: for a warm step, the
        fraction of the energy of the tensor mode k saw (already projected in
        the earlier modes) that the new factor keeps, read off the Gram
        matrices or the norms the step computes anyway (so the fractions
        multiply to the share of ``x``'s energy the core keeps); for the cold
        start, as in HOSVD. A mode kept whole reports 1.0.

    Raises
    ------
    TypeError, ValueError
        On a bad tensor, rank, ``n_iter`` or warm start, naming the argument;
        ``ValueError`` for ``n_iter`` or ``seed`` given without ``warm_start``.
        In a loop, start with ``decompose(x, rank)`` and pass ``n_iter`` and
        ``seed`` from the second call on.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorcompress import asi
    >>> rng = np.random.default_rng(0)
    >>> first = asi.decompose(rng.standard_normal((16, 8, 5, 5)), 0.8)
    >>> nxt = asi.decompose(rng.standard_normal((16, 8, 5, 5)), 0.8, warm_start=first)
    >>> nxt.ranks == first.ranks
    True
    """
    xp = check_tensor(x, "x", check_finite=check_finite)
    if n_iter is not None and (
        isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0
    ):
        raise ValueError(f"n_iter must be a non-negative int, got {n_iter!r}")
    ranks = _rank.resolve(rank, tuple(x.shape))
    if warm_start is None:
        for name, value in (("n_iter", n_iter), ("seed", seed)):
            if value is not None:
                raise ValueError(
                    f"{name}={value!r} has no effect without a warm_start: the cold start is "
                    "the exact ST-HOSVD (no iterations, nothing random); pass it only with "
                    "warm_start"
                )
        return hosvd.decompose(x, ranks, product_dtype=product_dtype, check_finite=False)
    if not isinstance(warm_start, TuckerResult):
        raise TypeError(
            f"warm_start must be a TuckerResult or None, got {type(warm_start).__name__}"
        )
    if len(warm_start.factors) != x.ndim:
        raise ValueError(
            f"warm_start has {len(warm_start.factors)} factors but x has {x.ndim} modes "
            f"(shape {tuple(x.shape)})"
        )
    for k, u in enumerate(warm_start.factors):
        if u.ndim != 2:
            raise ValueError(
                f"warm_start.factors[{k}] must be a matrix, got shape {tuple(u.shape)}"
            )
    step_ranks = _step_ranks(ranks, warm_start)
    for k, (r, n) in enumerate(zip(step_ranks, x.shape)):
        if r > n:
            raise ValueError(
                f"warm_start rank {r} of mode {k} is larger than the mode's dimension {n}; "
                "pass an int rank or a new cold start"
            )
    steps = 1 if n_iter is None else n_iter
    xc = as_compute(xp, x)
    core, factors, explained = _warm_step(
        xp, xc, warm_start, step_ranks, steps, _rng(seed), Casts.of(xp, xc, product_dtype)
    )
    return TuckerResult(
        core=cast(xp, core, x.dtype),
        factors=tuple(cast(xp, u, x.dtype) for u in factors),
        explained_variance=tuple(explained),
        n_iter=steps,
    )
