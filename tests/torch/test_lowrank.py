"""Low-rank inference layers: factorisation, export from training, state_dict, back to dense."""

from __future__ import annotations

import copy
import inspect
import io
import types
from typing import Any

import pytest
import torch
from torch import nn

from tensorcompress.torch import lowrank, wasi
from tensorcompress.torch.budget import output_grams
from tensorcompress.torch.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    export_low_rank,
    factor_by_outputs,
    factorize,
    low_rank_layers,
    to_dense,
)
from tensorcompress.torch.wasi import WASIModule, refresh_subspaces, to_wasi, wasi_layers

pytestmark = pytest.mark.usefixtures("single_thread")


def test_factorize_is_the_truncated_svd() -> None:
    torch.manual_seed(0)
    m = torch.randn(30, 18, dtype=torch.float64)
    left, right, explained = factorize(m, 5)
    assert left.shape == (30, 5) and right.shape == (5, 18)
    torch.testing.assert_close(left.T @ left, torch.eye(5, dtype=torch.float64))
    s = torch.linalg.svdvals(m)
    # Eckart-Young: the error is the dropped singular values.
    err = torch.linalg.norm(m - left @ right)
    torch.testing.assert_close(err, s[5:].norm())
    assert explained == pytest.approx(float((s[:5] ** 2).sum() / (s**2).sum()), rel=1e-12)


def test_factorize_half_precision_returns_the_weights_dtype() -> None:
    m = torch.randn(8, 6).to(torch.bfloat16)
    left, right, _ = factorize(m, 3)
    assert left.dtype == right.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("rank", "error", "match"),
    [
        (7, ValueError, r"layer 'fc': rank 7 is outside \[1, 6\] for its 8x6 weight"),
        (0, ValueError, r"rank 0 is outside"),
        (0.0, ValueError, r"\(0, 1\]"),
        ("4", TypeError, r"rank must be an int or a float"),
    ],
)
def test_factorize_errors(rank: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        factorize(torch.randn(8, 6), rank, name="fc")


def test_factorize_refuses_non_finite_weights() -> None:
    m = torch.randn(4, 4)
    m[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        factorize(m, 2, name="fc")
    with pytest.raises(ValueError, match="NaN or Inf"):  # in the outputs' basis too
        factorize(m, 2, name="fc", output_gram=torch.eye(4))


def test_constructors() -> None:
    torch.manual_seed(0)
    lin = LowRankLinear(10, 6, 3)
    torch.testing.assert_close(lin.left.T @ lin.left, torch.eye(3), atol=1e-6, rtol=0)
    assert lin(torch.randn(2, 10)).shape == (2, 6)
    conv = LowRankConv2d(4, 8, 3, rank=5, padding=1, bias=False)
    assert conv(torch.randn(2, 4, 7, 7)).shape == (2, 8, 7, 7) and conv.bias is None
    with pytest.raises(ValueError, match=r"rank must be in \[1, min"):
        LowRankLinear(10, 6, 7)
    with pytest.raises(ValueError, match=r"rank must be in \[1, min"):
        LowRankConv2d(1, 16, 2, rank=5)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(
    "opts",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "padding": 2, "stride": 2, "dilation": 2, "padding_mode": "replicate"},
        {"kernel_size": (2, 4), "padding": "same"},
        {"kernel_size": 1, "bias": False},
    ],
)
def test_full_rank_conv_reproduces_the_dense_conv(opts: dict[str, Any]) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **opts).double()
    low = LowRankConv2d.from_dense(conv, 1.0)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(low(x), conv(x), rtol=1e-12, atol=1e-12)
    assert low.bias is conv.bias


def test_full_rank_linear_reproduces_the_dense_linear() -> None:
    lin = nn.Linear(7, 11).double()
    low = LowRankLinear.from_dense(lin, 1.0)
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(low(x), lin(x), rtol=1e-12, atol=1e-12)


def test_grouped_conv_is_refused_naming_the_layer() -> None:
    conv = nn.Conv2d(8, 8, 3, groups=8)
    with pytest.raises(ValueError, match=r"layer 'dw' \(Conv2d 8->8 3x3, groups=8\)"):
        LowRankConv2d.from_dense(conv, 2, name="dw")
    with pytest.raises(TypeError, match=r"layer 'fc'.*needs an nn.Conv2d, got Linear"):
        LowRankConv2d.from_dense(nn.Linear(3, 3), 2, name="fc")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Export of a trained model
# ---------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pw(torch.relu(self.conv(x)))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def _trained(method: str) -> tuple[nn.Module, torch.Tensor]:
    """A model after three optimizer steps (its last step not yet refreshed)."""
    torch.manual_seed(0)
    model = to_wasi(_Net(), method=method, rank=4, act_rank=0.8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 3, 10, 10)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, x


