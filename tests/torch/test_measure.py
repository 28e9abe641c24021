"""Tests for tensorcompress.torch.measure: measured vs analytic activation memory."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from torch import nn

from tensorcompress.models import resnet18, resnet34
from tensorcompress.torch import (
    CompressedConv2d,
    CompressedModule,
    CompressionConfig,
    compressed_layers,
    convert,
    last_layers,
)
from tensorcompress.torch.measure import (
    MemoryReport,
    activation_memory,
    analytic_bytes,
    peak_forward_memory,
)

F32 = 4


pytestmark = pytest.mark.usefixtures("single_thread")


def nbytes(*shape: int, itemsize: int = F32) -> int:
    return math.prod(shape) * itemsize


def conv_names(model: nn.Module) -> list[str]:
    """Conv2d modules in module (= execution) order, the paper's layer count."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


# ---------------------------------------------------------------------------
# Generic recording: vanilla layers, attribution, deduplication
# ---------------------------------------------------------------------------


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 10),
    )


def test_vanilla_layers_keep_exactly_their_inputs() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    x = torch.randn(4, 3, 10, 10)
    report = activation_memory(model, x, layers=["0", "3", "6"])
    assert [layer.name for layer in report.layers] == ["0", "3", "6"]
    expected = {"0": nbytes(4, 3, 10, 10), "3": nbytes(4, 8, 10, 10), "6": nbytes(4, 400)}
    for layer in report.layers:
        assert layer.method == "vanilla"
        assert layer.measured_bytes == layer.analytic_bytes == layer.vanilla_bytes
        assert layer.measured_bytes == expected[layer.name]
        assert layer.unhooked_bytes == 0
    assert report["3"].input_shape == (4, 8, 10, 10)
    assert report["3"].output_shape == (4, 16, 5, 5)
    assert report["6"].kind == "Linear"
    assert report.kept_bytes == sum(expected.values())


def test_other_bytes_hold_batchnorm_and_parameters_are_excluded() -> None:
    model = small_cnn()
    report = activation_memory(model, torch.randn(4, 3, 10, 10), layers=["3"])
    # BatchNorm saves its input (conv0's output) and per-channel mean/invstd;
    # ReLU(1)'s output is conv3's input and so belongs to layer "3".
    other = dict(report.other_by_module)
    assert other["1"] == nbytes(4, 8, 10, 10) + 2 * nbytes(8)
    # conv0 saved the model input; ReLU(4)'s output is saved by ReLU and Linear.
    assert other["0"] == nbytes(4, 3, 10, 10)
    assert other["4"] == nbytes(4, 16, 5, 5)
    assert report.other_bytes == sum(other.values())
    assert report.total_bytes == report.kept_bytes + report.other_bytes
    # Weights and BatchNorm's running statistics are state, reported apart.
    weights = sum(p.numel() * F32 for n, p in model.named_parameters() if not n.endswith("bias"))
    running = 2 * nbytes(8)
    assert report.parameter_bytes == weights + running


def test_linear_with_leading_dims_and_conv1d() -> None:
    model = nn.Sequential(nn.Conv1d(4, 6, 3, stride=2), nn.Tanh())
    report = activation_memory(model, torch.randn(3, 4, 11), layers=["0"])
    assert report["0"].measured_bytes == nbytes(3, 4, 11) == report["0"].analytic_bytes
    lin = nn.Linear(5, 7)
    # The input reaches autograd as a (2*3*4, 5) view: one storage, counted once.
    report = activation_memory(nn.Sequential(lin), torch.randn(2, 3, 4, 5), layers=["0"])
    assert report["0"].measured_bytes == nbytes(2, 3, 4, 5) == report["0"].vanilla_bytes
    assert report["0"].input_shape == (2, 3, 4, 5)
    # Keyword inputs: a dict is passed as **kwargs.
    report = activation_memory(nn.Sequential(lin), {"input": torch.randn(6, 5)}, layers=["0"])
    assert report["0"].measured_bytes == nbytes(6, 5)


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x  # autograd saves x twice


class SquareView(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1) * x.reshape(x.shape[0], -1).sum(1).repeat_interleave(x[0].numel())


