"""Helpers for the torch adapter tests: layer settings, gradient runs, activations."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from tensorcompress.torch import (
    CompressedConv1d,
    CompressedConv2d,
    CompressedLinear,
    CompressedModule,
    CompressionConfig,
)

WRAPPERS: dict[type[nn.Module], type[CompressedModule]] = {
    nn.Conv1d: CompressedConv1d,
    nn.Conv2d: CompressedConv2d,
    nn.Linear: CompressedLinear,
}


@dataclass(frozen=True)
class Case:
    """A layer setting: the module's constructor arguments and an input shape."""

    id: str
    kind: type[nn.Module]
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    shape: tuple[int, ...]

    def layer(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
        """The plain layer, seeded."""
        torch.manual_seed(seed)
        return self.kind(*self.args, **dict(self.kwargs)).to(dtype)

    def input(self, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
        """A random input of the case's shape."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.shape, generator=g, dtype=dtype)


def case(id: str, kind: type[nn.Module], *args: Any, shape: tuple[int, ...], **kw: Any) -> Case:
    """Shorthand for a :class:`Case`."""
    return Case(id, kind, args, tuple(sorted(kw.items())), shape)


C2 = nn.Conv2d
CONV2D_CASES = [
    case("3x3", C2, 4, 3, 3, padding=1, shape=(3, 4, 6, 5)),
    case("no-bias", C2, 4, 3, 3, padding=1, bias=False, shape=(3, 4, 6, 5)),
    case("groups2", C2, 4, 6, 3, padding=1, groups=2, shape=(3, 4, 5, 5)),
    case("depthwise", C2, 4, 4, 3, padding=1, groups=4, shape=(3, 4, 5, 6)),
    case("depthwise-x2", C2, 4, 8, 3, padding=1, groups=4, shape=(3, 4, 5, 5)),
    case("k3x1", C2, 4, 3, (3, 1), padding=(1, 0), shape=(3, 4, 6, 5)),
    case("k1x3", C2, 4, 3, (1, 3), padding=(0, 1), shape=(3, 4, 6, 5)),
    case("k1x7", C2, 3, 2, (1, 7), padding=(0, 3), shape=(2, 3, 4, 9)),
    case("stride2", C2, 4, 3, 3, stride=2, padding=1, shape=(3, 4, 7, 6)),
    case("stride2x1", C2, 4, 3, 3, stride=(2, 1), padding=1, shape=(3, 4, 7, 6)),
    case("dilation2", C2, 4, 3, 3, dilation=2, padding=2, shape=(3, 4, 7, 7)),
    case("pad-tuple", C2, 4, 3, 3, padding=(2, 1), shape=(3, 4, 5, 6)),
    case("same-even", C2, 4, 3, (4, 2), padding="same", shape=(3, 4, 6, 5)),
    case("same-dil-even", C2, 4, 3, 2, padding="same", dilation=3, shape=(3, 4, 7, 7)),
    case("valid", C2, 4, 3, 3, padding="valid", shape=(3, 4, 6, 6)),
    case("reflect", C2, 4, 3, 3, padding=1, padding_mode="reflect", shape=(3, 4, 5, 6)),
    case("replicate", C2, 4, 3, 3, padding=(2, 1), padding_mode="replicate", shape=(3, 4, 5, 6)),
    case("circular", C2, 4, 3, 3, padding=(1, 2), padding_mode="circular", shape=(3, 4, 5, 6)),
    case(
        "reflect-same-even",
        C2,
        4,
        3,
        (2, 4),
        padding="same",
        padding_mode="reflect",
        shape=(3, 4, 6, 6),
    ),
    case(
        "circ-stride-dw",
        C2,
        4,
        4,
        3,
        stride=2,
        padding=1,
        groups=4,
        padding_mode="circular",
        shape=(3, 4, 7, 6),
    ),
    case("1x1", C2, 4, 3, 1, shape=(3, 4, 5, 6)),
    case("1x1-stride2", C2, 4, 3, 1, stride=2, shape=(3, 4, 5, 6)),
    case("1x1-groups", C2, 4, 6, 1, groups=2, shape=(3, 4, 5, 6)),
]

C1 = nn.Conv1d
CONV1D_CASES = [
    case("1d-3", C1, 4, 3, 3, padding=1, shape=(3, 4, 9)),
    case("1d-stride-dil", C1, 4, 3, 3, stride=2, dilation=2, padding=2, shape=(3, 4, 11)),
    case("1d-dw-x2", C1, 3, 6, 5, groups=3, padding=2, shape=(3, 3, 8)),
    case("1d-same-even", C1, 4, 3, 4, padding="same", padding_mode="circular", shape=(3, 4, 8)),
    case("1d-1x1", C1, 4, 3, 1, bias=False, shape=(3, 4, 8)),
]

L = nn.Linear
LINEAR_CASES = [
    case("lin-2d", L, 5, 4, shape=(6, 5)),
    case("lin-3d", L, 5, 4, shape=(3, 4, 5)),
    case("lin-4d-nobias", L, 5, 4, bias=False, shape=(2, 3, 4, 5)),
    case("lin-1d", L, 5, 4, shape=(5,)),
]

ALL_CASES = CONV2D_CASES + CONV1D_CASES + LINEAR_CASES


def compressed(plain: nn.Module, method: str, rank: Any = 1.0, **options: Any) -> CompressedModule:
    """A compressed copy of ``plain`` (its own parameters, equal values)."""
    wrapper = WRAPPERS[type(plain)]
    module: CompressedModule = wrapper.from_module(
        copy.deepcopy(plain), CompressionConfig(method=method, rank=rank, **options), name="layer"
    )
    return module


def run(
    module: nn.Module, x: torch.Tensor, gy: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward; return the output and the gradients by name (``"input"`` too)."""
    for p in module.parameters():
        p.grad = None
    xi = x.detach().requires_grad_()  # a new leaf with the caller's strides
    y = module(xi)
    y.backward(torch.ones_like(y) if gy is None else gy)
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters()}
    assert xi.grad is not None
    grads["input"] = xi.grad.detach().clone()
    return y.detach(), grads


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm() / b64.norm())


@functools.lru_cache(maxsize=8)
def realistic(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A realistic activation (natural images through a seeded conv stack), cached."""
    from tensorcompress.experiments.activations import realistic_activation

    return realistic_activation(shape, seed)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Run a module's tiny-tensor tests on one thread (restored afterwards).

    Intra-op threads only cost synchronisation on tensors this small, and on a
    busy machine they make each op wait for a free core.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
