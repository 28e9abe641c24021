"""Compressed Conv1d/Conv2d/Linear: gradients, layouts, dtypes, state and errors.

Helpers live here rather than in a ``tests/torch/conftest.py``: the core tests
import their helpers with ``from conftest import ...``, and a second conftest
module would shadow that name whenever pytest loads it first.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorcompress
from tensorcompress import _measured, hosvd
from tensorcompress.results import SVDResult, TuckerResult
from tensorcompress.torch import (
    CompressedConv1d,
    CompressedConv2d,
    CompressedLinear,
    CompressedModule,
    CompressionConfig,
    ConvSpec,
    PatchAverage,
)
from tensorcompress.torch import functions as fn
from tensorcompress.torch import gradient_filter as gf

# ---------------------------------------------------------------------------
# Layer settings and helpers
# ---------------------------------------------------------------------------

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
    case("pad-beyond-kernel", C2, 4, 3, (1, 2), padding=(1, 2), shape=(3, 4, 5, 6)),
    case("dw-x2-stride-pad2", C2, 4, 8, 2, stride=2, padding=2, groups=4, shape=(3, 4, 7, 6)),
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


pytestmark = [
    pytest.mark.usefixtures("single_thread"),  # tiny tensors: see tests/conftest.py
    # torch's own warning for the plain layer of the 'same'/even-kernel cases.
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
]

EXACT_METHODS = ["asi", "hosvd", "svd"]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert relative_error(a, b) <= tol, relative_error(a, b)


# ---------------------------------------------------------------------------
# Full rank: every setting equals vanilla autograd
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("c", ALL_CASES, ids=lambda c: c.id)
def test_full_rank_equals_vanilla_float64(c: Case, method: str) -> None:
    plain = c.layer()
    layer = compressed(plain, method, rank=1.0)
    for step in range(2):  # the second ASI step is warm-started
        x = c.input(seed=step)
        gy = torch.randn(plain(x).shape, dtype=x.dtype, generator=torch.Generator().manual_seed(9))
        y0, g0 = run(plain, x, gy)
        y1, g1 = run(layer, x, gy)
        assert torch.equal(y0, y1)
        assert g0.keys() == g1.keys()
        for name in g0:
            _close(g1[name], g0[name], 1e-10)
    assert layer.last_result is not None


@pytest.mark.parametrize("c", ALL_CASES, ids=lambda c: c.id)
def test_gradcheck_float64(c: Case) -> None:
    # The numerical Jacobian comes from the (exact) forward, so this checks the
    # compressed backward against finite differences of the real op.
    plain = c.layer()
    method = ("hosvd", "asi", "svd")[ALL_CASES.index(c) % 3]
    layer = compressed(plain, method, rank=1.0)
    names = [n for n, _ in layer.named_parameters()]

    def f(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(layer, dict(zip(names, params)), (x,))
        return out

    x = c.input().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


FLOAT32_CASES = [
    case("f32-3x3", nn.Conv2d, 16, 24, 3, padding=1, shape=(8, 16, 12, 12)),
    case("f32-dw-s2", nn.Conv2d, 16, 32, 3, stride=2, padding=1, groups=16, shape=(8, 16, 13, 12)),
    case("f32-1x1", nn.Conv2d, 16, 24, 1, shape=(8, 16, 12, 12)),
    case(
        "f32-reflect-same",
        nn.Conv2d,
        8,
        8,
        4,
        padding="same",
        padding_mode="reflect",
        shape=(8, 8, 11, 12),
    ),
    case("f32-linear", nn.Linear, 24, 16, shape=(8, 10, 24)),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("c", FLOAT32_CASES, ids=lambda c: c.id)
def test_full_rank_float32_any_layout(c: Case, method: str, layout: str) -> None:
    plain = c.layer(torch.float32)
    layer = compressed(plain, method, rank=1.0)
    x = c.input(torch.float32)
    if layout == "channels_last" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        # Not dense in any order: every other sample of a twice larger batch.
        x = torch.stack([x, x], dim=1)[:, 0]
        assert not x.is_contiguous()
    elif layout == "channels_last":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # permuted-dense 3-D
    for step in range(2):
        y0, g0 = run(plain, x + step)
        y1, g1 = run(layer, x + step)
        torch.testing.assert_close(y1, y0)
        for name in g0:
            assert relative_error(g1[name], g0[name]) < 2e-5, name


def test_asi_warm_start_survives_batch_size_change_and_eval() -> None:
    c = CONV2D_CASES[0]
    plain = c.layer()
    layer = compressed(plain, "asi", rank=1.0)
    for batch in (3, 2, 5, 3):
        x = torch.randn(batch, *c.shape[1:], dtype=torch.float64)
        _, g0 = run(plain, x)
        _, g1 = run(layer, x)
        for name in g0:
            _close(g1[name], g0[name], 1e-10)
        assert layer.ranks == (batch, 4, 6, 5)
        state = layer.last_result
        layer.eval()
        layer(x)
        layer.train()
        assert layer.last_result is state  # eval forwards leave the state alone


def test_asi_threshold_ranks_fixed_by_cold_start_and_capped_by_small_batch() -> None:
    x = realistic((16, 32, 8, 8), 0)
    layer = compressed(nn.Conv2d(32, 8, 3, padding=1), "asi", rank=0.8)
    run(layer, x)
    first = layer.ranks
    assert first is not None
    run(layer, realistic((16, 32, 8, 8), 1))
    assert layer.ranks == first
    small = x[:2]
    run(layer, small)
    assert layer.ranks == (min(first[0], 2), *first[1:])
    run(layer, x)
    assert layer.ranks == first  # the batch rank comes back with the batch


def test_asi_is_warm_started_and_shares_storage_with_saved_tensors() -> None:
    x0, x1 = realistic((16, 32, 8, 8), 0), realistic((16, 32, 8, 8), 1)
    layer = compressed(nn.Conv2d(32, 8, 3, padding=1), "asi", rank=0.8, n_iter=1)
    run(layer, x0)
    cold = layer.last_result
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x1.requires_grad_(False))
    res = layer.last_result
    assert isinstance(cold, TuckerResult) and isinstance(res, TuckerResult)
    assert res.n_iter == 1 and cold.n_iter == 0  # warm ASI step after the exact cold start
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    kept = [res.core, *res.factors]
    assert {t.untyped_storage().data_ptr() for t in kept} <= ptrs
    activation = [t for t in saved if t.untyped_storage().data_ptr() != layer.weight.data_ptr()]
    assert sum(t.untyped_storage().nbytes() for t in activation) == res.nbytes
    assert res.nbytes < 0.25 * x1.numel() * x1.element_size()
    y.sum().backward()


@pytest.mark.parametrize("method", ["asi", "hosvd", "svd", "gradient_filter"])
def test_only_the_compressed_input_is_saved(method: str) -> None:
    layer = compressed(nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect"), method, rank=0.8)
    x = torch.rand(16, 8, 8, 8)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x.requires_grad_())
    res = layer.last_result
    assert res is not None
    activation = [t for t in saved if t is not layer.weight]
    # Tight storages (no slice of a bigger buffer) adding up to the result's bytes.
    assert sum(t.untyped_storage().nbytes() for t in activation) == res.nbytes
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in saved)


# ---------------------------------------------------------------------------
# Lossy: explained variance 0.8 on realistic activations
# ---------------------------------------------------------------------------

LOSSY = [
    (nn.Conv2d(32, 16, 3, padding=1), (16, 32, 8, 8)),
    (nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32), (16, 32, 8, 8)),
    (nn.Conv2d(32, 16, 1), (16, 32, 8, 8)),
    (nn.Conv2d(32, 16, 3, padding=1, padding_mode="circular"), (16, 32, 8, 8)),
    (nn.Linear(24, 12), (8, 17, 24)),
]


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("plain, shape", LOSSY, ids=lambda v: getattr(v, "__name__", None))
def test_lossy_weight_grad_is_that_of_the_reconstruction(
    plain: nn.Module, shape: tuple[int, ...], method: str
) -> None:
    """At explained variance 0.8: dW equals vanilla's dW on the reconstructed input
    (the factored contraction adds no error of its own), dX and db are exact, and
    dW's relative error (random output gradient) is at most 0.9: Tucker at
    threshold eps in each of d modes keeps ||x - x_hat||^2 <= d (1 - eps) ||x||^2,
    so about sqrt(0.8) for d = 4, and an output gradient uncorrelated with the
    error passes that ratio on to dW."""
    torch.manual_seed(0)
    plain = copy.deepcopy(plain)
    layer = compressed(plain, method, rank=0.8)
    for seed in (0, 1):
        x = realistic(shape, seed)
        gy = torch.randn(plain(x).shape, generator=torch.Generator().manual_seed(seed))
        _, g_exact = run(plain, x, gy)
        _, g = run(layer, x, gy)
        res = layer.last_result
        assert isinstance(res, (TuckerResult, SVDResult))
        x_hat = res.reconstruct()
        _, g_rec = run(plain, x_hat, gy)
        assert relative_error(g["weight"], g_rec["weight"]) < 1e-4
        assert relative_error(g["input"], g_exact["input"]) < 1e-5
        assert relative_error(g["bias"], g_exact["bias"]) < 1e-5
        assert relative_error(g["weight"], g_exact["weight"]) <= 0.9
        assert res.nbytes < x.numel() * x.element_size()


@pytest.mark.parametrize("order", [fn._projecting, fn._expanding], ids=["projecting", "expanding"])
@pytest.mark.parametrize("ranks", [(8, 17, 24), (5, 9, 7), (1, 3, 24)])
def test_either_linear_weight_grad_order_is_dw_of_the_reconstruction(
    order: Any, ranks: tuple[int, ...]
) -> None:
    """Either contraction order of a Linear's dW from a Tucker input (the one
    measured faster runs) is dW on the reconstructed input, in float64, at full
    rank (then vanilla's) and below."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 17, 24, generator=g, dtype=torch.float64)
    gy = torch.randn(8, 17, 12, generator=g, dtype=torch.float64)
    res = hosvd.decompose(x, ranks)
    expected = gy.reshape(-1, 12).t() @ res.reconstruct().reshape(-1, 24)
    got = order(res, gy)
    assert got.shape == (12, 24)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fn.linear_weight_grad(res, gy), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spatial", [(5,), (5, 3), (4, 3, 2)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_both_ways_of_a_pointwise_conv_are_the_conv(spatial: tuple[int, ...], bias: bool) -> None:
    """The two options measured for a 1x1 conv (torch's conv, one batched
    product) give the conv's forward, and its input gradient with the
    transposed weight, in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, *spatial, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 6, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64) if bias else None
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(spatial) - 1]
    expected = conv(x, w.reshape(7, 6, *(1,) * len(spatial)), b)
    gy = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    (expected_gx,) = torch.autograd.grad(expected, x, gy)
    for way in (fn._pixel_product, fn._pixel_conv):
        y = way(w, x.detach(), b)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        assert y.is_contiguous()
        gx = way(w.t(), gy, None)
        torch.testing.assert_close(gx, expected_gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fn.pointwise_conv(x.detach(), w, b), expected)


def test_a_pointwise_conv_layer_measures_conv_against_product(monkeypatch) -> None:
    """On a CPU with measuring on, a compressed 1x1 conv's forward and input
    gradient each run whichever of the conv and the batched product is faster
    (chosen once per shape), and stay exact: the output and input gradient
    equal the plain layer's."""
    monkeypatch.setattr(_measured, "_chosen_options", {})
    before = tensorcompress.measured_plans(True)
    try:
        plain = nn.Conv2d(64, 64, 1)
        x = torch.randn(64, 64, 16, 16)  # _measured.MEASURE_FROM entries
        gy = torch.randn(64, 64, 16, 16)
        y, grads = run(compressed(plain, "asi", rank=(8, 8, 4, 4)), x, gy)
        y_ref, grads_ref = run(plain, x, gy)
    finally:
        tensorcompress.measured_plans(before)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["input"], grads_ref["input"], rtol=1e-5, atol=1e-5)
    chosen = {k: v for k, v in tensorcompress.chosen_options().items() if k[0] == "1x1 conv"}
    # The forward (with the bias) and the input gradient (the transposed weight).
    assert sorted(k[3] for k in chosen) == [False, True]
    assert set(chosen.values()) <= {"conv", "matmul"}


