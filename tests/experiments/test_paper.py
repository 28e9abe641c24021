"""Tests for tensorcompress.experiments.paper: the paper's figures and its hand formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tensorcompress.experiments.paper import (
    PAPER_METHODS,
    PAPER_TABLE,
    PaperFigure,
    PaperFlops,
    paper_figure,
    paper_flops,
    paper_layer_flops,
    paper_mem_bytes,
)
from tensorcompress.experiments.table import ConvCall, probe_convs
from tensorcompress.models import MODEL_NAMES, get_model
from tensorcompress.torch import METHODS
from tensorcompress.torch.flops import training_step_flops
from tensorcompress.torch.measure import MB

F32 = 4

# One intra-op thread for these small tensors (the fixture is in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def convs_224() -> dict[str, list[ConvCall]]:
    """Every model's convs at 224x224 (one batch-1 forward each)."""
    return {name: probe_convs(get_model(name), 224) for name in MODEL_NAMES}


# ---------------------------------------------------------------------------
# The paper's figures, from the architecture alone
# ---------------------------------------------------------------------------


def test_paper_table_data() -> None:
    assert len(PAPER_TABLE) == 34
    assert {f.model for f in PAPER_TABLE} == set(MODEL_NAMES)
    # The table's methods in its order, all of them adapter methods (no SVD row).
    assert PAPER_METHODS == ("vanilla", "gradient_filter", "hosvd", "asi")
    assert set(PAPER_METHODS) < set(METHODS)
    fig = paper_figure("mcunet_in1", "gradient_filter", 4)
    assert fig is not None and (fig.mem_mb, fig.gflops) == (6.38, 19.89)
    assert paper_figure("resnet18", "vanilla", 4) is None  # not in the paper


ARCHITECTURE_FIGURES = [f for f in PAPER_TABLE if f.method in ("vanilla", "gradient_filter")]


@pytest.mark.parametrize(
    "fig", ARCHITECTURE_FIGURES, ids=lambda f: f"{f.model}-{f.method}-{f.layers or 'all'}"
)
def test_every_vanilla_and_gradient_filter_figure(
    fig: PaperFigure, convs_224: dict[str, list[ConvCall]]
) -> None:
    convs = convs_224[fig.model]
    chosen = convs if fig.layers is None else convs[-fig.layers :]
    gflops = paper_flops(chosen, fig.method, 64).gflops
    assert f"{gflops:.2f}" == f"{fig.gflops:.2f}"
    mem_mb = paper_mem_bytes(chosen, fig.method, 64) / MB
    if (fig.model, fig.layers) == ("resnet34", None):
        # The paper prints 839.04; its 36 conv inputs hold 839.125 MB.
        assert mem_mb == 839.125
    else:
        assert f"{mem_mb:.2f}" == f"{fig.mem_mb:.2f}"


def test_formula_at_other_sizes() -> None:
    r18 = probe_convs(get_model("resnet18"), 96)  # final maps 3x3
    assert paper_mem_bytes(r18[-2:], "vanilla", 3) == 2 * 3 * 512 * 3 * 3 * F32
    assert paper_mem_bytes(r18[-2:], "gradient_filter", 3) == 2 * 3 * 512 * 2 * 2 * F32
    macs = 3 * 3 * 3 * 512 * 512 * 9
    assert paper_flops(r18[-2:], "vanilla", 3).total == 2 * 2 * macs

    r18 = probe_convs(get_model("resnet18"), 160)  # final maps 5x5, downsample reads 10x10
    gf = 3 * 5 * 512 * 3 * 3 * F32 + 5 * 256 * 3 * 3 * F32
    assert paper_mem_bytes(r18[-4:], "gradient_filter", 5) == gf

    mcu = probe_convs(get_model("mcunet_in1"), 96)  # the native resolution: 576 x 3 x 3
    assert paper_mem_bytes(mcu[-2:], "vanilla", 8) == 2 * 8 * 576 * 9 * F32
    mbv2 = probe_convs(get_model("mobilenet_v2"), 128)  # 960 and 320 channels at 4x4
    assert paper_mem_bytes(mbv2[-2:], "vanilla", 2) == 2 * (960 + 320) * 16 * F32
    assert paper_mem_bytes(mbv2[-2:], "gradient_filter", 2) == 2 * (960 + 320) * 4 * F32


