"""The adapter's rank rule: the core's, with the layer named."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from tensorcompress import hosvd
from tensorcompress.results import TuckerResult
from tensorcompress.torch.modules import (
    CompressedConv2d,
    CompressedLinear,
    CompressedModule,
    CompressionConfig,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def conv(method: str, rank: Any) -> CompressedModule:
    plain = nn.Conv2d(3, 4, 3, padding=1)
    config = CompressionConfig(method=method, rank=rank, seed=0)
    layer: CompressedModule = CompressedConv2d.from_module(plain, config, name="net.conv")
    return layer


def linear(method: str, rank: Any) -> CompressedModule:
    config = CompressionConfig(method=method, rank=rank, seed=0)
    layer: CompressedModule = CompressedLinear.from_module(nn.Linear(6, 5), config, name="head")
    return layer


def step(layer: nn.Module, x: torch.Tensor) -> None:
    """One training forward and backward (the forward keeps the compressed input)."""
    layer(x).sum().backward()


def tokens(batch: int) -> torch.Tensor:
    return torch.randn(batch, 7, 6, generator=torch.Generator().manual_seed(batch))


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 5, 5, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("method", ["hosvd", "asi"])
@pytest.mark.parametrize(
    ("build", "x", "rank", "match"),
    [
        (conv, images(4), 6, r"rank=6 is larger than the mode's dimension 4 \(mode 0 of shape"),
        (conv, images(4), 5, r"rank=5 is larger than the mode's dimension 4 \(mode 0 of shape"),
        (
            conv,
            images(4),
            (None, 4, 2, 2),
            r"rank\[1\]=4 is larger than the mode's dimension 3 \(mode 1 of shape \(4, 3, 5, 5\)",
        ),
        (linear, tokens(4), 5, r"rank=5 is larger than the mode's dimension 4 \(mode 0 of shape"),
        (
            linear,
            tokens(4),
            (None, None, 7),
            r"rank\[2\]=7 is larger than the mode's dimension 6 \(mode 2 of shape \(4, 7, 6\)",
        ),
    ],
)
def test_tucker_int_rank_above_a_mode_is_an_error_naming_the_layer(
    method: str, build: Any, x: torch.Tensor, rank: Any, match: str
) -> None:
    layer = build(method, rank)
    name = layer.layer_name
    with pytest.raises(ValueError, match=rf"^layer '{name}': {match}"):
        step(layer, x)
    assert layer.last_result is None  # nothing was kept, nothing capped


@pytest.mark.parametrize(
    ("build", "x", "rank", "match"),
    [
        # Channel unfolding 3 x (2*5*5): at most 3.
        (conv, images(2), 4, r"\[1, 3\].*got 4 \(mode 1 of shape \(2, 3, 5, 5\), unfolding 3 x 50"),
        # Feature unfolding 6 x 2 of a (2, 6) input: at most 2 (the batch).
        (
            linear,
            torch.randn(2, 6),
            3,
            r"\[1, 2\].*got 3 \(mode 1 of shape \(2, 6\), unfolding 6 x 2",
        ),
    ],
)
def test_svd_int_rank_above_the_unfolding_is_an_error_naming_the_layer(
    build: Any, x: torch.Tensor, rank: int, match: str
) -> None:
    layer = build("svd", rank)
    with pytest.raises(ValueError, match=rf"^layer '{layer.layer_name}': rank must be .*{match}"):
        step(layer, x)
    # The largest rank the unfolding has is kept whole, exactly.
    fitting = build("svd", rank - 1)
    step(fitting, x)
    assert fitting.ranks == (rank - 1,)
    assert fitting.last_result is not None
    assert fitting.last_result.explained_variance == pytest.approx(1.0)


@pytest.mark.parametrize("build", [conv, linear])
def test_asi_own_ranks_follow_a_smaller_last_batch_user_ranks_do_not(build: Any) -> None:
    data = images if build is conv else tokens
    rank = (8, 2, 2, 2) if build is conv else (8, 3, 2)
    # ASI fixes the user's ranks at its cold start (batch 8); a smaller last
    # batch then caps the batch rank, which comes back with the next full batch.
    layer = build("asi", rank)
    for batch, expected in ((8, 8), (3, 3), (8, 8)):
        step(layer, data(batch))
        assert layer.ranks == (expected, *rank[1:])
    # HOSVD takes the user's ranks on every batch: the smaller one is an error.
    layer = build("hosvd", rank)
    step(layer, data(8))
    with pytest.raises(ValueError, match=r"rank\[0\]=8 is larger than the mode's dimension 3"):
        step(layer, data(3))
    # So is a cold start on a batch smaller than the user's rank.
    with pytest.raises(ValueError, match=r"rank\[0\]=8 is larger than the mode's dimension 3"):
        step(build("asi", rank), data(3))


def test_asi_threshold_ranks_follow_a_smaller_batch() -> None:
    layer = conv("asi", 0.9)
    step(layer, images(8))
    first = layer.ranks
    assert first is not None
    step(layer, images(2))
    assert layer.ranks == (min(first[0], 2), *first[1:])
    step(layer, images(8))
    assert layer.ranks == first


def test_asi_none_keeps_a_mode_whole_when_it_grows() -> None:
    layer = conv("asi", (None, 2, 3, 3))
    for batch in (3, 8, 2):
        step(layer, images(batch))
        assert layer.ranks == (batch, 2, 3, 3)


@pytest.mark.parametrize("method", ["hosvd", "asi"])
def test_explained_variance_is_per_logical_mode_for_channels_last_input(method: str) -> None:
    # A channels-last input is decomposed in memory order (B, H, W, C); the
    # result, its explained variance included, comes back in logical order.
    x = images(6)
    rank = (2, None, 0.5, 0.5)
    ref = hosvd.decompose(x, rank, sequential=False)
    layer = conv(method, rank)
    for _ in range(2):  # ASI: the cold start, then a warm step
        step(layer, x.to(memory_format=torch.channels_last))
    res = layer.last_result
    assert isinstance(res, TuckerResult)
    ev = res.explained_variance
    assert res.ranks == ref.ranks and len(ev) == 4
    assert ev[1] == 1.0  # the channel mode, kept whole
    assert all(isinstance(e, float) and 0.0 < e < 1.0 for e in (ev[0], ev[2], ev[3]))
    if method == "hosvd":
        # Thresholds are applied to the input's own unfoldings, whatever the layout.
        assert ev[2:] == pytest.approx(ref.explained_variance[2:], abs=1e-5)


@pytest.mark.parametrize("method", ["asi", "hosvd"])
def test_product_dtype_runs_the_decomposition_in_bfloat16_and_keeps_the_rest_exact(
    method: str,
) -> None:
    plain = nn.Linear(24, 16)
    gen = torch.Generator().manual_seed(0)
    # Features of rank 4 plus noise: a spectral gap below the ranks kept, so
    # the subspaces (and the weight gradient) are well defined in both precisions.
    x = torch.randn(32, 20, 4, generator=gen) @ torch.randn(4, 24, generator=gen)
    x = x + 0.01 * torch.randn(x.shape, generator=gen)
    grads = {}
    for low in (None, torch.bfloat16):
        config = CompressionConfig(method=method, rank=(8, 10, 6), seed=0, product_dtype=low)
        layer = CompressedLinear.from_module(copy.deepcopy(plain), config, name="fc")
        for batch in (x, x.flip(0)):  # for ASI: the cold start, then a warm step
            layer.zero_grad()
            inp = batch.clone().requires_grad_(True)
            out = layer(inp)
            out.square().sum().backward()
        assert isinstance(layer.last_result, TuckerResult)
        assert layer.last_result.core.dtype == torch.float32
        grads[low] = (out.detach(), inp.grad, layer.weight.grad.clone())
    (out32, dx32, dw32), (out16, dx16, dw16) = grads[None], grads[torch.bfloat16]
    torch.testing.assert_close(out16, out32, rtol=0, atol=0)  # the forward is untouched
    torch.testing.assert_close(dx16, dx32, rtol=0, atol=0)  # and so is the input gradient
    assert not torch.equal(dw16, dw32)
    assert float((dw16 - dw32).norm() / dw32.norm()) < 2**-8


@pytest.mark.parametrize("bad", ["bfloat16", torch.int8])
def test_product_dtype_must_be_a_floating_torch_dtype(bad: object) -> None:
    with pytest.raises(TypeError, match="product_dtype must be None or a floating torch dtype"):
        CompressionConfig(product_dtype=bad)  # type: ignore[arg-type]
