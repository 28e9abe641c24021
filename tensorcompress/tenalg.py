"""Tensor algebra in C order, written for the BLAS.

Mode-k unfolding follows TensorLy: ``unfold(x, k)`` moves mode k to the front
and reshapes in C order. The products below never build that unfolding; they
view the tensor as ``(P, n_k, Q)`` (a free reshape of a contiguous array) and
use (batched) matrix products on it, so no permuted copy of a large tensor is
made.

Products with a tiny side (a 6-wide output, a trailing block of 4) run far
below the BLAS's speed on CPU, so such products are widened with a Kronecker
factor of an identity: a few times more multiply-adds in one well-shaped
product take less time than many narrow ones (``python
benchmarks/test_decompositions.py`` prints the trade: its ``(flops)`` column
against its speed-ups).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tensorcompress._array import Array, device, namespace, to_float

__all__ = [
    "cross_gram",
    "fold",
    "gram",
    "kron",
    "mode_dot",
    "multi_mode_dot",
    "partial_trace",
    "relative_error",
    "tucker_to_tensor",
    "unfold",
]


# Measured on torch's CPU BLAS (MKL). An output narrower than _NARROW is
# widened (last mode). A middle mode followed by a trailing block of at most
# _SHORT_PRODUCT entries is not run as p tiny products: a small mode is folded
# into one product (kron with I_q, at most _FOLDED wide, q times the
# multiply-adds), a large one contracted on a mode-first copy. The Gram matrix
# of a mode followed by at most _SHORT_GRAM entries is folded the same way.
_NARROW = 12
_SHORT_PRODUCT = 6
_SHORT_GRAM = 4
_FOLDED = 512
_FOLDED_GRAM = 128


def _split(shape: Sequence[int], mode: int) -> tuple[int, int, int]:
    return math.prod(shape[:mode]), int(shape[mode]), math.prod(shape[mode + 1 :])


def _widening(p: int, n: int, r: int) -> int:
    # Rows grouped by m turn a (p, n) @ (n, r) product into
    # (p/m, m n) @ (m n, m r): the smallest divisor m of p that makes the
    # output wide while the contracted side stays at most 64 wide.
    if r >= _NARROW:
        return 1
    for m in range(2, 9):
        if p % m == 0 and m * r >= _NARROW and m * n <= 64:
            return m
    return 1


def kron(a: Array, b: Array, *, xp: Any = None) -> Array:
    """Kronecker product of two matrices (C order: ``b``'s index varies fastest)."""
    xp = xp or namespace(a)
    rows, cols = int(a.shape[0]) * int(b.shape[0]), int(a.shape[1]) * int(b.shape[1])
    return xp.reshape(a[:, None, :, None] * b[None, :, None, :], (rows, cols))


def _eye(xp: Any, n: int, like: Array) -> Array:
    return xp.eye(n, dtype=like.dtype, device=device(like))


def unfold(x: Array, mode: int, *, xp: Any = None) -> Array:
    """Return the mode-``mode`` unfolding, shape ``(x.shape[mode], -1)``, C order."""
    xp = xp or namespace(x)
    return xp.reshape(xp.moveaxis(x, mode, 0), (x.shape[mode], -1))


def fold(matrix: Array, mode: int, shape: Sequence[int], *, xp: Any = None) -> Array:
    """Inverse of :func:`unfold`: refold ``matrix`` into a tensor of ``shape``."""
    xp = xp or namespace(matrix)
    shape = tuple(int(n) for n in shape)
    moved = (shape[mode], *shape[:mode], *shape[mode + 1 :])
    return xp.moveaxis(xp.reshape(matrix, moved), 0, mode)


def mode_dot(x: Array, matrix: Array, mode: int, *, xp: Any = None) -> Array:
    """Mode-``mode`` product ``x x_mode matrix``.

    Parameters
    ----------
    x : array
        Tensor of shape ``(..., n, ...)`` with ``n = x.shape[mode]``.
    matrix : array
        Matrix of shape ``(r, n)``.
    mode : int
        Mode to contract.

    Returns
    -------
    array
        Tensor with ``x.shape[mode]`` replaced by ``r``.
    """
    xp = xp or namespace(x)
    shape = tuple(int(n) for n in x.shape)
    p, n, q = _split(shape, mode)
    r = int(matrix.shape[0])
    if q == 1:
        m = _widening(p, n, r)
        op = xp.matrix_transpose(matrix)
        if m > 1:
            op = kron(_eye(xp, m, op), op, xp=xp)
        out = xp.reshape(x, (p // m, m * n)) @ op
    elif p == 1:
        out = matrix @ xp.reshape(x, (n, q))
    elif q <= _SHORT_PRODUCT and n * q <= _FOLDED:
        op = xp.matrix_transpose(matrix)
        out = xp.reshape(x, (p, n * q)) @ kron(op, _eye(xp, q, op), xp=xp)
    elif q <= _SHORT_PRODUCT:
        first = xp.reshape(xp.moveaxis(xp.reshape(x, (p, n, q)), 1, 0), (n, p * q))
        out = xp.moveaxis(xp.reshape(matrix @ first, (r, p, q)), 0, 1)
    else:
        out = matrix @ xp.reshape(x, (p, n, q))
    return xp.reshape(out, (*shape[:mode], r, *shape[mode + 1 :]))


def multi_mode_dot(
    x: Array,
    matrices: Sequence[Array | None],
    *,
    transpose: bool = False,
    xp: Any = None,
) -> Array:
    """Apply ``mode_dot`` on every mode whose matrix is not ``None``.

    With ``transpose=True`` each matrix ``U_k`` of shape ``(n_k, r_k)`` is used
    as ``U_k^T`` (projection onto the factor's columns).
    """
    xp = xp or namespace(x)
    for mode, m in enumerate(matrices):
        if m is not None:
            x = mode_dot(x, xp.matrix_transpose(m) if transpose else m, mode, xp=xp)
    return x


def tucker_to_tensor(core: Array, factors: Sequence[Array], *, xp: Any = None) -> Array:
    """Rebuild the full tensor ``core x_0 U_0 ... x_{N-1} U_{N-1}``.

    Modes are expanded from the smallest growth factor to the largest so the
    intermediates stay small.
    """
    xp = xp or namespace(core)
    order = sorted(range(len(factors)), key=lambda k: factors[k].shape[0] / factors[k].shape[1])
    for k in order:
        core = mode_dot(core, factors[k], k, xp=xp)
    return core


def cross_gram(x: Array, y: Array, mode: int, *, xp: Any = None) -> Array:
    """Return ``unfold(x, mode) @ unfold(y, mode).T`` without unfolding.

    ``x`` and ``y`` must agree on every mode but ``mode``.
    """
    xp = xp or namespace(x)
    shape = tuple(int(n) for n in x.shape)
    p, n, q = _split(shape, mode)
    m = int(y.shape[mode])
    if q == 1:
        # (y^T x)^T, not x^T y: BLAS runs a long contraction with the
        # transposed operand on the left several times faster (measured 6x
        # for (172032 x 28)^T (172032 x 8) on torch's CPU BLAS).
        if x is y:
            x2 = xp.reshape(x, (p, n))
            return xp.matrix_transpose(x2) @ x2
        return xp.matrix_transpose(
            xp.matrix_transpose(xp.reshape(y, (p, m))) @ xp.reshape(x, (p, n))
        )
    if p == 1:
        return xp.reshape(x, (n, q)) @ xp.matrix_transpose(xp.reshape(y, (m, q)))
    if q <= _SHORT_GRAM and max(n, m) * q <= _FOLDED_GRAM:
        # One product over (p, n q) x (p, m q), then the trace over the q pairs.
        xf, yf = xp.reshape(x, (p, n * q)), xp.reshape(y, (p, m * q))
        if x is y:
            full = xp.matrix_transpose(xf) @ xf
        else:  # (y^T x)^T, as for the last mode below
            full = xp.matrix_transpose(xp.matrix_transpose(yf) @ xf)
        return partial_trace(xp.reshape(full, (n, q, m, q)), xp=xp)
    x3 = xp.reshape(x, (p, n, q))
    y3 = xp.reshape(y, (p, m, q))
    if n * m <= q * (n + (0 if x is y else m)):
        # One batched product summed over the leading modes, when its
        # (p, n, m) temporary is no larger than mode-first copies would be.
        return xp.sum(x3 @ xp.matrix_transpose(y3), axis=0)
    # Short trailing modes: contract (p, q) with one GEMM on mode-first copies
    # (one copy for a Gram matrix).
    xf = xp.reshape(xp.moveaxis(x3, 1, 0), (n, p * q))
    if x is y:
        return xf @ xp.matrix_transpose(xf)
    yf = xp.reshape(xp.moveaxis(y3, 1, 0), (m, p * q))
    return xf @ xp.matrix_transpose(yf)


def partial_trace(g: Array, *, xp: Any = None) -> Array:
    """Sum ``g[:, j, :, j]`` over ``j``, for ``g`` of shape ``(a, s, b, s)``.

    The Gram matrix of one mode out of the Gram matrix of a block of modes.
    """
    xp = xp or namespace(g)
    return xp.sum(xp.linalg.diagonal(xp.permute_dims(g, (0, 2, 1, 3))), axis=-1)


def gram(x: Array, mode: int, *, xp: Any = None) -> Array:
    """Return the Gram matrix ``unfold(x, mode) @ unfold(x, mode).T``."""
    return cross_gram(x, x, mode, xp=xp)


def relative_error(x: Array, approx: Array) -> float:
    """Return ``||x - approx|| / ||x||`` in float64 arithmetic (0 for a zero ``x``)."""
    xp = namespace(x)
    xd = xp.astype(x, xp.float64)
    diff = to_float(xp.linalg.vector_norm(xd - xp.astype(approx, xp.float64)))
    norm = to_float(xp.linalg.vector_norm(xd))
    return diff / norm if norm > 0 else diff
