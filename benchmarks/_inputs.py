"""What the decomposition and layer suites run on: the one cache of activations.

Both suites and both modes take their activations from :func:`activation`, so
a shape used by both is computed once per process.
"""

from __future__ import annotations

import functools

import torch

from tensorcompress.experiments.activations import realistic_activation


@functools.lru_cache(maxsize=32)
def activation(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A realistic activation, computed once per process.

    The tensor is shared between callers: do not modify it in place.
    """
    return realistic_activation(shape, seed)
