"""Tests for tensorcompress.torch.budget.weights: weight sensitivity and weight-rank plans."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tensorcompress.torch import convert
from tensorcompress.torch.budget import (
    allocate,
    measure_weight_sensitivity,
    output_grams,
    plan_weight_ranks,
    weights,
)
from tensorcompress.torch.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    LowRankModule,
    factor_by_outputs,
)
from tensorcompress.torch.wasi import to_wasi, wasi_layers

CANDIDATES = (0.3, 0.6, 0.9, 1.0)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, stride=2, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 10, 1),
        nn.Flatten(2),
        nn.Linear(16, 24),
        nn.GELU(),
        nn.Linear(24, 8),
    ).double()


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.zeros(4))
        for _ in range(n)
    ]


LAYERS = ["0", "3", "5", "7"]


def _inputs(net: nn.Module, batches: list) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in LAYERS}
    mods = dict(net.named_modules())
    hooks = [
        mods[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].detach()))
        for n in LAYERS
    ]
    net.train()
    with torch.no_grad():
        for x, _ in batches:
            net(x)
    for h in hooks:
        h.remove()
    return seen


def _output(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight, None)
    return x @ weight.transpose(0, 1)


def test_errors_and_bytes_equal_the_truncated_layers_outputs() -> None:
    net, batches = _net(), _batches()
    sens = measure_weight_sensitivity(copy_of(net), batches, LAYERS, CANDIDATES)
    inputs = _inputs(copy_of(net), batches)
    mods = dict(net.named_modules())
    for name in LAYERS:
        module = mods[name]
        w = module.weight.detach()
        matrix = w.reshape(w.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        for choice in sens[name].choices:
            (k,) = choice.ranks
            truncated = ((u[:, :k] * s[:k]) @ vh[:k]).reshape(w.shape)
            errs = [
                float(
                    (_output(module, x, w) - _output(module, x, truncated)).norm()
                    / _output(module, x, w).norm()
                )
                for x in inputs[name]
            ]
            assert choice.error == pytest.approx(sum(errs) / len(errs), rel=1e-9, abs=1e-12)
            assert choice.nbytes == k * sum(matrix.shape) * 8  # float64
        # The full spectrum loses nothing.
        assert sens[name].choice(1.0).error == pytest.approx(0.0, abs=1e-12)
    assert sens.n_batches == 2


def copy_of(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net)


def test_ranks_are_the_ones_to_wasi_gives() -> None:
    net, batches = _net(), _batches(1)
    sens = measure_weight_sensitivity(net, batches, LAYERS, CANDIDATES)
    for eps in CANDIDATES:
        factored = wasi_layers(to_wasi(copy_of(net), rank=eps, layers=LAYERS))
        assert {n: m.rank for n, m in factored.items()} == {
            n: sens[n].choice(eps).ranks[0] for n in LAYERS
        }


def test_measuring_leaves_the_model_as_it_was() -> None:
    net, batches = _net(), _batches()
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    measure_weight_sensitivity(net, batches, LAYERS, CANDIDATES)
    assert not net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())


def test_plan_spends_the_thresholds_bytes_with_no_more_error() -> None:
    net, batches = _net(), _batches()
    alloc = plan_weight_ranks(net, batches, LAYERS, budget=0.6, candidates=CANDIDATES)
    sens = measure_weight_sensitivity(net, batches, LAYERS, CANDIDATES)
    assert alloc.total_bytes <= sens.bytes_at(0.6)
    assert alloc.total_error <= sens.error_at(0.6) + 1e-12
    assert alloc == allocate(sens, sens.bytes_at(0.6))
    # An int budget is bytes.
    by_bytes = plan_weight_ranks(net, batches, LAYERS, alloc.total_bytes, CANDIDATES)
    assert by_bytes.choices == alloc.choices
    # The plan factors the model.
    ranks = {n: k for n, (k,) in alloc.ranks.items()}
    factored = wasi_layers(to_wasi(copy_of(net), rank=ranks, layers=LAYERS))
    assert {n: m.rank for n, m in factored.items()} == ranks


def test_a_sensitive_layer_gets_the_rank() -> None:
    """Two Linear layers with the same spectrum: the one whose inputs lie in its weight's
    weakest directions loses more output by truncation, so a budget goes to it."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    s = torch.cat([torch.ones(8), torch.full((8,), 0.5)]).double()  # top 8: 0.8 of it
    weight = (q * s) @ q.T  # W = Q S Q^T: direction j of the input is scaled by s_j

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 16, bias=False).double()
            self.b = nn.Linear(16, 16, bias=False).double()
            with torch.no_grad():
                self.a.weight.copy_(weight)
                self.b.weight.copy_(weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # a reads the strongest directions, b the weakest.
            return self.a(x[:, :8] @ q[:, :8].T) + self.b(x[:, 8:] @ q[:, 8:].T)

    batches = [(torch.randn(32, 16, dtype=torch.float64), torch.zeros(32))]
    sens = measure_weight_sensitivity(Two(), batches, ["a", "b"], (0.75, 1.0))
    assert sens["a"].choice(0.75).ranks == (8,)
    assert sens["a"].choice(0.75).error < 1e-9  # a's input lives in the directions kept
    assert sens["b"].choice(0.75).error == pytest.approx(1.0)  # b's in those dropped
    alloc = allocate(sens, sens["a"].choice(0.75).nbytes + sens["b"].choice(1.0).nbytes)
    assert alloc.thresholds == {"a": 0.75, "b": 1.0}


def test_bad_input_gets_clear_errors() -> None:
    batches = _batches(1)
    grouped = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3)).double()
    with pytest.raises(TypeError, match=r"layer '0' \(Conv2d\) cannot be factored"):
        measure_weight_sensitivity(grouped, batches, ["0"])
    net = _net()
    to_wasi(net, rank=4, layers=["5"])
    with pytest.raises(TypeError, match=r"'5' \(WASILinear\) are not supported"):
        measure_weight_sensitivity(net, batches, ["5"])
    net = convert(_net(), method="asi", rank=0.8, layers=["7"])
    with pytest.raises(ValueError, match="'7' is already CompressedLinear"):
        measure_weight_sensitivity(net, batches, ["7"])
    with pytest.raises(ValueError, match="batches is empty"):
        measure_weight_sensitivity(_net(), [], LAYERS)
    with pytest.raises(ValueError, match=r"candidates\[0\] must be in \(0, 1\]"):
        measure_weight_sensitivity(_net(), batches, LAYERS, (0.0, 0.5))
    twice = nn.Sequential(nn.Linear(4, 4)).double()
    twice.forward = lambda x: twice[0](twice[0](x))  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="ran 2 times in one forward"):
        measure_weight_sensitivity(twice, [(torch.randn(2, 4, dtype=torch.float64), None)], ["0"])
    with pytest.raises(TypeError, match="budget must be an int"):
        plan_weight_ranks(_net(), batches, LAYERS, budget=True)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        plan_weight_ranks(_net(), batches, LAYERS, budget=1.5)