@pytest.mark.parametrize("method", ["wsi", "wasi"])
def test_export_gives_the_trained_models_outputs_exactly(method: str) -> None:
    model, x = _trained(method)
    refresh_subspaces(model)  # what the next training forward would do
    model.eval()
    exported = export_low_rank(model)
    with torch.no_grad():
        expected = model(x)
        got = exported(x)
    assert torch.equal(got, expected)
    kinds = {name: type(m) for name, m in low_rank_layers(exported).items()}
    assert kinds == {
        "conv": LowRankConv2d,
        "pw": LowRankConv2d,
        "fc1": LowRankLinear,
        "fc2": LowRankLinear,
    }
    assert not any(isinstance(m, WASIModule) for m in exported.modules())
    assert len(wasi_layers(model)) == 4  # the training model is untouched
    assert exported.fc1.left is not model.fc1.left  # a copy by default
    # The training-mode forward (nothing to refresh) computes the same products.
    model.train()
    assert torch.equal(model(x), expected)


def test_export_inplace_shares_the_parameters() -> None:
    model, _ = _trained("wasi")
    left = model.fc1.left
    exported = export_low_rank(model, inplace=True)
    assert exported is model and type(model.fc1) is LowRankLinear and model.fc1.left is left


def test_state_dict_round_trip() -> None:
    """Keys are the same for training and inference layers; both load each other's state."""
    model, x = _trained("wasi")
    exported = export_low_rank(model).eval()
    keys = set(exported.state_dict())
    assert keys == set(model.state_dict())
    assert {"fc1.left", "fc1.right", "fc1.bias", "conv.left", "conv.right"} <= keys
    assert not any(k.endswith("weight") for k in keys)
    buf = io.BytesIO()
    torch.save(exported.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(5)
    fresh = export_low_rank(to_wasi(_Net(), method="wasi", rank=4)).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), exported(x))
    fresh.load_state_dict(torch.load(buf))
    with torch.no_grad():
        assert torch.equal(fresh(x), exported(x))
    # ... and into a training model, which then trains on from there.
    torch.manual_seed(6)
    again = to_wasi(_Net(), method="wasi", rank=4)
    again.load_state_dict(exported.state_dict())
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(x), exported(x))


def test_frozen_layers_factored_by_their_outputs_export_exactly() -> None:
    """factor_by_outputs on the first (frozen) layers, WASI on the rest: training leaves
    the frozen factors as they were, and the export and a state_dict round trip give
    the trained model's outputs exactly."""
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(8, 3, 10, 10)
    model.conv.requires_grad_(False)
    model.pw.requires_grad_(False)
    grams = output_grams(model, [(x, None)], ["conv", "pw"])
    ranks = factor_by_outputs(model, grams, 0.6)
    assert set(ranks) == {"conv", "pw"} and type(model.conv) is type(model.pw) is LowRankConv2d
    to_wasi(model, method="wasi", rank=4, act_rank=0.8, layers=["fc1", "fc2"])
    frozen = [p.detach().clone() for p in (model.conv.left, model.pw.right)]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any(
        n.startswith(("conv.left", "conv.right", "pw.left", "pw.right")) for n in trained
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert torch.equal(model.conv.left, frozen[0]) and torch.equal(model.pw.right, frozen[1])
    refresh_subspaces(model)
    model.eval()
    exported = export_low_rank(model)
    with torch.no_grad():
        assert torch.equal(exported(x), model(x))
    fresh = copy.deepcopy(exported)
    for p in fresh.parameters():
        p.data.normal_()
    fresh.load_state_dict(exported.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_to_dense_forms_the_weight_and_keeps_the_function() -> None:
    model, x = _trained("wsi")
    model.eval()
    with torch.no_grad():
        expected = model(x)
    fc1_bias = model.fc1.bias
    product = model.fc1.left.detach() @ model.fc1.right.detach()
    dense = to_dense(model)
    assert type(dense.fc1) is nn.Linear and type(dense.conv) is nn.Conv2d
    assert dense.fc1.bias is fc1_bias
    assert dense.conv.stride == (2, 2) and dense.conv.padding == (1, 1)
    torch.testing.assert_close(dense.fc1.weight.detach(), product)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), expected, rtol=1e-5, atol=1e-6)
    exported = export_low_rank(_trained("wasi")[0])
    assert type(to_dense(exported.fc2)) is nn.Linear  # a single layer works too


@pytest.mark.parametrize("module", [lowrank, wasi])
def test_public_names_are_exported_and_documented(module: types.ModuleType) -> None:
    defined = {
        name
        for name, f in inspect.getmembers(module, inspect.isfunction)
        if f.__module__ == module.__name__ and not name.startswith("_")
    }
    assert defined <= set(module.__all__), defined - set(module.__all__)
    own = [getattr(module, name) for name in module.__all__]
    assert all(o.__doc__ for o in own if inspect.isroutine(o) or inspect.isclass(o))
