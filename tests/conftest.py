"""Shared fixtures: every core test runs on numpy and torch, float32 and float64."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from core_data import make

BACKENDS = ["numpy", "torch"]
DTYPES = ["float32", "float64"]


@pytest.fixture(params=[(b, d) for b in BACKENDS for d in DTYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def to_backend(request: pytest.FixtureRequest) -> Callable[[np.ndarray], Any]:
    """Convert numpy test data to each backend/dtype combination."""
    return make(*request.param)