def test_only_if_smaller_makes_dense_a_choice() -> None:
    """With ``only_if_smaller``, a rank at or above break-even leaves the layer dense
    (to_wasi's rule): the dense weight's bytes, no error; the plan may choose it."""
    net, batches = _net(), _batches()
    sens = measure_weight_sensitivity(net, batches, LAYERS, CANDIDATES, only_if_smaller=True)
    plain = measure_weight_sensitivity(net, batches, LAYERS, CANDIDATES)
    mods = dict(net.named_modules())
    for name in LAYERS:
        w = mods[name].weight
        out, inner = w.shape[0], w[0].numel()
        for choice, free in zip(sens[name].choices, plain[name].choices):
            (k,) = choice.ranks
            if k * (out + inner) >= out * inner:
                assert (choice.nbytes, choice.error) == (w.numel() * 8, 0.0)
            else:
                assert choice == free
        # Full rank is never smaller than the weight.
        assert sens[name].choice(1.0).error == 0.0
    # The plan adds 1.0 (dense) to the candidates, and the converted model's weights
    # hold exactly the bytes it allocated.
    alloc = plan_weight_ranks(net, batches, LAYERS, 0.6, (0.3, 0.6), only_if_smaller=True)
    with_dense = measure_weight_sensitivity(
        net, batches, LAYERS, (0.3, 0.6, 1.0), only_if_smaller=True
    )
    assert alloc == allocate(with_dense, with_dense.bytes_at(0.6))
    ranks = {n: k for n, (k,) in alloc.ranks.items()}
    model = to_wasi(copy_of(net), rank=ranks, layers=LAYERS, only_if_smaller=True)
    factored = wasi_layers(model)
    assert set(factored) < set(LAYERS)  # some layer stays dense here
    mods = dict(model.named_modules())
    held = sum(
        8 * (mods[n].left.numel() + mods[n].right.numel())
        if n in factored
        else 8 * mods[n].weight.numel()
        for n in LAYERS
    )
    assert held == alloc.total_bytes <= alloc.budget_bytes


