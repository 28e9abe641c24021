"""A guard that lets a measurement run a training forward without side effects."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["preserved_training_state"]


@contextlib.contextmanager
def preserved_training_state(model: nn.Module) -> Iterator[None]:
    """Train mode inside the block; training flags and buffers restored after it.

    A measuring forward is a real training forward, so BatchNorm would update
    its running statistics; they are put back so that measuring has no side
    effect on the model's buffers. (A compressed layer's own warm-start state
    does advance, as it would on any training step.)

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).eval()
    >>> with preserved_training_state(net):
    ...     _ = net(torch.randn(4, 3))
    >>> net.training, bool(net[1].running_mean.abs().sum() == 0)
    (False, True)
    """
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    model.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, flag in flags:
            m.training = flag