def test_hosvd_threshold_ranks_follow_the_core() -> None:
    x = realistic((16, 32, 8, 8), 0)
    layer = compressed(nn.Conv2d(32, 8, 3, padding=1), "hosvd", rank=0.8)
    run(layer, x)
    assert layer.ranks == hosvd.decompose(x, 0.8).ranks


# ---------------------------------------------------------------------------
# Gradient filter
# ---------------------------------------------------------------------------


def _reference_gradient_filter(
    x: torch.Tensor, gy: torch.Tensor, weight_shape: torch.Size, stride: int, groups: int, r: int
) -> torch.Tensor:
    """The formula as the authors' code writes it (pooling with implicit padding)."""
    (xh, xw), (h, w) = x.shape[-2:], gy.shape[-2:]
    ph, pw = math.ceil(h / r), math.ceil(w / r)
    o = r * stride
    pad = (math.ceil((ph * o - xh) / 2), math.ceil((pw * o - xw) / 2))
    x_sum = F.avg_pool2d(x, o, o, padding=pad, divisor_override=1)
    gpad = (math.ceil((ph * r - h) / 2), math.ceil((pw * r - w) / 2))
    gy_avg = F.avg_pool2d(gy, r, r, padding=gpad, count_include_pad=False)
    if groups == 1:
        g = torch.einsum("nohw,nchw->oc", gy_avg, x_sum)
    else:  # depthwise
        g = (x_sum * gy_avg).sum((0, 2, 3))[:, None]
    return g[..., None, None].expand(weight_shape)


