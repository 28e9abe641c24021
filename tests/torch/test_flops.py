"""Tests for tensorcompress.torch.flops: factorisation formulas and counted steps."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tensorcompress import hosvd
from tensorcompress.torch import convert
from tensorcompress.torch.flops import (
    COUNTER_FLOPS,
    LINALG_FLOPS,
    cholesky_flops,
    eigh_flops,
    layer_op_flops,
    qr_flops,
    svd_flops,
    training_step_flops,
    triangular_solve_flops,
)

# One intra-op thread for these small tensors (the fixture is in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def conv_macs(b: int, c_in: int, c_out: int, h: int, w: int, k: int, groups: int = 1) -> int:
    """Multiply-accumulates of a conv's forward (or of its weight or input gradient)."""
    return b * c_out * h * w * (c_in // groups) * k * k


def counted(fn: Callable[..., object], *args: torch.Tensor, mapping: bool = True) -> int:
    with FlopCounterMode(display=False, custom_mapping=LINALG_FLOPS if mapping else None) as c:
        fn(*args)
    return c.get_total_flops()


# ---------------------------------------------------------------------------
# Factorisation formulas
# ---------------------------------------------------------------------------


def test_qr_formulas() -> None:
    m, n = 300, 40
    assert qr_flops(m, n, "r") == round(2 * m * n**2 - 2 * n**3 / 3)
    # Thin Q costs as much again as R (backward accumulation of n reflectors).
    assert qr_flops(m, n) == round(4 * m * n**2 - 4 * n**3 / 3)
    assert qr_flops(m, n, "complete") == round(
        2 * m * n**2 - 2 * n**3 / 3 + 4 * (m**2 * n - m * n**2 + n**3 / 3)
    )
    # Wide: min(m, n) = m reflectors; Q is m x m whatever the mode.
    assert qr_flops(n, m, "r") == round(2 * n**2 * m - 2 * n**3 / 3)
    assert qr_flops(n, m, "reduced") == qr_flops(n, m, "complete")
    assert qr_flops(0, 5) == 0
    with pytest.raises(ValueError, match="mode"):
        qr_flops(3, 2, "economic")
    with pytest.raises(ValueError, match="non-negative"):
        qr_flops(-1, 2)


def test_eigh_and_svd_formulas() -> None:
    assert eigh_flops(10) == 9000
    assert eigh_flops(30, compute_v=False) == 36000
    # Tall: R-SVD (QR first) is the cheaper algorithm.
    assert svd_flops(1000, 10) == 6 * 1000 * 100 + 20 * 1000
    # Square: Golub-Reinsch is cheaper.
    assert svd_flops(10, 10) == 14 * 1000 + 8 * 1000
    assert svd_flops(10, 1000) == svd_flops(1000, 10)  # counted as the transpose
    assert svd_flops(1000, 10, compute_uv=False) == 2 * 1000 * 100 + 2 * 1000
    assert svd_flops(100, 10, full_matrices=True) == 4 * 100**2 * 10 + 22 * 1000


def test_counter_scores_factorisations_only_with_the_mapping() -> None:
    a = torch.randn(50, 12, dtype=torch.float64)
    sym = a.T @ a
    assert counted(torch.linalg.qr, a, mapping=False) == 0  # what FlopCounterMode alone says
    assert counted(torch.linalg.qr, a) == qr_flops(50, 12)
    assert counted(lambda t: torch.linalg.qr(t, mode="r"), a) == qr_flops(50, 12, "r")
    assert counted(torch.linalg.eigh, sym) == eigh_flops(12)
    thin = counted(lambda t: torch.linalg.svd(t, full_matrices=False), a)
    assert thin == svd_flops(50, 12)
    assert counted(torch.linalg.svd, a) == svd_flops(50, 12, full_matrices=True)
    # Leading dims are a batch of matrices.
    assert counted(torch.linalg.qr, torch.randn(3, 2, 20, 6)) == 6 * qr_flops(20, 6)
    # Under any Python dispatch mode torch computes eigvalsh's and svdvals'
    # vectors too (in case a tensor subclass needs gradients): counted as run.
    assert counted(torch.linalg.eigvalsh, sym) == eigh_flops(12)
    assert counted(torch.linalg.svdvals, a) == svd_flops(50, 12)
    # The value-only formulas, for the ops' own arguments.
    eigh_formula = LINALG_FLOPS[torch.ops.aten._linalg_eigh]
    svd_formula = LINALG_FLOPS[torch.ops.aten._linalg_svd]
    assert eigh_formula((5, 12, 12), "L", False) == 5 * eigh_flops(12, compute_v=False)
    assert svd_formula((50, 12), False, False) == svd_flops(50, 12, compute_uv=False)


def test_cholesky_qr_is_counted() -> None:
    """The WSI/WASI refresh's Cholesky QR: Cholesky and the triangular solve are charged."""
    a = torch.randn(50, 12, dtype=torch.float64)
    spd = a.T @ a
    assert cholesky_flops(12) == round(12**3 / 3)
    assert triangular_solve_flops(12, 50) == 50 * 12**2
    assert counted(torch.linalg.cholesky, spd) == cholesky_flops(12)
    batched = counted(lambda t: torch.linalg.cholesky(t.expand(4, 12, 12)), spd)
    assert batched == 4 * cholesky_flops(12)
    r = torch.linalg.cholesky(spd, upper=True)
    right = counted(lambda t: torch.linalg.solve_triangular(t, a, upper=True, left=False), r)
    assert right == triangular_solve_flops(12, 50)  # X R = A: one solve per row of A
    left = counted(lambda t: torch.linalg.solve_triangular(t, a.T, upper=True), r)
    assert left == triangular_solve_flops(12, 50)  # R X = A^T: one per column
    with pytest.raises(ValueError, match="cholesky_flops"):
        cholesky_flops(-1)


# ---------------------------------------------------------------------------
# Counting a training step
# ---------------------------------------------------------------------------


def test_frozen_prefix_runs_no_backward_and_first_trainable_conv_no_input_grad() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False),
    )
    net[0].weight.requires_grad_(False)
    b, s = 2, 12
    m0, m1, m2 = (
        conv_macs(b, 3, 8, s, s, 3),
        conv_macs(b, 8, 16, s, s, 3),
        conv_macs(b, 16, 16, 6, 6, 3),
    )
    step = training_step_flops(net, torch.randn(b, 3, s, s))
    assert step.forward == 2 * (m0 + m1 + m2)
    # conv 2: weight gradient only (its input does not depend on anything
    # trainable); conv 4: weight and input gradients; conv 0: nothing.
    assert step.backward == 2 * (m1 + 2 * m2)
    assert step.decomposition == 0 and step.linalg == 0
    assert step.total == step.forward + step.backward
    assert dict(step.backward_by_op) == {"aten.convolution_backward": step.backward}

    for p in net.parameters():
        p.requires_grad_(False)
    assert training_step_flops(net, torch.randn(b, 3, s, s)).backward == 0


