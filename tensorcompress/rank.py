"""Rank arguments and explained-variance rank selection.

Every decomposition accepts the same ``rank`` argument:

- ``int``: that rank in every mode;
- ``float`` in (0, 1]: the smallest rank whose explained variance reaches it,
  chosen per mode;
- a sequence with one entry per mode, each an ``int``, a ``float`` threshold,
  or ``None`` (keep the mode whole);
- a policy object: :class:`Fixed`, :class:`ExplainedVariance`, or anything
  with a ``per_mode(shape)`` method.

The explained variance of rank ``r`` on mode ``k`` is the sum of the ``r``
largest squared singular values of the mode-k unfolding over the sum of all
of them.

An ``int`` rank larger than the dimension of the mode it applies to is a
``ValueError`` (naming the argument, the value, the mode and its size), never
silently clipped: ``rank=16`` on a mode of 8 asks for more than the mode has.
Write ``None`` for a mode to keep whole, or a threshold, when a mode's size
varies (a smaller last batch). The torch adapter applies the same rule.

TensorLy users: there a float ``rank`` (``tucker(x, rank=0.5)``) is the
fraction of the tensor's *parameters* the decomposition keeps. Here a float is
an explained-variance threshold per mode: ``rank=0.5`` keeps, in every mode,
the fewest singular vectors that hold half of that mode's energy, which
usually keeps far fewer parameters than half.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "ExplainedVariance",
    "Fixed",
    "ModeRank",
    "RankLike",
    "RankPolicy",
    "explained_variance",
    "rank_for_threshold",
    "resolve",
]

ModeRank = int | float
"""One mode's resolved rank: an ``int`` rank or a ``float`` threshold in (0, 1]."""


@runtime_checkable
class RankPolicy(Protocol):
    """Anything that maps a tensor shape to one :data:`ModeRank` per mode."""

    def per_mode(self, shape: Sequence[int]) -> tuple[ModeRank, ...]:
        """Return one int rank or float threshold per mode of ``shape``."""
        ...


RankLike = int | float | Sequence[int | float | None] | RankPolicy


def _check_entry(value: Any, where: str, mode: int, shape: tuple[int, ...]) -> ModeRank:
    dim = shape[mode]
    if isinstance(value, bool):
        raise TypeError(f"{where} must be an int, a float in (0, 1] or None, got bool {value}")
    if isinstance(value, numbers.Integral):
        r = int(value)
        if r < 1:
            raise ValueError(f"{where} must be a positive int, got {r}")
        if r > dim:
            raise ValueError(
                f"{where}={r} is larger than the mode's dimension {dim} "
                f"(mode {mode} of shape {shape}); an int rank is never clipped: "
                "give None to keep a mode whole, or a threshold"
            )
        return r
    if isinstance(value, numbers.Real):
        eps = float(value)
        if not 0.0 < eps <= 1.0:
            raise ValueError(f"{where} as a float must be in (0, 1], got {eps}")
        return eps
    raise TypeError(
        f"{where} must be an int, a float in (0, 1] or None, got {type(value).__name__}"
    )


@dataclass(frozen=True)
class Fixed:
    """The same fixed rank in every mode, or one per mode (``None`` keeps a mode whole)."""

    rank: int | tuple[int | None, ...]

    def per_mode(self, shape: Sequence[int]) -> tuple[ModeRank, ...]:
        """Return the per-mode ranks for ``shape``."""
        if isinstance(self.rank, tuple):
            return resolve(self.rank, shape)
        return resolve(int(self.rank), shape)


@dataclass(frozen=True)
class ExplainedVariance:
    """Per mode, the smallest rank whose explained variance reaches ``threshold``."""

    threshold: float

    def per_mode(self, shape: Sequence[int]) -> tuple[ModeRank, ...]:
        """Return the threshold for every mode of ``shape``."""
        return resolve(float(self.threshold), shape)


def resolve(rank: RankLike, shape: Sequence[int], name: str = "rank") -> tuple[ModeRank, ...]:
    """Normalise a ``rank`` argument to one int rank or float threshold per mode.

    Parameters
    ----------
    rank : int, float, sequence or policy
        The ``rank`` argument of a decomposition (see the module docs).
    shape : sequence of int
        Shape of the tensor it applies to.
    name : str, default "rank"
        Argument name used in error messages.

    Returns
    -------
    tuple of int or float
        Per mode, an int rank in ``[1, shape[k]]`` (``None`` entries become
        ``shape[k]``) or a float threshold in (0, 1].

    Raises
    ------
    ValueError, TypeError
        Naming the argument, the value and what was expected: a rank below 1
        or larger than its mode's dimension (which also names the mode and the
        shape), a float outside (0, 1], a wrong number of entries.
    """
    shape = tuple(int(n) for n in shape)
    if isinstance(rank, RankPolicy) and not isinstance(rank, (str, bytes)):
        entries = tuple(rank.per_mode(shape))
        if len(entries) != len(shape):
            raise ValueError(
                f"{name} policy {rank!r} gave {len(entries)} entries for {len(shape)} modes"
            )
        return tuple(_check_entry(e, f"{name}[{k}]", k, shape) for k, e in enumerate(entries))
    if isinstance(rank, Sequence) and not isinstance(rank, (str, bytes)):
        if len(rank) != len(shape):
            raise ValueError(
                f"{name} has {len(rank)} entries but the tensor has {len(shape)} modes "
                f"(shape {shape}); give one entry per mode"
            )
        return tuple(
            n if r is None else _check_entry(r, f"{name}[{k}]", k, shape)
            for k, (r, n) in enumerate(zip(rank, shape))
        )
    if isinstance(rank, numbers.Real):
        return tuple(_check_entry(rank, name, k, shape) for k in range(len(shape)))
    raise TypeError(
        f"{name} must be an int, a float in (0, 1], a per-mode sequence or a rank policy, "
        f"got {type(rank).__name__}"
    )


def explained_variance(sq_singular_values: Any) -> np.ndarray:
    """Cumulative explained variance: entry ``r-1`` is the fraction kept by rank ``r``.

    ``sq_singular_values`` are the squared singular values (eigenvalues of the
    Gram matrix) in descending order; negative round-off is clipped to 0. An
    all-zero spectrum counts as fully explained by any rank.
    """
    s = np.clip(np.asarray(sq_singular_values, dtype=np.float64), 0.0, None)
    total = s.sum()
    if total <= 0.0:
        return np.ones_like(s)
    return np.cumsum(s) / total


def rank_for_threshold(sq_singular_values: Any, threshold: float, rtol: float = 1e-12) -> int:
    """Smallest rank whose explained variance reaches ``threshold``.

    A slack of ``len * rtol`` absorbs the round-off of the spectrum (pass the
    working dtype's machine epsilon), so ``threshold=1.0`` gives the numerical
    rank rather than always the full dimension.
    """
    cum = explained_variance(sq_singular_values)
    slack = len(cum) * rtol
    return int(min(np.searchsorted(cum, threshold - slack, side="left") + 1, len(cum)))
