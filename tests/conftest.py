"""Shared fixtures: every core test runs on numpy and torch, float32 and float64."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from core_data import make

BACKENDS = ["numpy", "torch"]
DTYPES = ["float32", "float64"]


@pytest.fixture(params=[(b, d) for b in BACKENDS for d in DTYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def to_backend(request: pytest.FixtureRequest) -> Callable[[np.ndarray], Any]:
    """Convert numpy test data to each backend/dtype combination."""
    return make(*request.param)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny tensors (restored afterwards).

    Threads only add overhead at these sizes, and on a loaded 2-core machine
    they make small LAPACK calls many times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
