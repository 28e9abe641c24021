"""What trains: ``tensorcompress run`` and ``tensorcompress table`` share one rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorcompress.experiments import data as D
from tensorcompress.experiments import run as run_mod
from tensorcompress.experiments import train as T
from tensorcompress.experiments.table import _Runner, make_batch, probe_convs
from tensorcompress.models import get_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _trained(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model", ["mcunet_in1", "resnet18"])
def test_run_and_table_train_the_same_parameters(model: str) -> None:
    resolution = 48
    x = make_batch(2, resolution, source="random")
    net = get_model(model, num_classes=10)
    runner = _Runner(net, model, x, probe_convs(net, resolution), (2, 4))
    config = run_mod.RunConfig(model=model, resolution=resolution)
    train = D.ImageData(
        torch.zeros(4, 3, resolution, resolution, dtype=torch.uint8),
        torch.arange(4) % 2,
        tuple(str(k) for k in range(10)),
    )
    sets = {}
    for n in (2, 4):
        # Each command's own preparation step, converted as for HOSVD.
        table_model, table_convs = runner.prepared(n, "hosvd", 0.8)
        run_model, run_convs, _ = run_mod.prepare(
            "hosvd", str(n), 0.8, 0, config, net.state_dict(), train, x[:1], T.DistEnv()
        )
        assert table_convs == run_convs and len(run_convs) == n
        sets[n] = _trained(run_model)
        assert _trained(table_model) == sets[n], (model, n)
        head = T.head_name(net)
        assert {f"{head}.weight", f"{head}.bias"} <= sets[n]
        assert {f"{c}.weight" for c in run_convs} <= sets[n]
    assert sets[2] < sets[4]
    if model == "resnet18":
        assert sets[2] == {
            "layer4.1.conv1.weight",
            "layer4.1.bn1.weight",
            "layer4.1.bn1.bias",
            "layer4.1.conv2.weight",
            "layer4.1.bn2.weight",
            "layer4.1.bn2.bias",
            "fc.weight",
            "fc.bias",
        }


def test_all_layers_train_everything() -> None:
    net = get_model("resnet18", num_classes=3)
    convs = T.freeze_for(net, "all", torch.zeros(1, 3, 32, 32))
    assert len(convs) == 20
    assert all(p.requires_grad for p in net.parameters())
