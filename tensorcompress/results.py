"""Frozen result types shared by every decomposition."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tensorcompress import tenalg
from tensorcompress._array import Array, namespace

__all__ = ["SVDResult", "TuckerResult"]


def _nbytes(a: Array) -> int:
    return math.prod(a.shape) * int(a.dtype.itemsize)


@dataclass(frozen=True)
class TuckerResult:
    """A Tucker decomposition ``X ~ core x_0 U_0 x_1 U_1 ... x_{N-1} U_{N-1}``.

    Attributes
    ----------
    core : array
        Core tensor of shape ``ranks``.
    factors : tuple of arrays
        One factor per mode, ``U_k`` of shape ``(shape[k], ranks[k])`` with
        orthonormal columns.
    explained_variance : tuple of float or None
        Always one entry per mode: the fraction of the mode-k energy the
        factor keeps (a mode kept whole keeps 1.0). Every decomposition fills
        it (see each algorithm's docs for which tensor's energy); a result
        built from arrays without it gets ``None`` per mode (not known).
    n_iter : int
        Subspace-iteration steps run per mode (0 for exact decompositions).

    Unpacks as ``core, factors = result``.

    Raises
    ------
    ValueError
        If ``explained_variance`` is given with a number of entries other
        than the number of factors.
    """

    core: Array
    factors: tuple[Array, ...]
    explained_variance: tuple[float | None, ...] = field(default=())
    n_iter: int = 0

    def __post_init__(self) -> None:
        n = len(self.factors)
        explained = tuple(self.explained_variance)
        if not explained:
            explained = (None,) * n  # built from arrays: nothing measured it
        elif len(explained) != n:
            raise ValueError(
                f"explained_variance has {len(explained)} entries but there are {n} factors; "
                "give one per mode, or none"
            )
        object.__setattr__(self, "explained_variance", explained)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Rank kept in each mode (the core's shape)."""
        return tuple(int(n) for n in self.core.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the decomposed (and reconstructed) tensor."""
        return tuple(int(u.shape[0]) for u in self.factors)

    @property
    def nbytes(self) -> int:
        """Bytes held by the core and the factors."""
        return _nbytes(self.core) + sum(_nbytes(u) for u in self.factors)

    def reconstruct(self) -> Array:
        """Return the full tensor ``core x_0 U_0 ... x_{N-1} U_{N-1}``."""
        return tenalg.tucker_to_tensor(self.core, self.factors)

    def relative_error(self, x: Array) -> float:
        """Return ``||x - reconstruct()|| / ||x||`` (0 when ``x`` is zero)."""
        return tenalg.relative_error(x, self.reconstruct())

    def to_tensorly(self) -> Any:
        """Return the same arrays as a ``tensorly.tucker_tensor.TuckerTensor``."""
        from tensorly.tucker_tensor import TuckerTensor

        return TuckerTensor((self.core, list(self.factors)))

    def __iter__(self) -> Iterator[Any]:
        return iter((self.core, self.factors))


@dataclass(frozen=True)
class SVDResult:
    """A truncated SVD ``X_(mode) ~ U diag(S) Vh`` of a matrix or a tensor unfolding.

    Attributes
    ----------
    U : array
        Left singular vectors, ``(shape[mode], rank)``.
    S : array
        Singular values in descending order, ``(rank,)``.
    Vh : array
        Right singular vectors, ``(rank, prod(other dims))``.
    shape : tuple of int
        Shape of the decomposed tensor.
    mode : int
        Mode whose unfolding was decomposed.
    explained_variance : float or None
        Fraction of the squared singular values kept, where known (``None`` for
        the randomized method, which never sees the full spectrum).

    Unpacks as ``U, S, Vh = result``.
    """

    U: Array
    S: Array
    Vh: Array
    shape: tuple[int, ...]
    mode: int = 0
    explained_variance: float | None = None

    @property
    def ranks(self) -> tuple[int]:
        """The kept rank, as a 1-tuple."""
        return (int(self.S.shape[0]),)

    @property
    def nbytes(self) -> int:
        """Bytes held by ``U``, ``S`` and ``Vh``."""
        return _nbytes(self.U) + _nbytes(self.S) + _nbytes(self.Vh)

    def reconstruct(self) -> Array:
        """Return ``U diag(S) Vh`` folded back to ``shape``."""
        xp = namespace(self.U)
        matrix = (self.U * self.S[None, :]) @ self.Vh
        return tenalg.fold(matrix, self.mode, self.shape, xp=xp)

    def relative_error(self, x: Array) -> float:
        """Return ``||x - reconstruct()|| / ||x||`` (0 when ``x`` is zero)."""
        return tenalg.relative_error(x, self.reconstruct())

    def to_tensorly(self) -> Any:
        """Return the unfolding's SVD as a rank-``r`` ``tensorly.cp_tensor.CPTensor``.

        The CP tensor has the unfolding's shape; ``tensorly.fold(cp.to_tensor(),
        mode, shape)`` gives the tensor back.
        """
        from tensorly.cp_tensor import CPTensor

        xp = namespace(self.U)
        return CPTensor((self.S, [self.U, xp.matrix_transpose(self.Vh)]))

    def __iter__(self) -> Iterator[Any]:
        return iter((self.U, self.S, self.Vh))
