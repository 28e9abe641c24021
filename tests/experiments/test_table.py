"""Tests for ``tensorcompress table``: the paper's figures, measured == analytic, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from tensorcompress.experiments.cli import main
from tensorcompress.experiments.paper import PAPER_METHODS
from tensorcompress.experiments.table import (
    ConvCall,
    TableResult,
    TableRow,
    make_batch,
    probe_convs,
    run_table,
)
from tensorcompress.models import MODEL_NAMES, get_model
from tensorcompress.torch import fine_tuned_modules

F32 = 4


# One intra-op thread for these small tensors (the fixture is in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def convs_224() -> dict[str, list[ConvCall]]:
    """Every model's convs at 224x224 (one batch-1 forward each)."""
    return {name: probe_convs(get_model(name), 224) for name in MODEL_NAMES}


# ---------------------------------------------------------------------------
# Conv shapes and what trains
# ---------------------------------------------------------------------------


def test_conv_counts(convs_224: dict[str, list[ConvCall]]) -> None:
    counts = {name: len(convs) for name, convs in convs_224.items()}
    assert counts == {"resnet18": 20, "resnet34": 36, "mobilenet_v2": 52, "mcunet_in1": 42}
    assert [c.name for c in convs_224["resnet18"][-4:]] == [
        "layer4.0.conv2",
        "layer4.0.downsample.0",
        "layer4.1.conv1",
        "layer4.1.conv2",
    ]


def test_fine_tuned_modules_follow_the_papers_code() -> None:
    # The paper's code trains the last N convs and every parameter after the
    # first of them; the one freeze rule names the modules owning them, in
    # execution order.
    model = get_model("resnet18")
    x = torch.zeros(1, 3, 64, 64)
    assert fine_tuned_modules(model, ["layer4.1.conv1", "layer4.1.conv2"], x) == [
        "layer4.1.conv1",
        "layer4.1.bn1",
        "layer4.1.conv2",
        "layer4.1.bn2",
        "fc",
    ]
    names = fine_tuned_modules(model, [c.name for c in probe_convs(model, 64)[-4:]], x)
    assert "layer4.0.downsample.1" in names and "layer4.0.bn2" in names
    assert "layer4.0.conv1" not in names and "layer4.0.bn1" not in names


def test_make_batch() -> None:
    x = make_batch(3, 40, seed=1)
    assert x.shape == (3, 3, 40, 40) and x.dtype == torch.float32
    assert torch.equal(x, make_batch(3, 40, seed=1))
    assert not torch.equal(x, make_batch(3, 40, seed=2))
    noise = make_batch(2, 16, source="random")
    assert noise.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="source"):
        make_batch(1, 8, source="cifar")


def test_too_small_resolution_is_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        probe_convs(get_model("resnet18"), 16)
    assert len(probe_convs(get_model("resnet18"), 32)) == 20


# ---------------------------------------------------------------------------
# Measured rows at a small size
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> TableResult:
    return run_table("resnet18", batch=2, resolution=64, layers=(2, 4))


def test_measured_equals_analytic(small: TableResult) -> None:
    assert [(r.method, r.layers) for r in small.rows] == [
        (m, n) for m in PAPER_METHODS for n in (2, 4)
    ]
    for row in small.rows:
        assert row.mem_bytes == row.analytic_bytes > 0, (row.method, row.layers)
        assert row.saved_bytes > row.mem_bytes
    by = {(r.method, r.layers): r for r in small.rows}
    # Final maps 2x2: vanilla keeps 512 x 2 x 2 per image and layer.
    assert by["vanilla", 2].mem_bytes == 2 * 2 * 512 * 4 * F32
    # Gradient filter R2: 1x1 per channel; downsample.0 has 256 channels.
    assert by["gradient_filter", 4].mem_bytes == 2 * (3 * 512 + 256) * F32
    for method in ("hosvd", "asi"):
        row = by[method, 4]
        assert [n for n, _ in row.ranks] == list(row.layer_names)
        assert all(len(r) == 4 for _, r in row.ranks)
        assert row.mem_bytes < by["vanilla", 4].mem_bytes
    # ASI's ranks fit HOSVD's memory (the paper's budget).
    assert by["asi", 2].mem_bytes <= by["hosvd", 2].mem_bytes
    assert by["asi", 4].mem_bytes <= by["hosvd", 4].mem_bytes


