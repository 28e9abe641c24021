"""Higher-order SVD (HOSVD) and sequentially truncated HOSVD (ST-HOSVD).

Each mode's basis comes from the symmetric eigendecomposition of the smaller
Gram matrix of the mode's unfolding: ``A A^T`` when it is short and wide (the
usual activation case), ``A^T A`` followed by ``qr(A V_r)`` when it is tall.
Both give the SVD's subspaces and spectrum at a fraction of its cost.
With ``sequential=True`` and fixed ranks each mode works on the tensor already
truncated in the earlier modes, which is much cheaper and never worse than the
HOSVD error bound. Explained-variance thresholds are defined on the unfoldings
of the tensor itself, so their modes are computed on it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorcompress import rank as _rank
from tensorcompress import tenalg
from tensorcompress._array import (
    Array,
    as_compute,
    cast,
    check_tensor,
    device,
    to_numpy,
)
from tensorcompress.results import TuckerResult

__all__ = ["decompose", "mode_order"]


# A product narrower than this is bound by memory traffic, not arithmetic: one
# pass over the tensor costs about as much as a product this wide.
_MIN_WIDTH = 16


def _pass(size: int, width: int, batched: bool) -> int:
    # A middle mode runs as many small batched products, about half as fast
    # as one large product on these shapes.
    return size * max(width, _MIN_WIDTH) * (2 if batched else 1)


def gram_is_cheaper(shape: Sequence[int], mode: int, rank: int) -> bool:
    """Whether a subspace-iteration step should use the Gram matrix (one wide
    pass over the tensor) rather than two thin products (two narrow passes)."""
    n = int(shape[mode])
    batched = math.prod(shape[:mode]) > 1 and math.prod(shape[mode + 1 :]) > 1
    size = math.prod(shape)
    return _pass(size, n, batched) <= 2 * _pass(size, rank, batched)


def step_cost(shape: Sequence[int], mode: int, rank: int, iterate: bool) -> int:
    """Estimated cost of one mode's step on a tensor of ``shape``.

    An exact basis needs the Gram matrix (one pass of width ``dim``); a
    subspace-iteration step the cheaper of that and two thin products (two
    passes of width ``rank``). Both then project (a pass of width ``rank``).
    Counted in multiply-adds, with narrow and batched products charged as
    memory-bound (see ``_MIN_WIDTH``).
    """
    n, size = int(shape[mode]), math.prod(shape)
    batched = math.prod(shape[:mode]) > 1 and math.prod(shape[mode + 1 :]) > 1
    gram = _pass(size, n, batched)
    basis = min(gram, 2 * _pass(size, rank, batched)) if iterate else gram
    return basis + _pass(size, rank, batched)


def mode_order(
    shape: Sequence[int], ranks: Sequence[_rank.ModeRank], iterate: bool = False
) -> list[int]:
    """Order in which sequential algorithms visit the modes.

    The order of least :func:`step_cost` (found by enumeration up to 6 modes,
    greedily beyond), since each mode works on the tensor already truncated in
    the modes before it. Modes chosen by a threshold, whose rank is not known
    yet, come last, smallest first.
    """
    fixed = [k for k in range(len(shape)) if isinstance(ranks[k], int)]
    rest = sorted((k for k in range(len(shape)) if k not in fixed), key=lambda k: shape[k])

    def total(order: Sequence[int]) -> int:
        current, cost = [int(n) for n in shape], 0
        for k in order:
            r = int(ranks[k])
            cost += step_cost(current, k, r, iterate)
            current[k] = r
        return cost

    if len(fixed) <= 6:
        best = min(itertools.permutations(fixed), key=total)
    else:
        best, left = (), list(fixed)
        while left:
            k = min(left, key=lambda m: total((*best, m)))
            best, left = (*best, k), [m for m in left if m != k]
    return [*best, *rest]


def mode_basis(xp: Any, t: Array, mode: int, rank: _rank.ModeRank) -> tuple[Array, float]:
    """Leading left singular vectors of ``unfold(t, mode)`` and their explained variance.

    Parameters
    ----------
    xp : namespace
        Array namespace of ``t``.
    t : array
        Tensor (float32 or float64).
    mode : int
        Mode whose basis to compute.
    rank : int or float
        Fixed rank, or explained-variance threshold in (0, 1].

    Returns
    -------
    factor : array
        ``(t.shape[mode], r)`` with orthonormal columns.
    explained : float
        Fraction of the unfolding's squared singular values that ``r`` keeps.
    """
    n = int(t.shape[mode])
    q = math.prod(t.shape) // n
    rtol = 4 * float(xp.finfo(t.dtype).eps)
    if n <= q:
        # Short and wide: the n x n Gram's eigenvectors are the left singular
        # vectors and its eigenvalues the squared singular values.
        w, v = xp.linalg.eigh(tenalg.gram(t, mode, xp=xp))
        sv2 = np.clip(to_numpy(w)[::-1], 0.0, None)
        r = rank if isinstance(rank, int) else _rank.rank_for_threshold(sv2, rank, rtol)
        return xp.flip(v[:, n - r :], axis=1), _explained(sv2, r)
    # Tall: the q x q Gram of the other side is smaller (and the tensor small
    # enough that unfolding it is cheap); U_r = qr(A V_r). QR also completes
    # the basis when r exceeds the unfolding's rank q.
    a = tenalg.unfold(t, mode, xp=xp)
    w, v = xp.linalg.eigh(xp.matrix_transpose(a) @ a)
    sv2 = np.concatenate([np.clip(to_numpy(w)[::-1], 0.0, None), np.zeros(n - q)])
    r = rank if isinstance(rank, int) else _rank.rank_for_threshold(sv2, rank, rtol)
    m = min(r, q)
    y = a @ xp.flip(v[:, q - m :], axis=1)
    if r > m:
        y = xp.concat([y, xp.zeros((n, r - m), dtype=y.dtype, device=device(y))], axis=1)
    u, _ = xp.linalg.qr(y)
    return u, _explained(sv2, r)


def _explained(sv2: np.ndarray, r: int) -> float:
    return float(_rank.explained_variance(sv2)[r - 1])


def _truncate(
    xp: Any, x: Array, ranks: Sequence[_rank.ModeRank], sequential: bool
) -> tuple[Array, list[Array], list[float]]:
    ndim = x.ndim
    factors: list[Any] = [None] * ndim
    explained = [1.0] * ndim
    t = x
    for k in mode_order(tuple(x.shape), ranks):
        n, r = int(x.shape[k]), ranks[k]
        if r == n and isinstance(r, int):
            # Keeping a mode whole needs no decomposition: the identity is a basis.
            factors[k] = xp.eye(n, dtype=x.dtype, device=device(x))
            continue
        # A threshold is defined on x's own unfolding (the textbook rule), so
        # its rank and basis come from x; fixed ranks use the truncated tensor.
        source = t if sequential and isinstance(r, int) else x
        u, explained[k] = mode_basis(xp, source, k, r)
        factors[k] = u
        if sequential:
            t = tenalg.mode_dot(t, xp.matrix_transpose(u), k, xp=xp)
    if not sequential:
        t = tenalg.multi_mode_dot(x, factors, transpose=True, xp=xp)
    return t, factors, explained


def decompose(
    x: Array,
    rank: _rank.RankLike,
    *,
    sequential: bool = True,
    check_finite: bool = True,
) -> TuckerResult:
    """Tucker decomposition by (sequentially truncated) higher-order SVD.

    Parameters
    ----------
    x : array
        numpy array or torch tensor with ``ndim >= 2``, real floating dtype.
        float16/bfloat16 are computed in float32.
    rank : int, float, sequence or policy
        See :mod:`tensorcompress.rank`. A float is an explained-variance
        threshold, applied to the spectrum of ``x``'s own mode-k unfolding (the
        textbook rule) in both variants, so the ranks do not depend on
        ``sequential``.
    sequential : bool, default True
        ST-HOSVD when True, textbook HOSVD (every mode on ``x``) when False.
    check_finite : bool, default True
        Refuse NaN/Inf input (costs one pass over ``x``).

    Returns
    -------
    TuckerResult
        Core and factors in ``x``'s backend, device and dtype;
        ``explained_variance[k]`` is the fraction of the squared singular
        values kept, of ``x``'s mode-k unfolding (thresholds, or
        ``sequential=False``) or of the partially truncated tensor's (fixed
        ranks with ``sequential=True``).

    Raises
    ------
    TypeError, ValueError
        On a bad tensor or rank, naming the argument.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorcompress import hosvd
    >>> x = np.random.default_rng(0).standard_normal((8, 6, 5))
    >>> res = hosvd.decompose(x, 0.9)
    >>> res.reconstruct().shape
    (8, 6, 5)
    """
    xp = check_tensor(x, "x", check_finite=check_finite)
    ranks = _rank.resolve(rank, tuple(x.shape))
    core, factors, explained = _truncate(xp, as_compute(xp, x), ranks, sequential)
    return TuckerResult(
        core=cast(xp, core, x.dtype),
        factors=tuple(cast(xp, u, x.dtype) for u in factors),
        explained_variance=tuple(explained),
    )