GF_CASES = [
    (nn.Conv2d(6, 5, 3, padding=1), (4, 6, 6, 6), 2),
    (nn.Conv2d(6, 5, 3, padding=1), (4, 6, 7, 7), 2),
    (nn.Conv2d(6, 5, 3, padding=1, bias=False), (4, 6, 9, 8), 3),
    (nn.Conv2d(6, 6, 3, padding=1, groups=6), (4, 6, 7, 7), 2),
    (nn.Conv2d(6, 5, 3, stride=2, padding=1), (4, 6, 14, 14), 2),
    (nn.Conv2d(6, 5, 1, stride=2), (4, 6, 14, 14), 2),
]


@pytest.mark.parametrize("plain, shape, r", GF_CASES)
def test_gradient_filter_reproduces_the_reference_formula(
    plain: nn.Conv2d, shape: tuple[int, ...], r: int
) -> None:
    plain = copy.deepcopy(plain).double()
    layer = compressed(plain, "gradient_filter", patch=r)
    x = torch.randn(shape, dtype=torch.float64)
    gy = torch.randn(plain(x).shape, dtype=torch.float64)
    _, g = run(layer, x, gy)
    _, g_exact = run(plain, x, gy)
    stride = plain.stride[0]
    expected = _reference_gradient_filter(x, gy, plain.weight.shape, stride, plain.groups, r)
    # The reference sums a (R * stride)**2 input window: stride**2 too large.
    _close(g["weight"], expected / stride**2, 1e-12)
    _close(g["input"], g_exact["input"], 1e-12)  # exact here, unlike the reference
    res = layer.last_result
    assert isinstance(res, PatchAverage)
    out = plain(x).shape[2:]
    assert res.shape == (shape[0], shape[1], *(math.ceil(n / r) for n in out))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("r", [1, 2, 4])