def test_groups_are_counted_as_they_run() -> None:
    dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    macs = conv_macs(2, 16, 16, 8, 8, 3, groups=16)
    step = training_step_flops(dw, torch.randn(2, 16, 8, 8))
    assert step.forward == step.backward == 2 * macs  # weight gradient only
    assert step.forward == layer_op_flops(dw, (2, 16, 8, 8), (2, 16, 8, 8))
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=COUNTER_FLOPS) as fixed:
        dw(x).sum().backward()  # forward, input gradient, weight gradient
    assert fixed.get_total_flops() == 3 * 2 * macs
    # Torch's own formula (2.13) charges the weight gradient as a dense conv's.
    with FlopCounterMode(display=False) as plain:
        dw(x).sum().backward()
    assert plain.get_total_flops() >= fixed.get_total_flops()
    grouped = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4, bias=False)
    macs = conv_macs(2, 8, 12, 4, 4, 3, groups=4)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=COUNTER_FLOPS) as fixed:
        grouped(x).sum().backward()
    assert fixed.get_total_flops() == 3 * 2 * macs
    transposed = nn.ConvTranspose2d(6, 8, 3, stride=2, groups=2, bias=False)
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=COUNTER_FLOPS) as fixed:
        transposed(x).sum().backward()
    # Each weight element meets each of the 5x5 input positions of each image,
    # in forward, input gradient and weight gradient.
    assert fixed.get_total_flops() == 3 * 2 * math.prod(transposed.weight.shape) * 2 * 25