def _rows(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A layer's outputs (bias aside) as (samples, out): a conv's pixels are samples."""
    y = _output(module, x, weight)
    return (
        y.transpose(0, 1).reshape(y.shape[1], -1).T if y.ndim == 4 else y.reshape(-1, y.shape[-1])
    )


@pytest.mark.parametrize("rows", [1 << 14, 5])
def test_output_grams_are_the_outputs_gram_matrices(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Summed over batches, in float64 a few rows at a time (``_GRAM_ROWS``)."""
    monkeypatch.setattr(weights, "_GRAM_ROWS", rows)
    net, batches = _net(), _batches()
    grams = output_grams(copy_of(net), batches, LAYERS)
    inputs = _inputs(copy_of(net), batches)
    mods = dict(net.named_modules())
    assert list(grams) == LAYERS
    for name in LAYERS:
        w = mods[name].weight.detach()
        ys = [_rows(mods[name], x, w) for x in inputs[name]]
        assert grams[name].dtype == torch.float64
        torch.testing.assert_close(grams[name], sum(y.T @ y for y in ys), rtol=1e-12, atol=1e-12)


def test_outputs_basis_errors_are_those_of_the_factored_layers() -> None:
    """With output_grams, each candidate's error is that of the weight to_wasi factors
    in the outputs' basis; the ranks and bytes are the SVD's; on the batch the basis
    comes from, no error is above the SVD's (the basis is the best at each rank)."""
    net, batches = _net(), _batches(1)
    grams = output_grams(copy_of(net), batches, LAYERS)
    sens = measure_weight_sensitivity(copy_of(net), batches, LAYERS, CANDIDATES, output_grams=grams)
    svd = measure_weight_sensitivity(copy_of(net), batches, LAYERS, CANDIDATES)
    inputs = {n: xs[0] for n, xs in _inputs(copy_of(net), batches).items()}
    mods = dict(net.named_modules())
    for name in LAYERS:
        module, w = mods[name], mods[name].weight.detach()
        for choice, plain in zip(sens[name].choices, svd[name].choices):
            assert (choice.ranks, choice.nbytes) == (plain.ranks, plain.nbytes)
            assert choice.error <= plain.error + 1e-12
            factored = wasi_layers(
                to_wasi(
                    copy_of(net),
                    rank=choice.threshold,
                    layers=[name],
                    output_grams={name: grams[name]},
                )
            )[name]
            left = factored.left.detach()
            torch.testing.assert_close(
                left.T @ left, torch.eye(left.shape[1], dtype=torch.float64), atol=1e-12, rtol=0
            )
            y = _output(module, inputs[name], w)
            err = (y - _output(module, inputs[name], factored.dense_weight())).norm() / y.norm()
            assert choice.error == pytest.approx(float(err), rel=1e-9, abs=1e-12)
        assert sens[name].choice(1.0).error == pytest.approx(0.0, abs=1e-12)
    # The plan measures the same factorization.
    alloc = plan_weight_ranks(net, batches, LAYERS, 0.6, CANDIDATES, output_grams=grams)
    assert alloc == allocate(sens, sens.bytes_at(0.6))


def test_outputs_basis_is_exact_on_inputs_of_low_rank() -> None:
    """Inputs in a 3-dimensional subspace: rank 3 in the outputs' basis reproduces the
    layer's outputs exactly, where the weight's own SVD at rank 3 does not."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 12, bias=False).double()
    x = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 16, dtype=torch.float64)
    grams = output_grams(layer, [(x, None)], [""])
    by_outputs = to_wasi(copy_of(layer), rank=3, layers=[""], output_grams=grams)
    by_svd = to_wasi(copy_of(layer), rank=3, layers=[""])
    y = layer(x)
    with torch.no_grad():
        assert float((by_outputs.dense_weight() @ x.T).T.sub(y).norm() / y.norm()) < 1e-12
        assert float((by_svd.dense_weight() @ x.T).T.sub(y).norm() / y.norm()) > 0.1
    # Its weight keeps less of W's norm than the SVD's, which is what the SVD maximises.
    assert by_outputs.weight_explained_variance < by_svd.weight_explained_variance


def test_bad_output_grams_get_clear_errors() -> None:
    net, batches = _net(), _batches(1)
    grams = output_grams(net, batches, LAYERS)
    partial = {n: grams[n] for n in LAYERS[:2]}
    with pytest.raises(ValueError, match=r"output_grams needs exactly one entry.*missing \['5'"):
        measure_weight_sensitivity(net, batches, LAYERS, output_grams=partial)
    with pytest.raises(ValueError, match=r"output_grams needs exactly one entry.*missing \['5'"):
        to_wasi(copy_of(net), rank=0.6, layers=LAYERS, output_grams=partial)
    wrong = {**grams, "5": grams["7"]}
    with pytest.raises(ValueError, match=r"layer '5': its output Gram matrix must be \(24, 24\)"):
        measure_weight_sensitivity(net, batches, LAYERS, output_grams=wrong)
    with pytest.raises(ValueError, match=r"layer '5': its output Gram matrix must be \(24, 24\)"):
        to_wasi(copy_of(net), rank=0.6, layers=LAYERS, output_grams=wrong)
    nan = {**grams, "0": torch.full_like(grams["0"], float("nan"))}
    with pytest.raises(ValueError, match="layer '0': its output Gram matrix holds NaN"):
        to_wasi(copy_of(net), rank=0.6, layers=LAYERS, output_grams=nan)


# ---------------------------------------------------------------------------
# factor_by_outputs: post-training factors at the rank the outputs need
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_factor_by_outputs_keeps_the_threshold_of_the_outputs(threshold: float) -> None:
    """Each layer's rank is the fewest eigenvectors of its outputs' Gram matrix that
    keep ``threshold`` of their energy, and its outputs on the batch lose exactly the
    rest: ``||Y - Y L L^T||^2 = ||Y||^2 - (the k largest eigenvalues)``."""
    net, batches = _net(), _batches(1)
    grams = output_grams(copy_of(net), batches, LAYERS)
    inputs = {n: xs[0] for n, xs in _inputs(copy_of(net), batches).items()}
    mods = dict(net.named_modules())
    factored = copy_of(net)
    before = dict(factored.named_modules())
    ranks = factor_by_outputs(factored, grams, threshold, only_if_smaller=False)
    new = dict(factored.named_modules())
    assert list(ranks) == LAYERS
    for name in LAYERS:
        eig = np.sort(np.linalg.eigvalsh(grams[name].numpy()))[::-1]
        share = np.cumsum(eig) / eig.sum()
        k = int(np.argmax(share >= threshold - 1e-12)) + 1
        layer, dense = new[name], mods[name]
        assert ranks[name] == k == layer.rank
        assert isinstance(layer, LowRankLinear if isinstance(dense, nn.Linear) else LowRankConv2d)
        assert layer.bias is before[name].bias
        y = _rows(dense, inputs[name], dense.weight.detach())
        y_k = _rows(dense, inputs[name], layer.dense_weight())
        lost = float((y - y_k).square().sum() / y.square().sum())
        assert lost == pytest.approx(1.0 - share[k - 1], abs=1e-10)
        assert lost <= 1.0 - threshold + 1e-12


def test_factor_by_outputs_is_exact_on_inputs_of_low_rank_and_keeps_trainability() -> None:
    """Inputs in a 3-dimensional subspace: threshold 1 gives rank 3 and the same
    outputs; a frozen weight gives frozen factors, a trainable one trainable factors."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 10)).double()
    net[0].requires_grad_(False)
    x = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 16, dtype=torch.float64)
    grams = output_grams(copy_of(net), [(x, None)], ["0", "1"])
    with torch.no_grad():
        y = net(x)
    ranks = factor_by_outputs(net, grams, 1.0)
    # The second layer's inputs are 3-dimensional plus the first layer's bias.
    assert ranks == {"0": 3, "1": 4}
    with torch.no_grad():
        torch.testing.assert_close(net(x), y, rtol=1e-10, atol=1e-10)
    assert not net[0].left.requires_grad and not net[0].right.requires_grad
    assert net[1].left.requires_grad and net[1].right.requires_grad


