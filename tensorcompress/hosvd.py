"""Higher-order SVD (HOSVD) and sequentially truncated HOSVD (ST-HOSVD).

Each mode's basis comes from the symmetric eigendecomposition of the smaller
Gram matrix of the mode's unfolding: ``A A^T`` when it is short and wide (the
usual activation case), ``A^T A`` followed by ``qr(A V_r)`` when it is tall.
Both give the SVD's subspaces and spectrum at a fraction of its cost.
With ``sequential=True`` and fixed ranks each mode works on the tensor already
truncated in the earlier modes, which is much cheaper and never worse than the
HOSVD error bound; the order and the small trailing modes visited jointly
(one Gram matrix for a 7 x 7 spatial pair) follow the plan of
``tensorcompress._sweep``. Explained-variance thresholds are defined on the
unfoldings of the tensor itself, so their modes are computed on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorcompress import _sweep, tenalg
from tensorcompress import rank as _rank
from tensorcompress._array import (
    Array,
    Casts,
    as_compute,
    cast,
    check_tensor,
    device,
    to_numpy,
)
from tensorcompress.results import TuckerResult

__all__ = ["decompose"]


def _mode_basis(
    xp: Any, t: Array, mode: int, rank: _rank.ModeRank, casts: Casts
) -> tuple[Array, float]:
    """Leading left singular vectors of ``unfold(t, mode)`` and their explained variance.

    Parameters
    ----------
    xp : namespace
        Array namespace of ``t``.
    t : array
        Tensor, in the products' dtype (``casts.low``).
    mode : int
        Mode whose basis to compute.
    rank : int or float
        Fixed rank, or explained-variance threshold in (0, 1].
    casts : Casts
        The products' and the results' dtypes.

    Returns
    -------
    factor : array
        ``(t.shape[mode], r)`` with orthonormal columns.
    explained : float
        Fraction of the unfolding's squared singular values that ``r`` keeps.
    """
    n = int(t.shape[mode])
    q = math.prod(t.shape) // n
    if n <= q:
        # Short and wide: the n x n Gram's eigenvectors are the left singular
        # vectors and its eigenvalues the squared singular values.
        return _gram_basis(xp, casts.to_high(tenalg.gram(t, mode, xp=xp)), rank)
    # Tall: the q x q Gram of the other side is smaller (and the tensor small
    # enough that unfolding it is cheap); U_r = qr(A V_r). QR also completes
    # the basis when r exceeds the unfolding's rank q.
    a = tenalg.unfold(t, mode, xp=xp)
    w, v = xp.linalg.eigh(casts.to_high(xp.matrix_transpose(a) @ a))
    sv2 = np.concatenate([np.clip(to_numpy(w)[::-1], 0.0, None), np.zeros(n - q)])
    r = rank if isinstance(rank, int) else _rank.rank_for_threshold(sv2, rank, _rtol(xp, w))
    m = min(r, q)
    y = casts.to_high(a @ casts.to_low(xp.flip(v[:, q - m :], axis=1)))
    if r > m:
        y = xp.concat([y, xp.zeros((n, r - m), dtype=y.dtype, device=device(y))], axis=1)
    u, _ = xp.linalg.qr(y)
    return u, _explained(sv2, r)


def _gram_basis(xp: Any, g: Array, rank: _rank.ModeRank) -> tuple[Array, float]:
    """Leading eigenvectors of the Gram matrix ``g = A A^T`` and their explained variance.

    The eigenvectors are ``A``'s left singular vectors, the eigenvalues its
    squared singular values; ``rank`` is a fixed rank or a threshold.
    """
    n = int(g.shape[0])
    w, v = xp.linalg.eigh(g)
    sv2 = np.clip(to_numpy(w)[::-1], 0.0, None)
    r = rank if isinstance(rank, int) else _rank.rank_for_threshold(sv2, rank, _rtol(xp, g))
    return xp.flip(v[:, n - r :], axis=1), _explained(sv2, r)


def _rtol(xp: Any, a: Array) -> float:
    # Singular values this far below the largest are rounding noise of a's
    # dtype (with product_dtype, the products' rounding is larger; a
    # threshold of 1.0 then keeps a little of it).
    return 4 * float(xp.finfo(a.dtype).eps)


def _explained(sv2: np.ndarray, r: int) -> float:
    return float(_rank.explained_variance(sv2)[r - 1])


def _truncate(
    xp: Any, x: Array, ranks: Sequence[_rank.ModeRank], sequential: bool, casts: Casts
) -> tuple[Array, list[Array], list[float]]:
    ndim = x.ndim
    x = casts.to_low(x)  # the one cast of the input (none without product_dtype)
    if not sequential:
        factors, explained = zip(*(_basis(xp, x, k, ranks[k], casts) for k in range(ndim)))
        core = tenalg.multi_mode_dot(x, [casts.to_low(u) for u in factors], transpose=True, xp=xp)
        return casts.to_high(core), list(factors), list(explained)

    def block_basis(k: int, g: Array) -> tuple[Array, float]:
        return _gram_basis(xp, casts.to_high(g), ranks[k])

    def sweep(steps: _sweep.Plan) -> tuple[Array, list[Array], list[float]]:
        factors: list[Any] = [None] * ndim
        explained = [1.0] * ndim
        t = x
        for step in steps:
            if len(step.modes) > 1:
                # Small trailing modes with fixed ranks, visited jointly.
                t, block, block_explained = _sweep.block_sweep(
                    xp, t, step.modes, ranks, block_basis
                )
                for k in step.modes:
                    factors[k], explained[k] = block[k], block_explained[k]
                continue
            (k,) = step.modes
            # A threshold is defined on x's own unfolding (the textbook rule), so
            # its rank and basis come from x; fixed ranks use the truncated tensor.
            source = t if isinstance(ranks[k], int) else x
            factors[k], explained[k] = _basis(xp, source, k, ranks[k], casts)
            if not _whole(ranks[k], int(x.shape[k])):
                t = tenalg.mode_dot(t, casts.to_low(xp.matrix_transpose(factors[k])), k, xp=xp)
        return casts.to_high(t), factors, explained

    return _sweep.run(x, tuple(ranks), False, sweep)


def _whole(rank: _rank.ModeRank, dim: int) -> bool:
    return isinstance(rank, int) and rank == dim


def _basis(xp: Any, t: Array, k: int, rank: _rank.ModeRank, casts: Casts) -> tuple[Array, float]:
    if _whole(rank, int(t.shape[k])):
        # Keeping a mode whole needs no decomposition: the identity is a basis.
        return xp.eye(int(t.shape[k]), dtype=casts.high, device=device(t)), 1.0
    return _mode_basis(xp, t, k, rank, casts)


def decompose(
    x: Array,
    rank: _rank.RankLike,
    *,
    sequential: bool = True,
    product_dtype: Any = None,
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
    product_dtype : dtype, optional
        The dtype the tensor products (Gram matrices, projections) run in:
        the input is cast once, each factor as it is used.
        ``torch.bfloat16`` runs them on a CPU's AMX or a GPU's tensor cores.
        The eigendecompositions, the bases and the result stay in ``x``'s
        dtype. ``None`` (the default): ``x``'s dtype. The Gram matrices then
        carry the products' rounding (about 1e-3 relative for bfloat16), so
        the result is near the exact one, not equal to it, and a threshold
        can pick a rank one off where a singular value sits at the cut.
    check_finite : bool, default True
        Refuse NaN/Inf input (costs one pass over ``x``).

    Returns
    -------
    TuckerResult
        Core and factors in ``x``'s backend, device and dtype;
        ``explained_variance`` has one float per mode: the fraction of the
        squared singular values kept, of ``x``'s mode-k unfolding (thresholds,
        or ``sequential=False``) or of the partially truncated tensor's (fixed
        ranks with ``sequential=True``); 1.0 for a mode kept whole.

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
    xc = as_compute(xp, x)
    core, factors, explained = _truncate(xp, xc, ranks, sequential, Casts.of(xp, xc, product_dtype))
    return TuckerResult(
        core=cast(xp, core, x.dtype),
        factors=tuple(cast(xp, u, x.dtype) for u in factors),
        explained_variance=tuple(explained),
    )
