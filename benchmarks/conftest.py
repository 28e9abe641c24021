"""Shared benchmark fixtures.

``realistic_activation(shape, seed)`` is the one generator of realistic
activations (natural images from ``sklearn.datasets.load_sample_images``
through a fixed, seeded conv stack with ReLU; see
:mod:`tensorcompress.experiments.activations`). It is re-exported here for
benchmark files, but they should import it from the package
(``from tensorcompress.experiments.activations import realistic_activation``):
``from conftest import ...`` resolves to whichever ``conftest`` module pytest
loaded last when ``tests/`` and ``benchmarks/`` run in one session.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from tensorcompress.experiments.activations import realistic_activation

__all__ = ["realistic_activation"]


@functools.lru_cache(maxsize=16)
def _cached(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return realistic_activation(shape, seed)


@pytest.fixture(scope="session")
def activation() -> Callable[[tuple[int, ...], int], torch.Tensor]:
    """``activation(shape, seed)``: a realistic activation, computed once per session.

    The returned tensor is shared: do not modify it in place.
    """
    return _cached
