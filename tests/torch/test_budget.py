"""Tests for tensorcompress.torch.budget: sensitivity measurement and the exact knapsack."""

from __future__ import annotations

import copy
import itertools
import json
import math
import subprocess
import sys
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tensorcompress import hosvd
from tensorcompress.experiments.activations import sample_images
from tensorcompress.torch import CompressionConfig, convert, last_layers
from tensorcompress.torch.budget import (
    DEFAULT_CANDIDATES,
    Allocation,
    Choice,
    LayerSensitivity,
    Sensitivity,
    allocate,
    budget_from_spec,
    measure_sensitivity,
    plan_ranks,
)
from tensorcompress.torch.measure import MB, activation_memory, analytic_bytes

CANDIDATES = (*DEFAULT_CANDIDATES, 1.0)

# ---------------------------------------------------------------------------
# Synthetic instances for the knapsack
# ---------------------------------------------------------------------------


def make_sensitivity(table: list[list[tuple[int, float]]]) -> Sensitivity:
    """A sensitivity from per-layer ``(nbytes, error)`` lists."""
    layers = []
    for i, row in enumerate(table):
        choices = tuple(
            Choice(threshold=(j + 1) / len(row), ranks=(), nbytes=b, error=e)
            for j, (b, e) in enumerate(row)
        )
        layers.append(LayerSensitivity(name=f"layer{i}", choices=choices))
    return Sensitivity(layers=tuple(layers))


def brute_force(table: list[list[tuple[int, float]]], budget: int) -> tuple[float, int] | None:
    """Least error (summed in layer order, as ``allocate`` does) and its fewest bytes."""
    best: tuple[float, int] | None = None
    for combo in itertools.product(*table):
        nbytes = sum(b for b, _ in combo)
        if nbytes > budget:
            continue
        err = 0.0
        for _, e in combo:
            err += e
        if best is None or (err, nbytes) < best:
            best = (err, nbytes)
    return best