def test_gradient_filter_exact_on_patch_constant_data(stride: int, r: int) -> None:
    # Input and output gradient constant on every patch: nothing is lost by
    # averaging, so a 1x1 conv's weight gradient must be exact at any stride.
    plain = nn.Conv2d(8, 4, 1, stride=stride, bias=False).double()
    layer = compressed(plain, "gradient_filter", patch=r)
    xs = torch.randn(2, 8, 2, 2, dtype=torch.float64)
    x = xs.repeat_interleave(4 * stride, 2).repeat_interleave(4 * stride, 3)
    gy = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    gy = gy.repeat_interleave(4, 2).repeat_interleave(4, 3)
    _, g = run(layer, x, gy)
    _, g_exact = run(plain, x, gy)
    _close(g["weight"], g_exact["weight"], 1e-12)


def test_gradient_filter_paper_memory_convention() -> None:
    # ResNet-18 layer4.0.downsample.0: 256 -> 512, 1x1, stride 2, 14x14 input:
    # 256 x 4 x 4 per image (1.00 MB at batch 64), as in the paper's table.
    x = torch.rand(64, 256, 14, 14)
    layer = compressed(nn.Conv2d(256, 512, 1, stride=2, bias=False), "gradient_filter", patch=2)
    layer(x)
    assert layer.last_result is not None
    assert layer.last_result.nbytes == 64 * 256 * 4 * 4 * 4 == 2**20


