"""The one selector, the one execution-order tracer and the one freeze rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorcompress.models import resnet18
from tensorcompress.torch import convert, fine_tuned_modules, last_layers, select_layers
from tensorcompress.torch.selection import call_model, execution_order, split_example

pytestmark = pytest.mark.usefixtures("single_thread")


class Reversed(nn.Module):
    """Registers its layers in the opposite order to the one it runs them in."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.norm = nn.BatchNorm2d(4)
        self.second = nn.Conv2d(4, 4, 3, padding=1)
        self.first = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.second(self.first(x)))
        return self.head(x.mean((2, 3)))


class Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.fc(x) * scale


def test_example_inputs_dispatch_one_way() -> None:
    x = torch.randn(2, 3)
    assert split_example(x) == ((x,), {})
    assert split_example((x, 2)) == ((x, 2), {})
    assert split_example({"x": x}) == ((), {"x": x})
    model = Keywords()
    torch.testing.assert_close(call_model(model, {"x": x, "scale": 2.0}), 2 * model(x))


def test_execution_order_is_the_forward_order() -> None:
    model = Reversed()
    x = torch.randn(2, 3, 6, 6)
    assert execution_order(model, x) == ["first", "second", "norm", "head"]
    assert select_layers(model, last_layers(1), x) == ["second"]
    assert select_layers(model, last_layers(1)) == ["first"]  # module order without an input


def test_none_means_every_supported_layer_converted_or_not() -> None:
    model = Reversed()
    convert(model, method="asi", rank=0.8, layers=["first"])
    assert select_layers(model) == ["head", "second", "first"]


def test_freeze_rule_follows_execution_order() -> None:
    model = Reversed()
    x = torch.randn(2, 3, 6, 6)
    assert fine_tuned_modules(model, ["second"], x) == ["second", "norm", "head"]
    with pytest.raises(ValueError, match="do not run"):
        fine_tuned_modules(model, ["nope"], x)
    with pytest.raises(ValueError, match="empty"):
        fine_tuned_modules(model, [], x)


def test_freeze_rule_on_resnet_last_convs() -> None:
    model = resnet18(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    convs = select_layers(model, last_layers(2), x)
    assert convs == ["layer4.1.conv1", "layer4.1.conv2"]
    assert fine_tuned_modules(model, convs, x) == [
        *convs[:1],
        "layer4.1.bn1",
        convs[1],
        "layer4.1.bn2",
        "fc",
    ]