choice_st = st.tuples(
    st.integers(0, 60), st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False)
)
table_st = st.lists(st.lists(choice_st, min_size=1, max_size=4), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(table=table_st, budget=st.integers(-5, 250))
def test_allocate_matches_brute_force(table: list[list[tuple[int, float]]], budget: int) -> None:
    sens = make_sensitivity(table)
    best = brute_force(table, budget)
    if best is None:
        with pytest.raises(ValueError, match="below the smallest allocation"):
            allocate(sens, budget)
        return
    alloc = allocate(sens, budget)
    assert (alloc.total_error, alloc.total_bytes) == best
    assert alloc.total_bytes <= budget
    # The totals are those of the choices it returns, one per layer.
    assert alloc.names == sens.names
    for layer, c in zip(sens.layers, alloc.choices):
        assert c in layer.choices
    assert alloc.total_bytes == sum(c.nbytes for c in alloc.choices)
    assert alloc.total_error == pytest.approx(sum(c.error for c in alloc.choices), abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(table=table_st, budgets=st.lists(st.integers(0, 250), min_size=2, max_size=6))
def test_error_non_increasing_as_budget_grows(
    table: list[list[tuple[int, float]]], budgets: list[int]
) -> None:
    sens = make_sensitivity(table)
    floor = sum(min(b for b, _ in row) for row in table)
    errors = [allocate(sens, b).total_error for b in sorted(budgets) if b >= floor]
    assert all(later <= earlier for earlier, later in itertools.pairwise(errors))


def test_allocate_exact_on_larger_instances() -> None:
    """Against a classic DP over every integer byte total (exact, O(layers * budget))."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        table = [
            [
                (
                    int(torch.randint(1, 400, (1,), generator=gen)),
                    float(torch.rand(1, generator=gen)),
                )
                for _ in range(6)
            ]
            for _ in range(12)
        ]
        budget = int(sum(sorted(b for b, _ in row)[2] for row in table))
        inf = math.inf
        dp = [0.0] + [inf] * budget  # dp[b]: least error with exactly b bytes
        for row in table:
            new = [inf] * (budget + 1)
            for b, e in enumerate(dp):
                if e == inf:
                    continue
                for nb, ne in row:
                    if b + nb <= budget and e + ne < new[b + nb]:
                        new[b + nb] = e + ne
            dp = new
        best = min(dp)
        alloc = allocate(make_sensitivity(table), budget)
        assert alloc.total_error == best
        assert alloc.total_bytes == dp.index(best)
        assert alloc.total_bytes <= budget


def test_allocate_is_deterministic_with_ties() -> None:
    # Every layer has two equally good, equally large choices: the first listed wins.
    table = [[(10, 0.5), (10, 0.5), (20, 0.1)] for _ in range(5)]
    sens = make_sensitivity(table)
    first = allocate(sens, 50)
    assert all(c.threshold == pytest.approx(1 / 3) for c in first.choices)
    for _ in range(3):
        assert allocate(sens, 50) == first
        assert allocate(Sensitivity.from_json(sens.to_json()), 50) == first


NO_TORCH_KNAPSACK = """
import importlib.abc, sys, types
import tensorcompress

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked")
        return None

sys.meta_path.insert(0, NoTorch())
# Empty stand-ins for the parent packages, whose __init__ imports torch by design.
path = tensorcompress.__path__
for name in ("tensorcompress.torch", "tensorcompress.torch.budget"):
    path = [p + "/" + name.rsplit(".", 1)[1] for p in path]
    pkg = types.ModuleType(name)
    pkg.__path__ = path
    sys.modules[name] = pkg

from tensorcompress.torch.budget.knapsack import (
    Allocation, Choice, LayerSensitivity, Sensitivity, allocate, budget_from_spec,
)
layer = LayerSensitivity("a", (Choice(0.5, (1,), 10, 0.3), Choice(0.9, (2,), 20, 0.1)))
sens = Sensitivity.from_json(Sensitivity((layer,)).to_json())
alloc = allocate(sens, budget_from_spec("hosvd@0.9", sens))
assert Allocation.from_json(alloc.to_json()) == alloc and alloc.total_bytes == 20
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")], "torch imported"
try:
    import torch
except ImportError:
    pass
else:
    raise AssertionError("the finder did not block torch")
"""


def test_knapsack_imports_without_torch() -> None:
    """The knapsack and what it imports run with torch blocked (it is pure Python)."""
    subprocess.run([sys.executable, "-c", NO_TORCH_KNAPSACK], check=True)


# ---------------------------------------------------------------------------
# Measurement on a small conv net over natural-image crops
# ---------------------------------------------------------------------------


def crops(batch: int, size: int, seed: int) -> torch.Tensor:
    """Contrast-normalised crops of the scikit-learn sample images."""
    images = sample_images()
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    out = []
    for _ in range(batch):
        i = int(torch.randint(0, n, (1,), generator=gen))
        top = int(torch.randint(0, h - 2 * size, (1,), generator=gen))
        left = int(torch.randint(0, w - 2 * size, (1,), generator=gen))
        crop = images[i : i + 1, :, top : top + 2 * size, left : left + 2 * size]
        out.append(nn.functional.interpolate(crop, size=(size, size), mode="bilinear"))
    x = torch.cat(out)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    return x / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-3)


def small_net(inplace: bool = True, seed: int = 0) -> nn.Sequential:
    """Strided, reflect-padded and grouped convs, BatchNorm, ReLU, a Linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace),
        nn.Conv2d(16, 32, 3, padding=1, padding_mode="reflect", bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=4),
        nn.ReLU(inplace),
        nn.Conv2d(32, 24, 1),
        nn.ReLU(inplace),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(96, 10),
    )


LAYERS = ["0", "3", "6", "8", "12"]


@pytest.fixture(scope="module")
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(crops(8, 32, seed), torch.randint(0, 10, (8,), generator=gen)) for seed in (0, 1)]


@pytest.fixture(scope="module")
def sens(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Sensitivity:
    return measure_sensitivity(small_net(), batches, LAYERS, CANDIDATES)


def first_inputs(model: nn.Module, inputs: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Each layer's input in one training-mode forward."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(
            lambda m, a, o, n=n: seen.__setitem__(n, a[0].detach().clone())
        )
        for n in names
    ]
    model.train()
    with torch.no_grad():
        model(inputs)
    for h in handles:
        h.remove()
    return seen


def test_sensitivity_layout(sens: Sensitivity) -> None:
    assert sens.names == tuple(LAYERS)
    assert sens.n_batches == 2
    for layer in sens.layers:
        assert layer.thresholds == CANDIDATES
        assert layer.itemsize == 4
        for c in layer.choices:
            assert c.nbytes == analytic_bytes("asi", layer.input_shape, ranks=c.ranks)
    assert [layer.kind for layer in sens.layers] == ["Conv2d"] * 4 + ["Linear"]