def test_counted_flops_of_the_rows(small: TableResult) -> None:
    by = {(r.method, r.layers): r for r in small.rows}
    forwards = {r.flops.forward for r in small.rows}
    assert len(forwards) == 1  # the network's forward is the same in every row
    van = by["vanilla", 2].flops
    macs = 2 * 512 * 2 * 2 * 512 * 9  # one 512->512 3x3 conv at 2x2, batch 2
    ops = dict(van.backward_by_op)
    # conv2: weight + input gradients; conv1: weight gradient only (below it
    # nothing trains); the classifier: weight and input gradients.
    assert ops["aten.convolution_backward"] == 3 * 2 * macs
    assert ops["aten.mm"] == 2 * (2 * 2 * 512 * 1000)
    for method in ("vanilla", "gradient_filter"):
        assert by[method, 2].flops.decomposition == 0
    for method in ("hosvd", "asi"):
        assert by[method, 4].flops.decomposition > 0 and by[method, 4].flops.linalg > 0
    # The paper's convention: fine-tuned convs only, MACs.
    assert by["vanilla", 2].paper_convention.total == 2 * 2 * macs
    for row in small.rows:
        assert row.flops.total == row.flops.forward + row.flops.decomposition + row.flops.backward


def test_depthwise_backward_is_counted_with_its_groups() -> None:
    (row,) = run_table("mcunet_in1", batch=2, resolution=48, layers=(2,), methods=("vanilla",)).rows
    assert row.layer_names == (
        "blocks.13.mobile_inverted_conv.depth_conv.conv",
        "blocks.13.mobile_inverted_conv.point_linear.conv",
    )
    dw = 2 * 576 * 2 * 2 * 9  # batch 2, 576 channels at 2x2, 3x3 taps, one input channel each
    pw = 2 * 160 * 2 * 2 * 576
    ops = dict(row.flops.backward_by_op)
    # Depthwise: weight gradient only (below it nothing trains); pointwise: both.
    assert ops["aten.convolution_backward"] == 2 * dw + 2 * 2 * pw
    assert ops["aten.mm"] == 2 * (2 * 2 * 160 * 1000)
    # The paper's convention charges the depthwise conv as a dense 576 -> 576 one.
    assert row.paper_convention.total == 2 * (576 * dw + pw)


def test_replaying_the_frozen_prefix_changes_nothing(small: TableResult) -> None:
    plain = run_table("resnet18", batch=2, resolution=64, layers=(2, 4), reuse_prefix=False)

    def key(r: TableRow) -> tuple[object, ...]:
        return (r.method, r.layers, r.mem_bytes, r.saved_bytes, r.flops, r.ranks)

    assert [key(r) for r in small.rows] == [key(r) for r in plain.rows]


@pytest.mark.parametrize("model", ["mobilenet_v2", "mcunet_in1"])
def test_replay_on_inverted_residual_models(model: str) -> None:
    fast, slow = (
        run_table(
            model, batch=2, resolution=32, layers=(3,), methods=("vanilla", "asi"), reuse_prefix=r
        )
        for r in (True, False)
    )
    for a, b in zip(fast.rows, slow.rows):
        assert (a.mem_bytes, a.saved_bytes, a.ranks) == (b.mem_bytes, b.saved_bytes, b.ranks)
        assert a.flops == b.flops
        assert a.mem_bytes == a.analytic_bytes


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

SMALL = ["--model", "mcunet_in1", "--batch", "2", "--resolution", "48", "--layers", "2"]


def test_command_prints_rows_and_paper_figures(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["table", *SMALL, "--methods", "vanilla", "gradient_filter", "--paper"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "scikit-learn's sample images" in out and "random initialisation" in out
    lines = [line for line in out.splitlines() if line.startswith(("vanilla", "gradient_filter"))]
    assert len(lines) == 2
    # Paper columns: vanilla 2 layers of MCUNet is 13.78 MB and 19.31 GFLOPs.
    assert "13.78" in lines[0] and "19.31" in lines[0]


def test_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["table", *SMALL, "--methods", "hosvd", "--json", "--input", "random"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    row = rows[0]
    for key in ("model", "method", "layers", "mem_mb", "saved_mb", "gflops"):
        assert key in row
    assert (row["model"], row["method"], row["layers"]) == ("mcunet_in1", "hosvd", 2)
    assert row["mem_mb"] == row["mem_analytic_mb"]
    assert row["paper"]["mem_mb"] == 0.48
    assert len(row["ranks"]) == 2
    assert (row["input"], row["rank"], row["weights"], row["asi_ranks"]) == (
        "random",
        0.8,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--model", "vgg16"], "unknown model"),
        (["--methods", "vanilla", "lora"], "unknown method"),
        (["--layers", "0"], "layers must be a positive int"),
        (["--layers", "2", "43"], "exceed the 42 Conv2d"),
        (["--batch", "0"], "batch must be a positive int"),
        (["--resolution", "-3"], "resolution must be a positive int"),
        (["--resolution", "8"], "too small"),
        (["--rank", "1.5"], "rank must be"),
        (["--input", "cifar"], "input must be"),
        (["--weights", "/nonexistent/weights.pt"], "No such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    extra: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["table", *SMALL, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tensorcompress table: error:")
    assert match in lines[0]