def test_factor_by_outputs_leaves_dense_what_would_not_shrink() -> None:
    """At threshold 1 the first conv (27 -> 12, break-even 8.3) needs all 12 ranks: it
    stays an nn.Conv2d by default, and is factored when asked for every layer."""
    net, batches = _net(), _batches(1)
    grams = output_grams(copy_of(net), batches, ["0"])
    kept = copy_of(net)
    assert factor_by_outputs(kept, grams, 1.0) == {}
    assert type(kept[0]) is nn.Conv2d
    everything = copy_of(net)
    assert factor_by_outputs(everything, grams, 1.0, only_if_smaller=False) == {"0": 12}
    assert isinstance(everything[0], LowRankConv2d)


def test_factor_by_outputs_bad_input_gets_clear_errors() -> None:
    net, batches = _net(), _batches(1)
    grams = output_grams(copy_of(net), batches, LAYERS)
    for bad in (0.0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match=r"threshold must be a float in \(0, 1\]"):
            factor_by_outputs(net, grams, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"layer '1': BatchNorm2d; only Linear and Conv2d"):
        factor_by_outputs(net, {"1": grams["0"]}, 0.9)
    with pytest.raises(TypeError, match=r"layer '9': no module"):
        factor_by_outputs(net, {"9": grams["0"]}, 0.9)
    with pytest.raises(ValueError, match=r"layer '5': its output Gram matrix must be \(24, 24\)"):
        factor_by_outputs(net, {**grams, "5": grams["7"]}, 0.9)
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="not the model itself"):
        factor_by_outputs(layer, {"": torch.eye(3)}, 0.9)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)).double()
    with pytest.raises(ValueError, match=r"layer '0'.*grouped conv"):
        factor_by_outputs(grouped, {"0": torch.eye(4, dtype=torch.float64)}, 0.9)
    # Nothing was factored by the failed calls.
    assert not any(isinstance(m, LowRankModule) for m in net.modules())