def test_errors_zero_at_full_rank(sens: Sensitivity) -> None:
    for layer in sens.layers:
        full = layer.choice(1.0)
        # Full rank is each unfolding's rank: a (8, 96) Linear input has rank 8 in mode 1.
        shape = layer.input_shape
        assert full.ranks == tuple(min(n, math.prod(shape) // n) for n in shape), layer.name
        assert full.error < 1e-4, (layer.name, full.error)


def test_errors_decrease_and_bytes_grow_with_threshold(sens: Sensitivity) -> None:
    for layer in sens.layers:
        errors = [c.error for c in layer.choices]
        nbytes = [c.nbytes for c in layer.choices]
        assert all(b <= a + 1e-9 for a, b in itertools.pairwise(errors)), (layer.name, errors)
        assert all(b >= a for a, b in itertools.pairwise(nbytes)), (layer.name, nbytes)
        for a, b in itertools.pairwise(layer.choices):
            assert all(rb >= ra for ra, rb in zip(a.ranks, b.ranks))
    # Not flat: on every conv, the lowest candidate loses far more than the highest.
    for layer in sens.layers[:4]:
        assert layer.choice(0.4).error > layer.choice(0.9).error + 0.05, layer.name


def test_ranks_are_hosvd_ranks_on_the_first_batch(
    sens: Sensitivity, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    xs = first_inputs(small_net(), batches[0][0], LAYERS)
    for layer in sens.layers:
        for c in layer.choices:
            assert c.ranks == hosvd.decompose(xs[layer.name], c.threshold).ranks


def _reference_error(
    batches: list[tuple[torch.Tensor, torch.Tensor]], name: str, ranks: tuple[int, ...]
) -> float:
    """Mean dW error from the reconstructed input, computed by plain autograd."""
    model = small_net(inplace=False)
    module = dict(model.named_modules())[name]
    store: dict[str, torch.Tensor] = {}

    def hook(m: nn.Module, args: Any, out: torch.Tensor) -> None:
        store["x"] = args[0].detach()
        out.retain_grad()
        store["y"] = out

    total = 0.0
    for inputs, targets in batches:
        h = module.register_forward_hook(hook)
        model.train()
        model.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        h.remove()
        exact = module.weight.grad.detach().clone()
        gy = store["y"].grad
        x_hat = hosvd.decompose(store["x"], list(ranks), sequential=False).reconstruct()
        w = module.weight.detach().requires_grad_()
        if isinstance(module, nn.Conv2d):
            y = module._conv_forward(x_hat, w, None)
        else:
            y = nn.functional.linear(x_hat, w)
        (approx,) = torch.autograd.grad(y, w, gy)
        total += float((approx - exact).norm() / exact.norm())
    return total / len(batches)


@pytest.mark.parametrize("name", LAYERS)
def test_errors_match_plain_autograd_on_reconstructed_input(
    sens: Sensitivity, batches: list[tuple[torch.Tensor, torch.Tensor]], name: str
) -> None:
    for eps in (0.5, 0.8):
        c = sens[name].choice(eps)
        assert c.error == pytest.approx(_reference_error(batches, name, c.ranks), abs=2e-4)


def test_inplace_relu_does_not_change_the_measurement(
    sens: Sensitivity, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    other = measure_sensitivity(small_net(inplace=False), batches, LAYERS, CANDIDATES)
    for a, b in zip(sens.layers, other.layers):
        for ca, cb in zip(a.choices, b.choices):
            assert ca.ranks == cb.ranks
            assert ca.error == pytest.approx(cb.error, abs=1e-6)


def test_channels_last_gives_the_same_measurement(
    sens: Sensitivity, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    model = small_net().to(memory_format=torch.channels_last)
    cl = [(x.to(memory_format=torch.channels_last), y) for x, y in batches]
    other = measure_sensitivity(model, cl, LAYERS, CANDIDATES)
    for a, b in zip(sens.layers, other.layers):
        for ca, cb in zip(a.choices, b.choices):
            assert ca.ranks == cb.ranks
            assert ca.error == pytest.approx(cb.error, abs=1e-4)


class Tokens(nn.Module):
    """A Conv1d over a sequence, then Linears on ``(B, T, D)`` tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.mix = nn.Linear(16, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).transpose(1, 2)
        return self.head(torch.relu(self.mix(h)).mean(dim=1))


def test_conv1d_and_token_linear() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(6, 8, 20, generator=gen).cumsum(-1), torch.randint(0, 5, (6,), generator=gen))
        for _ in range(2)
    ]
    res = measure_sensitivity(Tokens(), batches, None, (0.5, 0.9, 1.0))
    assert res.names == ("conv", "mix", "head")
    assert [layer.kind for layer in res.layers] == ["Conv1d", "Linear", "Linear"]
    assert res["mix"].input_shape == (6, 20, 16)
    for layer in res.layers:
        assert layer.choice(1.0).error < 1e-4, layer.name
        assert layer.choice(0.5).error >= layer.choice(0.9).error - 1e-9, layer.name


def test_measurement_leaves_the_model_alone(
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    model = small_net().eval()
    before = copy.deepcopy(model.state_dict())
    measure_sensitivity(model, batches, last_layers(2), (0.5, 0.9))
    assert not any(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_one_batch_and_a_smaller_last_batch(
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    one = measure_sensitivity(small_net(), batches[:1], ["3"], (0.6,))
    assert one.n_batches == 1
    # A last batch of 3 images caps the batch rank (as the layer would) instead of failing.
    short = [batches[0], (batches[1][0][:3], batches[1][1][:3])]
    res = measure_sensitivity(small_net(), short, ["3"], (0.9, 1.0))
    assert res["3"].input_shape[0] == 8
    assert 0.0 <= res["3"].choice(0.9).error < 1.0


def test_batches_may_be_a_generator(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    res = measure_sensitivity(small_net(), (b for b in batches), last_layers(1), (0.7,))
    assert res.names == ("8",)
    assert res.n_batches == 2


# ---------------------------------------------------------------------------
# Budgets, plan_ranks and convert
# ---------------------------------------------------------------------------


def test_hosvd_budget_never_worse_than_uniform_threshold(sens: Sensitivity) -> None:
    for eps in (0.5, 0.7, 0.9):
        budget = budget_from_spec(f"hosvd@{eps}", sens)
        assert budget == sum(layer.choice(eps).nbytes for layer in sens.layers)
        alloc = allocate(sens, budget)
        assert alloc.total_bytes <= budget
        assert alloc.total_error <= sens.error_at(eps)


def test_budget_from_spec_sizes(sens: Sensitivity) -> None:
    assert budget_from_spec("12.5MB", sens) == int(12.5 * MB)
    assert budget_from_spec("3 KiB", sens) == 3 * 1024
    assert budget_from_spec("123456", sens) == 123456
    assert budget_from_spec("hosvd @ 0.8", sens) == sens.bytes_at(0.8)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("hosvd@", "not understood"),
        ("hosvd@1.5", r"\(0, 1\]"),
        ("hosvd@0.75", "among the measured candidates"),
        ("svd@0.8", "not understood"),
        ("-3MB", "not understood"),
        ("lots", "not understood"),
        ("", "not understood"),
    ],
)
def test_bad_budget_spec(sens: Sensitivity, spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        budget_from_spec(spec, sens)


def test_plan_ranks_runs_asi_with_those_ranks(
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    model = small_net()
    alloc = plan_ranks(model, batches, last_layers(3), budget="hosvd@0.7", candidates=(0.5, 0.9))
    # The spec's threshold is measured too, so the uniform choice is available.
    sens = measure_sensitivity(model, batches, last_layers(3), (0.5, 0.7, 0.9))
    assert alloc == allocate(sens, sens.bytes_at(0.7))
    assert list(alloc.ranks) == ["3", "6", "8"]
    convert(model, method="asi", rank=alloc.ranks, layers=list(alloc.ranks))
    report = activation_memory(model, batches[0][0], layers=list(alloc.ranks))
    for name in alloc.names:
        assert report[name].ranks == alloc[name].ranks
        assert report[name].analytic_bytes == alloc[name].nbytes
        assert report[name].measured_bytes == alloc[name].nbytes
    assert report.kept_bytes == alloc.total_bytes <= alloc.budget_bytes


def test_plan_ranks_with_a_byte_budget(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    alloc = plan_ranks(small_net(), batches, ["6", "8"], budget=4000, candidates=(0.4, 0.9))
    assert alloc.budget_bytes == 4000
    assert alloc.total_bytes <= 4000


# ---------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------


def test_json_round_trip(sens: Sensitivity) -> None:
    text = sens.to_json(indent=2)
    assert isinstance(json.loads(text), dict)
    assert Sensitivity.from_json(text) == sens
    alloc = allocate(sens, sens.bytes_at(0.8))
    again = Allocation.from_json(alloc.to_json())
    assert again == alloc
    assert again.ranks == alloc.ranks
    assert again.thresholds == alloc.thresholds
    # Ranks come back as the tuples of ints convert's rank dict takes.
    assert all(isinstance(r, int) for rs in again.ranks.values() for r in rs)
    CompressionConfig(method="asi", rank=again.ranks["3"])


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_budget_too_small(sens: Sensitivity) -> None:
    floor = sum(layer.choices[0].nbytes for layer in sens.layers)
    allocate(sens, floor)
    with pytest.raises(ValueError, match=rf"budget_bytes={floor - 1} is below.*{floor} bytes"):
        allocate(sens, floor - 1)


def test_allocate_errors() -> None:
    with pytest.raises(ValueError, match="no layers"):
        allocate(Sensitivity(layers=()), 100)
    with pytest.raises(TypeError, match="budget_bytes must be an int"):
        allocate(make_sensitivity([[(1, 0.1)]]), 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Sensitivity"):
        allocate({"a": [(1, 0.1)]}, 10)  # type: ignore[arg-type]


def test_result_validation() -> None:
    with pytest.raises(ValueError, match="no choices"):
        LayerSensitivity(name="conv", choices=())
    with pytest.raises(ValueError, match="strictly increasing"):
        LayerSensitivity(name="conv", choices=(Choice(0.8, (), 1, 0.1), Choice(0.5, (), 1, 0.2)))
    with pytest.raises(ValueError, match="error must be"):
        Choice(0.5, (), 1, float("nan"))
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        Choice(0.0, (), 1, 0.1)
    with pytest.raises(ValueError, match="nbytes"):
        Choice(0.5, (), -1, 0.1)
    with pytest.raises(KeyError, match=r"not measured at 0\.3"):
        make_sensitivity([[(1, 0.1)]]).layers[0].choice(0.3)


@pytest.mark.parametrize(
    "candidates, error, match",
    [
        ((), ValueError, "candidates is empty"),
        ((0.0, 0.5), ValueError, r"candidates\[0\] must be in \(0, 1\]"),
        ((0.5, 1.5), ValueError, r"candidates\[1\] must be in \(0, 1\]"),
        (("0.5",), TypeError, "must be a float"),
        ("0.5", TypeError, "sequence of floats"),
    ],
)
def test_bad_candidates(
    batches: list[tuple[torch.Tensor, torch.Tensor]], candidates: Any, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        measure_sensitivity(small_net(), batches, ["3"], candidates)


def test_measure_errors(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with pytest.raises(ValueError, match="batches is empty"):
        measure_sensitivity(small_net(), [], ["3"])
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pair"):
        measure_sensitivity(small_net(), [batches[0][0]], ["3"])
    with pytest.raises(ValueError, match="not modules of the model"):
        measure_sensitivity(small_net(), batches, ["nope"])
    with pytest.raises(TypeError, match="BatchNorm2d"):
        measure_sensitivity(small_net(), batches, ["1"])
    frozen = small_net()
    frozen[3].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen weight"):
        measure_sensitivity(frozen, batches, ["3"])
    compressed = convert(small_net(), method="asi", rank=0.8, layers=["3"])
    with pytest.raises(ValueError, match="restore"):
        measure_sensitivity(compressed, batches, ["3"])


def test_layer_that_does_not_run_once(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_net()
            self.spare = nn.Conv2d(3, 3, 1)  # registered, never called

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x)
            return out

    with pytest.raises(ValueError, match="'spare' ran 0 times"):
        measure_sensitivity(WithSpare(), batches, ["spare"])

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Linear(3, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(self.conv(x)).mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="'conv' ran 2 times"):
        measure_sensitivity(Twice(), batches, ["conv"])


def test_batches_call_the_model_as_example_inputs_do() -> None:
    """A batch's inputs follow ``example_input``'s convention: a dict is the keyword
    arguments (a Hugging Face batch), a tuple the positional ones."""

    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)) * scale)

    class Positional(Keywords):
        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x, scale=scale)

    torch.manual_seed(0)
    net = Keywords().double()
    positional = Positional().double()
    positional.load_state_dict(net.state_dict())
    x, scale = torch.randn(10, 6, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    targets = torch.randint(0, 3, (10,))
    by_dict = measure_sensitivity(net, [({"x": x, "scale": scale}, targets)], ["a", "b"])
    by_tuple = measure_sensitivity(positional, [((x, scale), targets)], ["a", "b"])
    assert by_dict == by_tuple