def test_tucker_formula_needs_ranks(convs_224: dict[str, list[ConvCall]]) -> None:
    convs = convs_224["resnet18"][-2:]
    ranks = [(8, 20, 3, 3), (6, 10, 2, 2)]
    expected = sum(
        (math.prod(r) + sum(n * k for n, k in zip((64, 512, 7, 7), r))) * F32 for r in ranks
    )
    assert paper_mem_bytes(convs, "hosvd", 64, ranks=ranks) == expected
    with pytest.raises(ValueError, match="rank"):
        paper_mem_bytes(convs, "asi", 64)
    with pytest.raises(ValueError, match="rank"):
        paper_flops(convs, "hosvd", 64, ranks=ranks[:1])
    with pytest.raises(ValueError, match="paper's"):
        paper_flops(convs, "svd", 64)


# ---------------------------------------------------------------------------
# One conv by the paper's formulas
# ---------------------------------------------------------------------------


def test_paper_vanilla_resnet_last_two_convs() -> None:
    layer = paper_layer_flops("vanilla", (64, 512, 7, 7), (64, 512, 7, 7), (3, 3))
    macs = 64 * 7 * 7 * 512 * 512 * 9
    assert layer.forward == layer.backward == macs
    assert round((layer + layer).gflops, 2) == 29.60  # the paper's 2-layer figure


def test_paper_formulas_by_hand() -> None:
    b, c, h, w, c2, h2, w2, k = 2, 4, 6, 6, 8, 3, 3, 3
    conv = k * k * c2 * c * h * w * b  # charged at the input resolution: stride ignored
    van = paper_layer_flops("vanilla", (b, c, h, w), (b, c2, h2, w2), (k, k))
    assert (van.forward, van.backward) == (conv, k * k * c * c2 * h2 * w2 * b)
    gf = paper_layer_flops("gradient_filter", (b, c, h, w), (b, c2, h2, w2), (k, k), patch=2)
    assert gf.forward == 3 * 3 * 3 * c * b + conv
    assert gf.backward == 2 * b * c2 * 1.5 * 1.5 + c2 * c * (k * k - 1) + conv
    ranks = (1, 2, 3, 4)
    asi = paper_layer_flops("asi", (b, c, h, w), (b, c2, h2, w2), (k, k), ranks=ranks)
    assert asi.forward == sum(2 * b * c * h * w * r + r**3 for r in ranks) + conv
    assert (
        asi.backward
        == (1 * c2 * h2 * w2 * b + h * 24 + h * w * 1 * 2 * 4 + c2 * 1 * 2 * k * k * h2 * w2)
        + c2 * c * k * k * 2
    )
    hos = paper_layer_flops("hosvd", (b, c, h, w), (b, c2, h2, w2), (k, k), ranks=ranks)
    size = b * c * h * w
    svds = sum(max(n, size // n) ** 2 * min(n, size // n) for n in (b, c, h, w))
    assert hos.forward == svds + conv and hos.backward == asi.backward
    assert isinstance(hos + asi, PaperFlops)


def test_paper_charges_a_depthwise_conv_as_a_dense_one() -> None:
    dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    counted = training_step_flops(dw, torch.randn(2, 16, 8, 8))  # 2 flops per MAC, with groups
    paper = paper_layer_flops("vanilla", (2, 16, 8, 8), (2, 16, 8, 8), (3, 3))
    assert paper.forward == 16 * counted.forward / 2


@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
        ("hosvd", {}, "four ranks"),
        ("asi", {"ranks": (1, 2, 3)}, "four ranks"),
        ("svd", {}, "method must be one of the paper's"),
        ("gradient_filter", {"patch": 0}, "patch"),
    ],
)
def test_paper_formula_bad_input(method: str, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        paper_layer_flops(method, (1, 2, 3, 3), (1, 2, 3, 3), (1, 1), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="B, C, H, W"):
        paper_layer_flops("vanilla", (1, 2, 3), (1, 2, 3, 3), (1, 1))


def test_error_names_the_paper_methods_tuple() -> None:
    with pytest.raises(ValueError) as info:
        paper_layer_flops("lora", (1, 2, 3, 3), (1, 2, 3, 3), (1, 1))
    assert str(PAPER_METHODS) in str(info.value)
