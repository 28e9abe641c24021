"""convert / restore, layer selection, state_dict compatibility and freezing."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

from tensorcompress.models import mobilenet_v2, resnet18
from tensorcompress.torch import (
    CompressedConv2d,
    CompressedLinear,
    CompressedModule,
    CompressionConfig,
    compressed_layers,
    convert,
    last_layers,
    restore,
    trainable_only,
)

# One intra-op thread for these small tensors (the fixture is in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


class OutOfOrder(nn.Module):
    """Registers ``c, a, b`` but runs ``a, b, c, a`` (a shared layer runs twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.unused = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(self.b(self.a(x)))
        return self.fc(x.mean((2, 3)))


def _small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return resnet18(num_classes=10)


def test_last_layers_follows_execution_order() -> None:
    model = OutOfOrder()
    x = torch.randn(2, 3, 8, 8)
    assert last_layers(2).select(model, x) == ["b.0", "c"]
    assert last_layers(3).select(model, x) == ["a", "b.0", "c"]  # "unused" never runs
    assert last_layers(2, include_linear=True).select(model, x) == ["c", "fc"]
    # Without an example input: module (registration) order, as documented.
    assert last_layers(2).select(model) == ["b.0", "unused"]
    with pytest.raises(ValueError, match="only 3 conv layers that run"):
        last_layers(4).select(model, x)


def test_tracing_changes_no_state() -> None:
    model = OutOfOrder().train()
    model.b[1].eval()  # a mixed-mode model keeps its modes
    before = copy.deepcopy(model.state_dict())
    convert(
        model, method="asi", rank=0.8, layers=last_layers(2), example_input=torch.randn(2, 3, 8, 8)
    )
    assert model.training and not model.b[1].training and model.a.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_resnet18_last_layers_match_the_paper() -> None:
    model = _small_resnet()
    x = torch.randn(1, 3, 32, 32)
    expected = ["layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2"]
    assert last_layers(4).select(model, x) == expected
    assert last_layers(4).select(model) == expected  # module order is execution order here


def test_convert_restore_round_trip() -> None:
    model = _small_resnet()
    reference = copy.deepcopy(model)
    params = {name: p for name, p in model.named_parameters()}
    x = torch.randn(2, 3, 32, 32)
    out = convert(model, method="asi", rank=0.8, layers=last_layers(4), example_input=x)
    assert out is model
    layers = compressed_layers(model)
    assert list(layers) == last_layers(4).select(reference)
    assert all(isinstance(m, CompressedConv2d) for m in layers.values())
    # Same Parameter objects under the same names: optimisers and state_dicts are unaffected.
    assert {name: p for name, p in model.named_parameters()} == params
    model.eval()
    reference.eval()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    restore(model)
    assert not compressed_layers(model)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules() if hasattr(m, "weight")
               and not isinstance(m, nn.BatchNorm2d))  # fmt: skip
    assert {name: p for name, p in model.named_parameters()} == params
    assert repr(model) == repr(reference)


def test_state_dict_loads_both_ways() -> None:
    plain = _small_resnet()
    converted = convert(copy.deepcopy(plain), method="hosvd", rank=0.8)
    assert list(converted.state_dict()) == list(plain.state_dict())
    torch.manual_seed(1)
    other = resnet18(num_classes=10)
    converted.load_state_dict(other.state_dict(), strict=True)
    plain.load_state_dict(converted.state_dict(), strict=True)
    for key, value in other.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value)
    buffer = io.BytesIO()
    torch.save(converted, buffer)  # a converted model pickles
    buffer.seek(0)
    assert isinstance(torch.load(buffer, weights_only=False).fc, CompressedLinear)


def test_training_step_matches_vanilla_at_full_rank() -> None:
    model = _small_resnet().double()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    convert(
        model, method="hosvd", rank=1.0, layers=last_layers(3, include_linear=True), example_input=x
    )
    for net in (model, reference):
        net.train()
        trainable_only(net, ["layer4.1", "fc"])
        net(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None and q.grad is not None:
            assert relative_error(p.grad, q.grad) < 1e-9, name


@pytest.mark.parametrize("method", ["asi", "hosvd", "svd", "gradient_filter"])
def test_mobilenet_fine_tuning_runs(method: str) -> None:
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    convert(
        model, method=method, rank=0.8, layers=last_layers(5), example_input=x, freeze_others=True
    )
    kinds = {type(m).__name__ for m in compressed_layers(model).values()}
    assert kinds == {"CompressedConv2d"}
    groups = {m.groups for m in compressed_layers(model).values()}  # type: ignore[attr-defined]
    assert max(groups) > 1  # a depthwise conv is among them
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).logsumexp(1).mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        selected = any(name.startswith(n + ".") for n in compressed_layers(model))
        assert p.requires_grad == selected, name
        assert (p.grad is not None) == selected, name
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