def test_gradient_filter_r1_on_pointwise_conv_is_exact() -> None:
    # R = 1 and a 1x1, stride-1 conv: each cell is one pixel, the formula is vanilla's.
    # (Wider kernels give every tap the centre tap's value, so R = 1 is not exact there.)
    plain = nn.Conv2d(6, 5, 1).double()
    layer = compressed(plain, "gradient_filter", patch=1)
    x = torch.randn(4, 6, 5, 7, dtype=torch.float64)
    _, g0 = run(plain, x)
    _, g1 = run(layer, x)
    for name in g0:
        _close(g1[name], g0[name], 1e-12)
    wide = compressed(nn.Conv2d(6, 5, 3, padding=1).double(), "gradient_filter", patch=1)
    _, g2 = run(wide, x)
    w = g2["weight"]
    assert torch.equal(w, w[..., 1:2, 1:2].expand_as(w))


@pytest.mark.parametrize(
    "plain, shape",
    [
        (nn.Conv2d(4, 8, 3, padding=1, groups=4), (3, 4, 9, 9)),  # channel multiplier
        (nn.Conv2d(4, 6, 3, groups=2), (3, 4, 8, 8)),  # d = -2: a centred crop
        (nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding="valid"), (3, 4, 9, 5)),
        (nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect"), (3, 4, 11)),
    ],
)
def test_gradient_filter_generalises(plain: nn.Module, shape: tuple[int, ...]) -> None:
    plain = copy.deepcopy(plain).double()
    layer = compressed(plain, "gradient_filter", patch=2)
    x = torch.randn(shape, dtype=torch.float64)
    gy = torch.randn(plain(x).shape, dtype=torch.float64)
    _, g = run(layer, x, gy)
    _, g0 = run(plain, x, gy)
    _close(g["input"], g0["input"], 1e-12)
    # dW[o, c, taps] = R**d * sum ybar[:, o] xbar[:, c of o's group] (brute force).
    res = layer.last_result
    assert isinstance(res, PatchAverage)
    groups = plain.groups  # type: ignore[attr-defined]
    c_out, c_in_g = g["weight"].shape[:2]
    ybar = gf._grad_output_mean(gy, res)
    window = 2 ** len(res.grids)  # output pixels per cell
    for o in range(c_out):
        grp = o // (c_out // groups)
        for c in range(c_in_g):
            want = window * (ybar[:, o] * res.mean[:, grp * c_in_g + c]).sum()
            assert torch.allclose(g["weight"][o, c], want.expand_as(g["weight"][o, c]))


def test_gradient_filter_grid() -> None:
    g = gf.grid(in_size=14, out_size=7, patch=2, stride=2)
    assert (g.cells, g.window, g.x_pad, g.y_pad) == (4, 4, (1, 1), (1, 0))
    g = gf.grid(in_size=8, out_size=6, patch=2, stride=1)
    assert (g.cells, g.x_pad) == (3, (-1, -1))


# ---------------------------------------------------------------------------
# Modes, dtypes, frozen weights, vanilla
# ---------------------------------------------------------------------------


