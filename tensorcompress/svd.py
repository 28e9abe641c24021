"""Truncated SVD of a matrix or of one unfolding of a tensor."""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import numpy as np

from tensorcompress import rank as _rank
from tensorcompress import tenalg
from tensorcompress._array import (
    Array,
    as_compute,
    cast,
    check_tensor,
    from_numpy,
    to_numpy,
)
from tensorcompress.results import SVDResult

__all__ = ["decompose"]


def _check_rank(rank: Any, mode: int, shape: tuple[int, ...]) -> int | float:
    rows = shape[mode]
    cols = math.prod(shape) // rows
    max_rank = min(rows, cols)
    if isinstance(rank, (_rank.Fixed, _rank.ExplainedVariance)):
        rank = rank.rank if isinstance(rank, _rank.Fixed) else rank.threshold
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise TypeError(
            "rank must be an int or a float in (0, 1] for a truncated SVD, "
            f"got {type(rank).__name__} {rank!r}"
        )
    if isinstance(rank, numbers.Integral):
        r = int(rank)
        if r < 1 or r > max_rank:
            # Never clipped: a rank above the unfolding's smaller side is a mistake.
            raise ValueError(
                f"rank must be an int in [1, {max_rank}] for this unfolding, got {r} "
                f"(mode {mode} of shape {shape}, unfolding {rows} x {cols})"
            )
        return r
    if not 0.0 < float(rank) <= 1.0:
        raise ValueError(f"rank as a float must be in (0, 1], got {rank}")
    return float(rank)


def _randomized(
    xp: Any,
    a: Array,
    rank: int,
    n_oversamples: int,
    n_power_iter: int,
    rng: np.random.Generator,
) -> tuple[Array, Array, Array]:
    # Halko, Martinsson & Tropp (2011), algorithm 4.4: range finder with
    # QR-stabilised power iterations, then an exact SVD of the small projection.
    m, n = int(a.shape[0]), int(a.shape[1])
    k = min(rank + n_oversamples, m, n)
    omega = from_numpy(xp, rng.standard_normal((n, k)), a)
    q, _ = xp.linalg.qr(a @ omega)
    at = xp.matrix_transpose(a)
    for _ in range(n_power_iter):
        w, _ = xp.linalg.qr(at @ q)
        q, _ = xp.linalg.qr(a @ w)
    ub, s, vh = xp.linalg.svd(xp.matrix_transpose(q) @ a, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank, :]


def decompose(
    x: Array,
    rank: int | float | _rank.Fixed | _rank.ExplainedVariance,
    *,
    mode: int = 0,
    method: Literal["exact", "randomized"] = "exact",
    seed: int | np.random.Generator | None = None,
    n_oversamples: int = 10,
    n_power_iter: int = 2,
    check_finite: bool = True,
) -> SVDResult:
    """Truncated SVD of a matrix, or of the mode-``mode`` unfolding of a tensor.

    Parameters
    ----------
    x : array
        numpy array or torch tensor with ``ndim >= 2``, real floating dtype.
    rank : int or float
        Number of singular triplets kept, at most the unfolding's smaller
        dimension (a larger one is a ``ValueError``, not clipped), or an
        explained-variance threshold in (0, 1] (exact method only: the
        randomized one never sees the whole spectrum).
    mode : int, default 0
        Mode whose unfolding ``(x.shape[mode], -1)`` is decomposed.
    method : {"exact", "randomized"}
        LAPACK thin SVD, or the randomized range finder of Halko et al.
    seed : int, numpy Generator or None
        Randomized method only; never touches the global RNG.
    n_oversamples, n_power_iter : int
        Randomized method only: extra sample columns and power iterations.
    check_finite : bool, default True
        Refuse NaN/Inf input.

    Returns
    -------
    SVDResult
        ``U (n, r)``, ``S (r,)``, ``Vh (r, prod(other dims))`` in ``x``'s
        backend, device and dtype; ``reconstruct()`` gives ``x``'s shape.

    Raises
    ------
    TypeError, ValueError
        On a bad tensor, rank, mode or method, naming the argument; an int
        rank above the unfolding's smaller dimension also names the mode and
        the shape.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorcompress import svd
    >>> m = np.random.default_rng(0).standard_normal((20, 30))
    >>> svd.decompose(m, 5).U.shape
    (20, 5)
    """
    xp = check_tensor(x, "x", check_finite=check_finite)
    ndim = x.ndim
    if isinstance(mode, bool) or not isinstance(mode, numbers.Integral) or not -ndim <= mode < ndim:
        raise ValueError(f"mode must be an int in [{-ndim}, {ndim - 1}], got {mode!r}")
    mode = int(mode) % ndim
    shape = tuple(int(n) for n in x.shape)
    r = _check_rank(rank, mode, shape)
    if method not in ("exact", "randomized"):
        raise ValueError(f"method must be 'exact' or 'randomized', got {method!r}")
    a = tenalg.unfold(as_compute(xp, x), mode, xp=xp)
    explained: float | None
    if method == "exact":
        u, s, vh = xp.linalg.svd(a, full_matrices=False)
        sv2 = to_numpy(s) ** 2
        cum = _rank.explained_variance(sv2)
        rtol = 4 * float(xp.finfo(a.dtype).eps)
        keep = r if isinstance(r, int) else _rank.rank_for_threshold(sv2, r, rtol)
        u, s, vh = u[:, :keep], s[:keep], vh[:keep, :]
        explained = float(cum[keep - 1])
    else:
        if not isinstance(r, int):
            raise ValueError(
                f"rank={r} is a threshold, which needs the full spectrum: "
                "use method='exact' or an int rank"
            )
        gen = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        u, s, vh = _randomized(xp, a, r, n_oversamples, n_power_iter, gen)
        explained = None
    return SVDResult(
        U=cast(xp, u, x.dtype),
        S=cast(xp, s, x.dtype),
        Vh=cast(xp, vh, x.dtype),
        shape=shape,
        mode=mode,
        explained_variance=explained,
    )
