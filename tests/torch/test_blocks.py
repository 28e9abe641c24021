"""last_blocks: the layers of a model's last repeated blocks, found generically.

Hugging Face models are in tests/models/test_transformers.py; these models
are plain torch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorcompress.models import mcunet_in1, resnet18
from tensorcompress.torch import (
    LastBlocks,
    compressed_layers,
    convert,
    find_blocks,
    last_blocks,
    select_layers,
)
from tensorcompress.torch.measure import activation_memory

pytestmark = pytest.mark.usefixtures("single_thread")

D = 8


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Block(nn.Module):
    """Registers its layers in another order than it runs them, and holds experts."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.inp = nn.Linear(D, D)
        self.experts = nn.ModuleList(Expert() for _ in range(6))  # longer than the block list

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(self.norm(x))
        return x + self.out(self.experts[0](h))  # the other experts never run


class Net(nn.Module):
    def __init__(self, n_blocks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, D)
        self.stack = nn.ModuleList(Block() for _ in range(n_blocks))
        self.head = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.stack:
            x = block(x)
        return self.head(x)


def test_blocks_are_the_outer_list_of_one_class() -> None:
    model = Net()
    name, blocks = find_blocks(model)
    assert name == "stack" and blocks is model.stack  # not the longer lists of experts inside
    assert last_blocks(2).block_names(model) == ["stack.1", "stack.2"]


def test_last_blocks_selects_their_layers_in_execution_order() -> None:
    model = Net()
    x = torch.randn(2, 5, 4)
    ran = ["stack.2.inp", "stack.2.experts.0.fc", "stack.2.out"]
    assert select_layers(model, last_blocks(1), x) == ran  # experts that never run are out
    everything = ["stack.2.out", "stack.2.inp", *(f"stack.2.experts.{i}.fc" for i in range(6))]
    assert select_layers(model, last_blocks(1)) == everything  # module order without an input
    assert select_layers(model, last_blocks(2), x)[:3] == [s.replace("2", "1") for s in ran]
    assert "head" not in select_layers(model, last_blocks(3), x)  # outside the blocks


def test_convert_and_measure_take_the_selector() -> None:
    model = Net()
    x = torch.randn(2, 5, 4)
    convert(model, method="asi", rank=0.9, layers=last_blocks(1), example_input=x)
    selected = select_layers(model, last_blocks(1), x)
    assert set(compressed_layers(model)) == set(selected)  # the experts that never run are not
    report = activation_memory(model, x, layers=last_blocks(1))
    assert [layer.name for layer in report.layers] == selected
    assert all(layer.method == "asi" for layer in report.layers)


def test_named_block_lists() -> None:
    resnet = resnet18(num_classes=10)
    with pytest.raises(ValueError, match="found no repeated blocks in ResNet"):
        find_blocks(resnet)  # its stages are nn.Sequential: name one
    x = torch.randn(1, 3, 32, 32)
    assert select_layers(resnet, last_blocks(1, blocks="layer4"), x) == [
        "layer4.1.conv1",
        "layer4.1.conv2",
    ]
    # MCUNet's inverted-residual blocks are an nn.ModuleList of one class.
    name, _ = find_blocks(mcunet_in1(num_classes=10))
    assert name == "blocks"
    with pytest.raises(ValueError, match="is not a module"):
        find_blocks(resnet, "layer9")
    with pytest.raises(TypeError, match=r"not an nn\.ModuleList or nn\.Sequential"):
        find_blocks(resnet, "fc")


def test_a_tie_and_bad_arguments_are_errors() -> None:
    tied = nn.ModuleDict(
        {
            "encoder": nn.ModuleList(nn.Sequential(nn.Linear(D, D)) for _ in range(2)),
            "decoder": nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.ReLU()) for _ in range(2)),
        }
    )
    with pytest.raises(
        ValueError, match=r"2 block lists of 2 blocks each: \['encoder', 'decoder'\]"
    ):
        find_blocks(tied)
    assert select_layers(tied, last_blocks(1, blocks="decoder")) == ["decoder.1.0"]
    with pytest.raises(ValueError, match=r"last_blocks\(4\) but 'stack' holds only 3 blocks"):
        select_layers(Net(), last_blocks(4))
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive int"):
            last_blocks(n)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="qualified name"):
        last_blocks(1, blocks=3)  # type: ignore[arg-type]
    assert last_blocks(2) == LastBlocks(2)


def test_multihead_attention_is_refused() -> None:
    layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    assert find_blocks(model)[0] == "layers"
    with pytest.raises(ValueError, match="MultiheadAttention") as info:
        select_layers(model, last_blocks(1))
    message = str(info.value)
    assert "'layers.1.self_attn'" in message and "in_proj_weight" in message
    assert "out_proj" in message and "not converted" in message
    # The message names the layers that can be selected instead, and they can.
    assert "layers=['layers.1.linear1', 'layers.1.linear2']" in message
    convert(model, method="asi", rank=0.9, layers=["layers.1.linear1", "layers.1.linear2"])
    assert list(compressed_layers(model)) == ["layers.1.linear1", "layers.1.linear2"]


class Tied(nn.Module):
    """One block object three times in the list (weights shared across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, D)
        block = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
        self.layers = nn.ModuleList([block] * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.layers:
            x = block(x)
        return x


def test_a_block_used_several_times_goes_by_its_first_name() -> None:
    model, x = Tied(), torch.randn(2, 4)
    assert find_blocks(model)[0] == "layers"
    assert select_layers(model, last_blocks(1), x) == ["layers.0.0", "layers.0.2"]
    convert(model, method="hosvd", rank=0.9, layers=last_blocks(1), example_input=x)
    assert list(compressed_layers(model)) == ["layers.0.0", "layers.0.2"]
