"""Tests for tensorcompress.models: torchvision-compatible topology and MCUNet-in1 spec."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from tensorcompress.models import (
    MODEL_NAMES,
    get_model,
    mcunet_in1,
    mobilenet_v2,
    resnet18,
)

# Known torchvision numbers at 1000 classes: (parameters, state_dict entries).
TORCHVISION_COUNTS = {
    "resnet18": (11_689_512, 122),
    "resnet34": (21_797_672, 218),
    "mobilenet_v2": (3_504_872, 314),
}

# A few torchvision state_dict keys with their shapes, to pin names and not only counts.
TORCHVISION_KEYS = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.num_batches_tracked": (),
        "layer4.1.bn2.weight": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    },
    "resnet34": {
        "layer3.5.conv2.weight": (256, 256, 3, 3),
        "layer4.0.downsample.1.running_var": (512,),
        "fc.weight": (1000, 512),
    },
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.running_var": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.bias": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.running_mean": (24,),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.weight": (1280,),
        "classifier.1.weight": (1000, 1280),
        "classifier.1.bias": (1000,),
    },
}

# The conv table of the MCUNet-in1 docs page (docs/mcunet-in1.md), one source for
# the docs and this test: name, type, in, out, kernel, stride, groups, input H at 224.
_MCUNET_PAGE = Path(__file__).resolve().parents[2] / "docs" / "mcunet-in1.md"
_SHORT = {"ib": "inverted_bottleneck", "dw": "depth_conv", "pl": "point_linear"}


def _spec_rows() -> list[tuple[str, int, int, int, int, int, int]]:
    rows = []
    for line in _MCUNET_PAGE.read_text().splitlines():
        if not re.match(r"\| \d+ \| (first_conv|b\d+\.)", line):
            continue
        _, short, _, *nums = (cell.strip() for cell in line.strip("|").split("|"))
        if short == "first_conv":
            name = "first_conv.conv"
        else:
            blk, kind = short.split(".")
            name = f"blocks.{blk[1:]}.mobile_inverted_conv.{_SHORT[kind]}.conv"
        i, o, k, s, g, h = (int(v) for v in nums)
        rows.append((name, i, o, k, s, g, h))
    return rows


MCUNET_SPEC = _spec_rows()
# Blocks with an identity skip, from the spec's "Blocks" table.
MCUNET_SKIP_BLOCKS = {2, 4, 6, 8, 9, 11, 12}


def _convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_torchvision_not_imported() -> None:
    assert "torchvision" not in sys.modules


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "mobilenet_v2"])
def test_torchvision_param_and_key_counts(name: str) -> None:
    model = get_model(name)
    params, entries = TORCHVISION_COUNTS[name]
    assert _n_params(model) == params
    sd = model.state_dict()
    assert len(sd) == entries
    for key, shape in TORCHVISION_KEYS[name].items():
        assert tuple(sd[key].shape) == shape, key


def test_mobilenet_structure() -> None:
    model = mobilenet_v2()
    assert len(model.features) == 19
    # torchvision's MobileNetV2 has 10 blocks with a residual connection.
    assert sum(getattr(m, "use_res_connect", False) for m in model.features) == 10
    assert isinstance(model.classifier[0], nn.Dropout)
    assert model.classifier[0].p == pytest.approx(0.2)
    assert isinstance(model.features[0][2], nn.ReLU6)
    # Narrow width: channels stay multiples of 8, the last layer stays 1280.
    slim = mobilenet_v2(num_classes=10, width_mult=0.5)
    assert all(m.out_channels % 8 == 0 for m in slim.modules() if isinstance(m, nn.Conv2d))
    assert slim.classifier[1].in_features == 1280


def test_init_like_torchvision() -> None:
    torch.manual_seed(0)
    for model in (resnet18(num_classes=10), mobilenet_v2(num_classes=10), mcunet_in1(10)):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert torch.all(m.weight == 1)
                assert torch.all(m.bias == 0)
    # kaiming_normal_(fan_out): std = sqrt(2 / (out_channels * k * k)).
    conv = resnet18().layer4[0].conv2
    assert conv.weight.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.05)
    fc = mobilenet_v2().classifier[1]
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(fc.bias == 0)


@pytest.mark.parametrize(
    ("name", "size"),
    [("resnet18", 64), ("resnet34", 64), ("mobilenet_v2", 32), ("mcunet_in1", 64)],
)
def test_output_shape(name: str, size: int) -> None:
    model = get_model(name, num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_round_trip(name: str) -> None:
    a = get_model(name, num_classes=10).eval()
    b = get_model(name, num_classes=10).eval()
    # Make running stats non-trivial so buffers are exercised too.
    for m in a.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_get_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="valid names") as info:
        get_model("resnet50")
    for name in MODEL_NAMES:
        assert name in str(info.value)


def test_get_model_aliases() -> None:
    assert _n_params(get_model("MCUNet-In1")) == _n_params(get_model("mcunet_in1"))


def test_get_model_weights(tmp_path: Path) -> None:
    src = mcunet_in1(num_classes=10)
    path = tmp_path / "mcunet.pt"
    torch.save(src.state_dict(), path)
    loaded = get_model("mcunet_in1", num_classes=10, weights=path)
    for (ka, va), (kb, vb) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb
        assert torch.equal(va, vb)
    get_model("mcunet_in1", num_classes=10, weights=str(path))  # str paths work too


@pytest.mark.parametrize(
    ("name", "num_classes"),
    [("mcunet_in1", 1000), ("resnet18", 10)],  # shape mismatch; missing/unexpected keys
)
def test_get_model_weights_mismatch(tmp_path: Path, name: str, num_classes: int) -> None:
    path = tmp_path / "weights.pt"
    torch.save(mcunet_in1(num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match="does not match") as info:
        get_model(name, num_classes=num_classes, weights=path)
    assert str(path) in str(info.value)


def test_get_model_weights_not_a_state_dict(tmp_path: Path) -> None:
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(ValueError, match="expected a state_dict") as info:
        get_model("mcunet_in1", weights=tensor_file)
    assert str(tensor_file) in str(info.value)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read") as info:
        get_model("mcunet_in1", weights=garbage)
    assert str(garbage) in str(info.value)

    with pytest.raises(FileNotFoundError):
        get_model("mcunet_in1", weights=tmp_path / "missing.pt")


def test_mcunet_convs_match_spec() -> None:
    convs = _convs(mcunet_in1())
    assert len(convs) == 42
    got = [(n, c.in_channels, c.out_channels, c.kernel_size, c.stride, c.groups) for n, c in convs]
    want = [(n, i, o, (k, k), (s, s), g) for n, i, o, k, s, g, _ in MCUNET_SPEC]
    assert got == want
    for _, c in convs:
        assert c.bias is None
        assert c.padding == (c.kernel_size[0] // 2,) * 2


def test_mcunet_bn_act_and_skips() -> None:
    model = mcunet_in1()
    modules = dict(model.named_modules())
    for name, *_ in MCUNET_SPEC:
        parent = modules[name.removesuffix(".conv")]
        assert isinstance(parent.bn, nn.BatchNorm2d)
        assert parent.bn.eps == 1e-5
        assert parent.bn.momentum == 0.1
        is_project = ".point_linear." in name
        assert hasattr(parent, "act") != is_project
        if not is_project:
            assert isinstance(parent.act, nn.ReLU6)
    assert model.blocks[0].mobile_inverted_conv.inverted_bottleneck is None
    skips = {i for i, b in enumerate(model.blocks) if b.use_res_connect}
    assert skips == MCUNET_SKIP_BLOCKS
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.in_features == 160
    assert model.classifier.bias is not None


def test_mcunet_param_count_from_spec() -> None:
    # Conv weights + BN (weight, bias) per conv + Linear(160, 1000) with bias.
    conv = sum(o * (i // g) * k * k for _, i, o, k, _, g, _ in MCUNET_SPEC)
    bn = sum(2 * o for _, _, o, *_ in MCUNET_SPEC)
    assert _n_params(mcunet_in1()) == conv + bn + 160 * 1000 + 1000


def test_mcunet_forward_224() -> None:
    model = mcunet_in1().eval()
    convs = _convs(model)
    order: list[str] = []
    heights: list[int] = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            order.append(name)
            heights.append(inputs[0].shape[-1])

        return hook

    handles = [c.register_forward_hook(make_hook(n)) for n, c in convs]
    try:
        with torch.no_grad():
            x = torch.randn(1, 3, 224, 224)
            feats = model.forward_features(x)
            assert feats.shape == (1, 160, 7, 7)
            order.clear()
            heights.clear()
            assert model(x).shape == (1, 1000)
    finally:
        for h in handles:
            h.remove()
    # Execution order equals module order, so "last N convs" means the same either way.
    assert order == [n for n, _ in convs]
    assert heights == [h for *_, h in MCUNET_SPEC]
    assert heights[-4:] == [7, 7, 7, 7]


def test_vit_tiny_small_data_init() -> None:
    pytest.importorskip("transformers")
    from tensorcompress.models.transformers import vit_tiny

    torch.manual_seed(0)
    new = vit_tiny(num_layers=4)
    torch.manual_seed(0)
    old = vit_tiny(num_layers=4, small_data_init=False)
    # The same model: only the initial values differ.
    assert {k: v.shape for k, v in new.state_dict().items()} == {
        k: v.shape for k, v in old.state_dict().items()
    }
    # Position embeddings as large as the patches' content, not N(0, 0.02²).
    assert abs(float(new.vit.embeddings.position_embeddings.std()) - 1.0) < 0.05
    assert float(old.vit.embeddings.position_embeddings.std()) < 0.05
    conv = new.vit.embeddings.patch_embeddings.projection.weight
    assert abs(float(conv.std()) * 48**0.5 - 1.0) < 0.1  # LeCun-normal
    # First two blocks Glorot-uniform (std sqrt(2 / (in + out))), the rest unchanged.
    for i, block in enumerate(new.vit.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = getattr(block.attention, name).weight
            want = (2 / 384) ** 0.5 if i < 2 else 0.02
            assert abs(float(w.std()) / want - 1) < 0.1, (i, name)
        fc1 = block.mlp.fc1.weight
        assert abs(float(fc1.std()) / ((2 / 960) ** 0.5 if i < 2 else 0.02) - 1) < 0.1
    assert abs(float(new.classifier.weight.std()) / 0.02 - 1) < 0.15
    x = torch.randn(2, 3, 32, 32)
    assert new(x).logits.shape == (2, 10)