def test_in_place_addmm_counts_as_its_product() -> None:
    a, b, c = torch.randn(64, 32), torch.randn(32, 16), torch.zeros(64, 16)
    with FlopCounterMode(display=False) as plain:
        c.addmm_(a, b)
    with FlopCounterMode(display=False, custom_mapping=COUNTER_FLOPS) as fixed:
        c.addmm_(a, b)
    assert plain.get_total_flops() == 0  # torch's counter misses it
    assert fixed.get_total_flops() == 2 * 64 * 32 * 16


def test_linear_layer_op_flops() -> None:
    lin = nn.Linear(6, 4)
    assert layer_op_flops(lin, (2, 5, 6), (2, 5, 4)) == 2 * 2 * 5 * 4 * 6
    step = training_step_flops(lin, torch.randn(2, 5, 6))
    assert step.forward == 2 * 2 * 5 * 4 * 6
    assert layer_op_flops(nn.ReLU(), (2, 3), (2, 3)) == 0


def small_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1),
    )


def test_decomposition_is_what_the_compressed_layer_adds() -> None:
    x = torch.randn(6, 3, 10, 10)
    plain = training_step_flops(small_net(), x)
    net = convert(small_net(), method="hosvd", rank=0.8, layers=["5"])
    inputs: list[torch.Tensor] = []
    layer = dict(net.named_modules())["5"]
    layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    step = training_step_flops(net, x)
    # The network's own forward is unchanged; the decomposition is separate.
    assert step.forward == plain.forward
    assert [name for name, _ in step.decomposition_by_layer] == ["5"]
    # ... and equals HOSVD on the layer's input, counted on its own.
    assert step.decomposition == counted(lambda t: hosvd.decompose(t, 0.8), inputs[0])
    assert 0 < step.linalg < step.decomposition  # eigh by formula, Gram products counted
    assert "aten._linalg_eigh" in dict(step.forward_by_op)


def test_asi_warm_step_is_cheaper_than_its_cold_start() -> None:
    x = torch.randn(6, 3, 10, 10)
    net = convert(small_net(), method="asi", rank=0.8, layers=["3", "5"])
    cold = training_step_flops(net, x)
    warm = training_step_flops(net, x)
    assert "aten._linalg_eigh" in dict(cold.forward_by_op)
    assert "aten.linalg_qr" in dict(warm.forward_by_op)
    assert "aten._linalg_eigh" not in dict(warm.forward_by_op)
    assert 0 < warm.decomposition < cold.decomposition
    assert warm.forward == cold.forward


def test_step_leaves_the_model_as_it_was() -> None:
    net = small_net().eval()
    bn = net[1]
    assert isinstance(bn, nn.BatchNorm2d)
    before = [b.clone() for b in bn.buffers()]
    training_step_flops(net, torch.randn(4, 3, 8, 8))
    assert not net.training and not bn.training
    assert all(torch.equal(b, saved) for b, saved in zip(bn.buffers(), before))
    assert all(p.grad is None for p in net.parameters())


def test_loss_fn_for_non_tensor_outputs() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.lin(x)
            return y, 2 * y

    with pytest.raises(TypeError, match="loss_fn"):
        training_step_flops(Pair(), torch.randn(4, 3))
    step = training_step_flops(Pair(), torch.randn(4, 3), loss_fn=lambda out: out[0].sum())
    assert step.forward == 2 * 4 * 2 * 3
    assert step.backward == 2 * 4 * 2 * 3  # weight gradient only: x needs none
    assert step.to_dict()["total"] == step.total and step.gflops == step.total / 1e9


def test_formulas_are_integers_for_big_sizes() -> None:
    # No float drift for realistic sizes (a 64*7*7 x 512 unfolding).
    n = 3136
    assert qr_flops(n, 512) == round(4 * n * 512**2 - 4 * 512**3 / 3)
    assert math.isclose(svd_flops(n, 512), 6 * n * 512**2 + 20 * 512**3)