def _forbid_compression(layer: Any) -> None:
    def boom(*args: Any) -> Any:
        raise AssertionError("compressed although it should not")

    layer._compress = boom


@pytest.mark.parametrize("c", [CONV2D_CASES[0], LINEAR_CASES[1]], ids=lambda c: c.id)
def test_eval_and_no_grad_compress_nothing(c: Case) -> None:
    plain = c.layer(torch.float32)
    layer = compressed(plain, "asi", rank=0.8)
    _forbid_compression(layer)
    x = c.input(torch.float32)
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))
    layer.eval()
    y = layer(x.requires_grad_())
    assert torch.equal(y, plain(x))
    assert y.grad_fn is not None and "Compressed" not in type(y.grad_fn).__name__
    assert layer.last_result is None


def test_frozen_weight_and_vanilla_method_compress_nothing() -> None:
    c = CONV2D_CASES[0]
    plain = c.layer()
    frozen = compressed(plain, "hosvd")
    frozen.weight.requires_grad_(False)
    _forbid_compression(frozen)
    x = c.input().requires_grad_()
    frozen(x).sum().backward()
    vanilla = compressed(plain, "vanilla")
    _forbid_compression(vanilla)
    _, g0 = run(plain, c.input())
    _, g1 = run(vanilla, c.input())
    for name in g0:
        assert torch.equal(g1[name], g0[name])


@pytest.mark.parametrize("method", ["asi", "hosvd", "svd", "gradient_filter"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_autocast_bfloat16(method: str, kind: str) -> None:
    if kind == "linear" and method == "gradient_filter":
        pytest.skip("gradient filtering is for convolutions")
    torch.manual_seed(0)
    plain: nn.Module = nn.Conv2d(8, 6, 3, padding=1) if kind == "conv" else nn.Linear(8, 6)
    x = torch.randn((4, 8, 6, 6) if kind == "conv" else (4, 5, 8))
    layer = compressed(plain, method, rank=1.0, patch=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0 = plain(x)
        y1 = layer(x)
        y0.float().sum().backward()
        y1.float().sum().backward()
    assert y1.dtype == y0.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y0)
    res = layer.last_result
    kept = res.mean if isinstance(res, PatchAverage) else next(iter(res))  # type: ignore[arg-type]
    assert kept.dtype == torch.bfloat16  # kept at autocast's precision, like vanilla
    for p0, p1 in zip(plain.parameters(), layer.parameters()):
        assert p1.grad is not None and p0.grad is not None
        assert p1.grad.dtype == torch.float32
        assert torch.isfinite(p1.grad).all()
        if method != "gradient_filter":
            assert relative_error(p1.grad, p0.grad) < 0.05


def test_float64_under_autocast_is_left_alone() -> None:
    plain = nn.Conv2d(4, 3, 3).double()
    layer = compressed(plain, "asi")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert y.dtype == torch.float64


# ---------------------------------------------------------------------------
# Errors and randomness
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_names_the_layer(bad: float) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    model[2] = CompressedConv2d.from_module(model[2], CompressionConfig("hosvd"), name="2")
    x = torch.randn(2, 3, 8, 8)
    x[1, 0, 3, 3] = bad
    with pytest.raises(ValueError, match=r"layer '2' \(CompressedConv2d\).*NaN or Inf"):
        model(x)
    lin = CompressedLinear.from_module(nn.Linear(4, 2), CompressionConfig("asi"), name="head.fc")
    with pytest.raises(ValueError, match=r"'head\.fc'"):
        lin(torch.full((3, 4), bad))


def test_check_finite_false_skips_the_check() -> None:
    layer = compressed(nn.Conv2d(4, 2, 1), "gradient_filter", check_finite=False)
    x = torch.randn(3, 4, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    y = layer(x)  # no error: the caller opted out
    assert torch.isnan(y).any()


def test_global_rngs_untouched() -> None:
    x = realistic((16, 32, 8, 8), 0)
    layer = compressed(nn.Conv2d(32, 8, 3, padding=1), "asi", rank=(4, 6, 3, 3), seed=3)
    torch_state = torch.random.get_rng_state()
    np_state = np.random.get_state()[1].copy()  # type: ignore[index]  # noqa: NPY002
    for batch in (16, 5, 16):  # shrinking and growing the batch pads subspaces
        run(layer, x[:batch])
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)  # type: ignore[index]  # noqa: NPY002


def test_seeded_layers_are_reproducible() -> None:
    x = realistic((16, 32, 8, 8), 0)
    grads = []
    for _ in range(2):
        layer = compressed(nn.Conv2d(32, 8, 3, padding=1), "asi", rank=(4, 6, 3, 3), seed=3)
        for batch in (16, 5, 16):
            _, g = run(layer, x[:batch])
        grads.append(g["weight"])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"method": "tucker"}, ValueError),
        ({"method": "asi", "n_iter": -1}, ValueError),
        ({"method": "gradient_filter", "patch": 0}, ValueError),
        ({"method": "svd", "rank": (2, 3)}, TypeError),
        ({"method": "asi", "rank": 0}, ValueError),
        ({"method": "hosvd", "rank": 1.5}, ValueError),
        ({"method": "asi", "rank": "big"}, TypeError),
        ({"method": "asi", "seed": 1.5}, TypeError),
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        CompressionConfig(**kwargs)