def test_dedup_by_storage_counts_a_tensor_saved_twice_once() -> None:
    x = torch.randn(4, 5, requires_grad=True)
    report = activation_memory(Square(), x)
    assert report.other_bytes == nbytes(4, 5)
    # Saved once as a flat view and once (through reshape/sum) as itself.
    report = activation_memory(SquareView(), x)
    assert report.other_by_module[0][1] >= nbytes(4, 5)
    assert report.other_bytes == nbytes(4, 5) + nbytes(20)  # x once, the repeated sums


def test_two_layers_reading_one_input_share_it() -> None:
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1)
            self.b = nn.Conv2d(4, 4, 1, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)[..., ::2, ::2] + self.b(x)

    x = torch.randn(2, 4, 6, 6)
    report = activation_memory(Fork(), x, layers=["a", "b"])
    assert report["a"].measured_bytes == report["b"].measured_bytes == nbytes(2, 4, 6, 6)
    assert report.kept_bytes == 2 * nbytes(2, 4, 6, 6)  # the paper's per-layer sum
    assert report.shared_bytes == nbytes(2, 4, 6, 6)
    assert report.total_bytes == report.kept_bytes - report.shared_bytes + report.other_bytes


class _LeakyLinear(torch.autograd.Function):
    """Keeps its input as a ctx attribute, out of the hooks' sight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.hidden = {"input": x.detach().clone()}
        ctx.save_for_backward(w)
        return x @ w.t()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (w,) = ctx.saved_tensors
        return g @ w, g.t() @ ctx.hidden["input"]


class LeakyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LeakyLinear.apply(x, self.weight)


def test_tensors_kept_on_ctx_are_found() -> None:
    model = nn.Sequential(nn.ReLU(), LeakyLinear(6, 3, bias=False))
    report = activation_memory(model, torch.randn(5, 6), layers=["1"])
    layer = report["1"]
    assert layer.unhooked_bytes == nbytes(5, 6)
    assert layer.measured_bytes == nbytes(5, 6)  # weight excluded, hidden copy counted
    assert layer.saved_shapes == ()


def test_measurement_has_no_side_effect_on_buffers_or_modes() -> None:
    model = small_cnn().eval()
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
    bn.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    activation_memory(model, torch.randn(4, 3, 10, 10) + 3.0, layers=["3"])
    assert not model.training and not bn.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_layers_save_less() -> None:
    model = small_cnn()
    for p in model[:3].parameters():
        p.requires_grad_(False)
    report = activation_memory(model, torch.randn(4, 3, 10, 10), layers=["3"])
    assert report["3"].measured_bytes == nbytes(4, 8, 10, 10)
    assert "0" not in dict(report.other_by_module)  # the frozen first conv saves nothing


def test_report_is_json_serialisable_and_frozen() -> None:
    report = activation_memory(small_cnn(), torch.randn(2, 3, 10, 10), layers=["0", "6"])
    data = json.loads(json.dumps(report.to_dict()))
    assert data["kept_bytes"] == report.kept_bytes
    assert data["layers"][1]["input_shape"] == [2, 400]
    assert data["kept_mb"] == report.kept_bytes / 2**20
    assert isinstance(report, MemoryReport)
    with pytest.raises(AttributeError):
        report.other_bytes = 0  # type: ignore[misc]


def test_bad_selection_is_refused() -> None:
    model = small_cnn()
    x = torch.randn(2, 3, 10, 10)
    with pytest.raises(ValueError, match="nope"):
        activation_memory(model, x, layers=["nope"])
    with pytest.raises(TypeError, match="BatchNorm2d"):
        activation_memory(model, x, layers=["1"])
    with pytest.raises(TypeError, match="str"):
        activation_memory(model, x, layers="0")


def test_analytic_formulas() -> None:
    assert analytic_bytes("vanilla", (2, 3, 4, 5)) == 480
    assert analytic_bytes("hosvd", (8, 6, 5, 5), ranks=(2, 3, 1, 4)) == 4 * (24 + 16 + 18 + 5 + 20)
    assert analytic_bytes("svd", (8, 6, 5, 5), ranks=(3,), itemsize=8) == 8 * (24 + 3 + 450)
    assert analytic_bytes("svd", (8, 6, 5, 5), ranks=(3,), mode=1) == 4 * (18 + 3 + 600)
    # Grid sized by the output: 7x7 output, R=2 -> 4x4 per channel.
    assert analytic_bytes(
        "gradient_filter", (64, 256, 14, 14), output_shape=(64, 512, 7, 7), patch=2
    ) == nbytes(64, 256, 4, 4)
    assert analytic_bytes("gradient_filter", (3, 4, 11), output_shape=(3, 6, 5), patch=2) == nbytes(
        3, 4, 3
    )
    with pytest.raises(ValueError, match="method"):
        analytic_bytes("tucker", (2, 2))
    with pytest.raises(ValueError, match="rank per mode"):
        analytic_bytes("asi", (2, 2, 2), ranks=(1, 1))
    with pytest.raises(ValueError, match="patch"):
        analytic_bytes("gradient_filter", (2, 2, 4, 4), output_shape=(2, 2, 4, 4))


# ---------------------------------------------------------------------------
# Compressed layers: measured == analytic for every method and layer type
# ---------------------------------------------------------------------------

LAYERS = {
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (5, 4, 6, 6)),
    "conv2d-dw-stride2": (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4), (5, 4, 7, 6)),
    "conv1d-stride2": (lambda: nn.Conv1d(4, 6, 3, stride=2), (5, 4, 11)),
    "linear-3d": (lambda: nn.Linear(5, 7), (3, 4, 5)),
    "linear-1d": (lambda: nn.Linear(5, 7), (5,)),
}
METHOD_RANKS = [
    ("vanilla", 0.8),
    ("asi", 0.8),
    ("asi", 2),
    ("hosvd", 0.9),
    ("svd", 0.8),
    ("svd", 2),
    ("gradient_filter", 0.8),
]


def expected_bytes(method: str, layer: Any, shape: tuple[int, ...], out: tuple[int, ...]) -> int:
    """The formula from what the layer kept, independently of analytic_bytes."""
    res = layer.last_result
    if method == "vanilla":
        return nbytes(*shape)
    if method in ("asi", "hosvd"):
        dims = res.shape
        assert math.prod(dims) == math.prod(shape)
        return F32 * (math.prod(res.ranks) + sum(n * r for n, r in zip(dims, res.ranks)))
    if method == "svd":
        (r,) = res.ranks
        rows = res.shape[res.mode]
        return F32 * (rows * r + r + r * (math.prod(shape) // rows))
    assert method == "gradient_filter"
    cells = [-(-n // 2) for n in out[2:]]  # R = 2 on the output's spatial dims
    return nbytes(shape[0], shape[1], *cells)


def case_rank(kind: str, rank: Any) -> Any:
    # One sample is a (1, C) matrix: an int rank above 1 is refused there, by design.
    return 1 if kind == "linear-1d" and isinstance(rank, int) else rank


CASES = [
    pytest.param(kind, method, case_rank(kind, rank), id=f"{kind}-{method}-{case_rank(kind, rank)}")
    for kind in LAYERS
    for method, rank in METHOD_RANKS
    if not (method == "gradient_filter" and kind.startswith("linear"))  # convs only
]


@pytest.mark.parametrize(("kind", "method", "rank"), CASES)
def test_measured_equals_analytic(kind: str, method: str, rank: Any) -> None:
    build, shape = LAYERS[kind]
    torch.manual_seed(0)
    model = nn.Sequential(build())
    convert(model, method=method, rank=rank)  # in place
    layer = model[0]
    assert isinstance(layer, CompressedModule) and isinstance(layer.weight, torch.Tensor)
    x = torch.randn(shape, requires_grad=True)  # so the weight is saved too (and excluded)
    for step in range(2):  # ASI: the cold start, then a warm subspace-iteration step
        report = activation_memory(model, x)
        (lr,) = report.layers
        assert lr.name == "0" and lr.method == method and lr.input_shape == shape
        assert lr.measured_bytes == lr.analytic_bytes, (step, lr.saved_shapes)
        assert lr.measured_bytes == expected_bytes(method, layer, shape, lr.output_shape)
        assert lr.vanilla_bytes == nbytes(*shape)
        assert lr.ranks == (None if method in ("vanilla", "gradient_filter") else layer.ranks)
        assert lr.unhooked_bytes == 0
        assert report.other_bytes == 0
        assert report.parameter_bytes == layer.weight.numel() * F32
        model(x).sum().backward()  # a real training step between the measurements


@pytest.mark.parametrize("method", ["vanilla", "asi", "hosvd", "gradient_filter"])
def test_autocast_counts_low_precision_inputs_not_weight_copies(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
    convert(model, method=method, rank=2)
    x = torch.randn(5, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = activation_memory(model, x)
    for layer in report.layers:
        # Kept in bfloat16, sized by the bfloat16 formula.
        assert layer.dtype == "bfloat16"
        assert layer.measured_bytes == layer.analytic_bytes
        assert layer.vanilla_bytes == math.prod(layer.input_shape) * 2
    # The bfloat16 weight copies autocast makes are state: layer 2's always
    # (its input needs a gradient), layer 0's only in vanilla autograd.
    copies = 6 * 6 * 9 * 2 + (6 * 4 * 9 * 2 if method == "vanilla" else 0)
    assert report.parameter_bytes == copies


def test_compression_shows_in_the_report() -> None:
    torch.manual_seed(0)
    # An activation of multilinear rank (2, 3, 2, 2): ASI at rank 0.99 finds it.
    core = torch.randn(2, 3, 2, 2)
    u = [torch.linalg.qr(torch.randn(n, r))[0] for n, r in zip((8, 16, 10, 10), core.shape)]
    x = torch.einsum("abcd,ia,jb,kc,ld->ijkl", core, *u)
    model = convert(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1)), method="asi", rank=0.99)
    layer = activation_memory(model, x)["0"]
    assert layer.ranks == (2, 3, 2, 2)
    assert layer.measured_bytes == F32 * (24 + 8 * 2 + 16 * 3 + 10 * 2 + 10 * 2)
    assert layer.compression_ratio == nbytes(8, 16, 10, 10) / layer.measured_bytes == 100


def test_frozen_compressed_layer_is_vanilla() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3))
    convert(model, method="asi", rank=2)
    model[1].weight.requires_grad_(False)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    layer = activation_memory(model, x)["1"]
    # The plain conv runs and autograd keeps the input for the input gradient.
    assert layer.method == "vanilla" and layer.ranks is None
    assert layer.measured_bytes == layer.analytic_bytes == nbytes(2, 3, 5, 5)


def test_vanilla_reflect_padding_keeps_the_padded_input() -> None:
    # torch pads first and the conv saves the padded tensor: measured shows the
    # real cost, the formula (the paper's convention) the input's.
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    layer = activation_memory(nn.Sequential(conv), torch.randn(5, 4, 6, 6), layers=["0"])["0"]
    assert layer.saved_shapes == ((5, 4, 8, 8),)
    assert layer.measured_bytes == nbytes(5, 4, 8, 8) > layer.analytic_bytes == nbytes(5, 4, 6, 6)
    # Compressed, the padding is applied to the factors in backward: nothing padded is kept.
    model = convert(nn.Sequential(conv), method="asi", rank=2)
    layer = activation_memory(model, torch.randn(5, 4, 6, 6))["0"]
    assert layer.measured_bytes == layer.analytic_bytes


# ---------------------------------------------------------------------------
# Paper convention: Mem of the last N convs, float32, batch 64, 224x224
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "n_layers", "paper_mb"),
    [(resnet18, 2, 12.25), (resnet34, 4, 24.50)],
    ids=["resnet18-2", "resnet34-4"],
)
def test_paper_vanilla_mem(build: Any, n_layers: int, paper_mb: float) -> None:
    model = build(num_classes=10)
    # Batch 1, then scale: every kept input is linear in the batch size.
    x = torch.randn(1, 3, 224, 224)
    report = activation_memory(model, x, layers=conv_names(model)[-n_layers:])
    # The last convs of both ResNets read 512 x 7 x 7 activations.
    assert [layer.input_shape for layer in report.layers] == [(1, 512, 7, 7)] * n_layers
    assert report.kept_bytes == report.vanilla_bytes == n_layers * nbytes(1, 512, 7, 7)
    assert report.vanilla_mb * 64 == paper_mb  # exact: 6.125 MB per layer


def test_paper_gradient_filter_mem() -> None:
    model = resnet18(num_classes=10)
    x = torch.randn(1, 3, 224, 224)
    convert(model, method="gradient_filter", layers=conv_names(model)[-4:])
    report = activation_memory(model, x, layers=list(compressed_layers(model)))
    assert len(report.layers) == 4
    assert report.kept_bytes == report.analytic_bytes
    # R = 2 on the 7x7 outputs: 4x4 per channel, also for the stride-2
    # downsample.0 (256 channels, 14x14 input): 3 x 2.00 + 1.00 MB.
    assert [layer.measured_mb * 64 for layer in report.layers] == [2.0, 1.0, 2.0, 2.0]
    assert report.kept_mb * 64 == 7.00
    assert sum(layer.measured_mb for layer in report.layers[-2:]) * 64 == 4.00


def test_last_layers_selects_in_execution_order() -> None:
    model = resnet18(num_classes=10)
    report = activation_memory(model, torch.randn(1, 3, 64, 64), layers=last_layers(4))
    assert [layer.name for layer in report.layers] == [
        "layer4.0.conv2",
        "layer4.0.downsample.0",
        "layer4.1.conv1",
        "layer4.1.conv2",
    ]
    # conv1 and downsample.0 read the same block input: it is kept once.
    report = activation_memory(
        model, torch.randn(1, 3, 64, 64), layers=["layer4.0.conv1", "layer4.0.downsample.0"]
    )
    assert report.shared_bytes == nbytes(1, 256, 4, 4)


# ---------------------------------------------------------------------------
# Peak memory of one forward
# ---------------------------------------------------------------------------


def test_peak_forward_memory_of_a_vanilla_conv() -> None:
    conv = nn.Conv2d(64, 64, 3, padding=1)
    peak = peak_forward_memory(conv, torch.randn(64, 64, 14, 14))
    assert peak.input_bytes == peak.output_bytes == nbytes(64, 64, 14, 14)
    # The output, plus at most one output-sized convolution workspace.
    assert peak.output_bytes <= peak.peak_bytes <= 2.2 * peak.input_bytes
    assert peak.retained_bytes == peak.output_bytes  # the input is the caller's
    assert json.loads(json.dumps(peak.to_dict()))["factor"] == peak.factor


@pytest.mark.parametrize("method", ["asi", "hosvd"])
def test_compressing_forward_has_no_transient_blow_up(method: str) -> None:
    """Peak <= 3x the input for a 64x64x14x14 activation, output included.

    Measured on CPU with torch 2.13 (1 or 2 threads alike): the vanilla conv
    alone peaks at 2.05x (its output plus an output-sized oneDNN workspace).
    ASI and HOSVD at explained variance 0.8 peak at 2.05x on natural-image
    activations (ranks (29, 21, 7, 7): the conv's workspace is the peak) and
    at 2.59x on Gaussian noise (ranks (50, 50, 12, 12): almost nothing to
    cut, the worst case, used here). The decomposition runs after the conv
    has freed its workspace and adds about one unfolding copy to the output.
    (For comparison, not tested: the channel-unfolding SVD peaks higher,
    since ``torch.linalg.svd`` works on the whole unfolding.)
    """
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(64, 64, 14, 14)
    layer = CompressedConv2d.from_module(conv, CompressionConfig(method=method, rank=0.8))
    peak = peak_forward_memory(layer, x)  # two warm-up steps: ASI measured warm
    vanilla = peak_forward_memory(conv, x)
    assert peak.output_bytes == peak.input_bytes
    assert peak.factor <= 3.0
    assert peak.peak_bytes <= vanilla.peak_bytes + 0.75 * peak.input_bytes
    # What stays after the forward: the output and the (small) decomposition,
    # plus the previous step's state whose release the profiler cannot see.
    assert peak.retained_bytes <= peak.output_bytes + 2 * layer.last_result.nbytes
