"""Test data for the core: exact low-rank and activation-like decaying tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def make(backend: str, dtype: str) -> Callable[[np.ndarray], Any]:
    """Return a converter from a numpy array to the given backend and dtype."""
    if backend == "numpy":
        return lambda a: np.asarray(a, dtype=dtype)
    tdtype = getattr(torch, dtype)
    return lambda a: torch.as_tensor(np.asarray(a), dtype=tdtype)


def low_rank_tensor(
    shape: tuple[int, ...], ranks: tuple[int, ...], seed: int = 0, noise: float = 0.0
) -> np.ndarray:
    """A tensor of exact multilinear rank ``ranks`` (plus optional Gaussian noise)."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(ranks)
    for k, (n, r) in enumerate(zip(shape, ranks)):
        u = np.linalg.qr(rng.standard_normal((n, r)))[0]
        t = np.moveaxis(np.tensordot(u, np.moveaxis(t, k, 0), axes=1), 0, k)
    return t + noise * rng.standard_normal(shape)


def decaying_tensor(shape: tuple[int, ...], seed: int = 0, decay: float = 0.6) -> np.ndarray:
    """A full-rank tensor whose mode spectra decay geometrically (activation-like)."""
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(shape)
    for k, n in enumerate(shape):
        scale = decay ** np.arange(n)
        core = core * scale.reshape([-1 if i == k else 1 for i in range(len(shape))])
    for k, n in enumerate(shape):
        u = np.linalg.qr(rng.standard_normal((n, n)))[0]
        core = np.moveaxis(np.tensordot(u, np.moveaxis(core, k, 0), axes=1), 0, k)
    return core


def tol(x: Any) -> float:
    """Reconstruction tolerance for the dtype of ``x``."""
    return 1e-4 if "32" in str(x.dtype) else 1e-10