def test_selection_by_filter_names_and_rank_dict() -> None:
    model = OutOfOrder()
    convert(
        model, method="svd", rank={"a": 2, "fc": 0.9}, layers=lambda m, name: name in ("a", "fc")
    )
    assert set(compressed_layers(model)) == {"a", "fc"}
    assert model.a.compression.rank == 2  # type: ignore[union-attr]
    assert model.fc.compression.rank == 0.9  # type: ignore[union-attr]
    # Converting again reconfigures (and resets) the same layers.
    convert(model, method="asi", rank=0.5, layers=["a", "b.0"], n_iter=2, seed=7)
    assert model.a.compression.method == "asi"  # type: ignore[union-attr]
    assert model.a.compression.n_iter == 2  # type: ignore[union-attr]
    assert model.b[0].compression.seed == 7  # type: ignore[union-attr]
    assert model.fc.compression.method == "svd"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"layers": ["nope"]}, ValueError, "not modules of the model"),
        ({"layers": ["b.1"]}, TypeError, "BatchNorm2d"),
        ({"layers": "a"}, TypeError, "list of names"),
        ({"layers": ["a"], "rank": {"c": 0.8}}, ValueError, "missing"),
        ({"layers": ["a"], "nonsense": 1}, TypeError, "unknown options"),
        ({"layers": ["fc"], "method": "gradient_filter"}, ValueError, "convolutions only"),
        ({"method": "magic"}, ValueError, "method must be"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        convert(OutOfOrder(), **kwargs)
    with pytest.raises(ValueError, match="positive int"):
        last_layers(0)


def test_shared_layer_is_replaced_everywhere_and_hooks_survive() -> None:
    shared = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared))
    calls: list[int] = []
    shared.register_forward_hook(lambda m, i, o: calls.append(1))
    convert(model, method="hosvd", rank=0.8)
    assert model[0] is model[2][0] and isinstance(model[0], CompressedConv2d)
    model(torch.randn(2, 3, 4, 4))
    assert len(calls) == 2
    restore(model)
    assert model[0] is model[2][0] and type(model[0]) is nn.Conv2d


def test_single_layer_model_and_subclasses() -> None:
    layer = convert(nn.Conv2d(3, 4, 3), method="asi", rank=0.8)
    assert isinstance(layer, CompressedModule)
    assert type(restore(layer)) is nn.Conv2d

    class MyConv(nn.Conv2d):
        pass

    # Subclasses may override forward: not candidates, and refused by name.
    model = nn.Sequential(MyConv(3, 3, 1), nn.Conv2d(3, 3, 1))
    convert(model, method="asi", rank=0.8)
    assert type(model[0]) is MyConv and isinstance(model[1], CompressedConv2d)
    with pytest.raises(TypeError, match="MyConv"):
        convert(model, method="asi", rank=0.8, layers=["0"])


def test_trainable_only() -> None:
    model = OutOfOrder()
    trainable_only(model, ["a", "fc"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a.weight", "a.bias", "fc.weight", "fc.bias"}
    with pytest.raises(ValueError, match="not a module"):
        trainable_only(model, ["zz"])


def test_config_object_and_keyword_form_agree() -> None:
    config = CompressionConfig(method="hosvd", rank=0.9, n_iter=2, seed=3)
    by_config = convert(OutOfOrder(), config, ["a", "fc"])
    by_keywords = convert(OutOfOrder(), method="hosvd", rank=0.9, n_iter=2, seed=3, layers=["a"])
    assert by_config.a.compression == by_keywords.a.compression == config  # type: ignore[union-attr]
    # Keywords next to a config replace its fields.
    model = convert(OutOfOrder(), config, ["a"], rank=0.5)
    assert model.a.compression == CompressionConfig("hosvd", 0.5, n_iter=2, seed=3)  # type: ignore[union-attr]
    with pytest.raises(TypeError, match="config must be a CompressionConfig"):
        convert(OutOfOrder(), "asi", ["a"])  # type: ignore[arg-type]


def test_restore_undoes_freeze_others() -> None:
    model = OutOfOrder()
    model.b[1].weight.requires_grad_(False)  # the user's own choice survives
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    convert(model, method="asi", rank=0.8, layers=["a"], freeze_others=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"a.weight", "a.bias"}
    restore(model)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert not compressed_layers(model)