def test_bad_modules_are_refused() -> None:
    with pytest.raises(ValueError, match="convolutions only"):
        CompressedLinear.from_module(nn.Linear(3, 2), CompressionConfig("gradient_filter"))
    with pytest.raises(TypeError, match="needs an Conv2d"):
        CompressedConv2d.from_module(nn.Conv1d(3, 2, 1), CompressionConfig())
    layer = CompressedConv2d.from_module(nn.Conv2d(3, 2, 1), CompressionConfig(rank=(1, 2, 3)))
    with pytest.raises(ValueError, match="one entry per mode"):
        layer(torch.randn(2, 3, 4, 4))


def test_direct_construction_and_repr() -> None:
    layer = CompressedConv2d(3, 4, 3, padding=1, compression=CompressionConfig("hosvd", 0.9))
    assert isinstance(layer, nn.Conv2d)
    assert "method='hosvd', rank=0.9" in repr(layer)
    assert layer(torch.randn(2, 3, 5, 5)).shape == (2, 4, 5, 5)
    assert layer.ranks is not None


def test_conv_spec_padding() -> None:
    spec = ConvSpec.make((4, 3), padding="same", dilation=(1, 2))
    assert spec.pads == ((1, 2), (2, 2))
    assert spec.native_padding is None
    with pytest.raises(ValueError, match="stride 1"):
        ConvSpec.make(3, stride=2, padding="same")
    assert ConvSpec.make(3, padding=1).native_padding == (1, 1)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_pad_rows_is_the_conv_padding(mode: str) -> None:
    # P u along one dim equals padding the tensor itself: the map the factors use.
    u = torch.randn(6, 3, dtype=torch.float64)
    padded = fn.pad_rows(u, 2, 3, mode)
    flat = "constant" if mode == "zeros" else mode
    want = F.pad(u.T[None], (2, 3), mode=flat)[0].T
    assert torch.equal(padded, want)


def test_double_backward_is_refused() -> None:
    layer = compressed(nn.Conv2d(3, 2, 3), "hosvd")
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


@pytest.mark.parametrize("method", ["asi", "hosvd", "svd", "gradient_filter"])
def test_all_zero_input_gives_finite_gradients(method: str) -> None:
    # Dead ReLU outputs: rank-deficient (zero) activations must not give NaN.
    plain = nn.Conv2d(3, 4, 3, padding=1)
    layer = compressed(plain, method, rank=0.8)
    for x in (torch.zeros(4, 3, 6, 6), torch.randn(4, 3, 6, 6), torch.zeros(4, 3, 6, 6)):
        _, g0 = run(plain, x)
        _, g = run(layer, x)
        assert all(torch.isfinite(v).all() for v in g.values())
        if not x.any():
            assert not g["weight"].any()  # dW of a zero input is exactly zero
        assert relative_error(g["input"], g0["input"]) < 1e-5
