"""WSI/WASI training layers: factored gradients, the subspace refresh, conversion, errors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tensorcompress.results import TuckerResult
from tensorcompress.torch import last_blocks, last_layers
from tensorcompress.torch.lowrank import LowRankModule, to_dense
from tensorcompress.torch.measure import track_memory
from tensorcompress.torch.wasi import (
    WASIConfig,
    WASIConv2d,
    WASILinear,
    WASIModule,
    _positive_qr,
    refresh_subspaces,
    to_wasi,
    wasi_layers,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# Conv settings the factored conv must reproduce (groups == 1 only).
CONVS: dict[str, dict[str, Any]] = {
    "3x3": {"kernel_size": 3, "padding": 1},
    "3x3-stride2-reflect": {"kernel_size": 3, "padding": 1, "stride": 2, "padding_mode": "reflect"},
    "2x3-same-dilated": {"kernel_size": (2, 3), "padding": "same", "dilation": 2},
    "3x3-circular-nobias": {
        "kernel_size": 3,
        "padding": 1,
        "padding_mode": "circular",
        "bias": False,
    },
    "1x1": {"kernel_size": 1},
}


def dense_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, conv: nn.Conv2d) -> Any:
    """``conv``'s forward with the weight ``w`` (a tensor that may require grad)."""
    return conv._conv_forward(x, w, b)


def orthonormality_error(left: torch.Tensor) -> float:
    """``max |L^T L - I|``."""
    k = left.shape[1]
    eye = torch.eye(k, dtype=left.dtype)
    return float((left.detach().T @ left.detach() - eye).abs().max())


def vanilla_grads(
    layer: WASIModule, dense: nn.Module, x: torch.Tensor, g: torch.Tensor, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, dW (as a matrix), dx and db of the dense layer with weight ``L R``.

    ``kept`` is the input the weight gradient sees (``x``, or WASI's
    reconstruction of it); ``x`` gives the output and the input gradient.
    """
    w = layer.dense_weight().requires_grad_()
    bias = None if dense.bias is None else dense.bias.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()

    def run(inp: torch.Tensor) -> torch.Tensor:
        if isinstance(dense, nn.Conv2d):
            return dense_conv(inp, w, bias, dense)
        return F.linear(inp, w, bias)

    y = run(xr)
    (gx,) = torch.autograd.grad(y, xr, g, retain_graph=True)
    yk = run(kept.detach())
    grads = torch.autograd.grad(yk, [w] if bias is None else [w, bias], g)
    db = grads[1] if bias is not None else torch.zeros(0)
    return y.detach(), grads[0].reshape(w.shape[0], -1), gx, db


def make_layer(kind: str, method: str, rank: int | float, act_rank: Any = 1.0) -> tuple[Any, ...]:
    """A dense layer, its factored twin, and an input (float64)."""
    torch.manual_seed(0)
    cfg = WASIConfig(method=method, act_rank=act_rank)
    if kind == "linear3d":
        dense: nn.Module = nn.Linear(12, 7).double()
        x = torch.randn(4, 5, 12, dtype=torch.float64)
        layer: WASIModule = WASILinear.from_dense(dense, rank, cfg)
    elif kind == "linear2d":
        dense = nn.Linear(9, 14).double()
        x = torch.randn(6, 9, dtype=torch.float64)
        layer = WASILinear.from_dense(dense, rank, cfg)
    elif kind == "linear-rows":  # 2600 rows: the backward's row chunks
        dense = nn.Linear(12, 7).double()
        x = torch.randn(2, 1300, 12, dtype=torch.float64)
        layer = WASILinear.from_dense(dense, rank, cfg)
    else:
        opts = dict(CONVS[kind])
        dense = nn.Conv2d(5, 6, **opts).double()
        x = torch.randn(3, 5, 9, 8, dtype=torch.float64)
        layer = WASIConv2d.from_dense(dense, rank, cfg)
    return dense, layer, x


KINDS = ["linear3d", "linear2d", "linear-rows", *CONVS]


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["wsi", "wasi"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("full", [True, False], ids=["full-rank", "rank-3"])
def test_factor_gradients_are_the_chain_rule_of_vanilla(method: str, kind: str, full: bool) -> None:
    """dL = dW R^T and dR = L^T dW, dx and db as vanilla's, for W = L R (float64).

    WSI at any weight rank, WASI with the input kept whole (act_rank=1.0).
    """
    dense, layer, x = make_layer(kind, method, 1.0 if full else 3)
    x = x.requires_grad_()
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, dw, gx, db = vanilla_grads(layer, dense, x, g, x)
    left, right = layer.left.detach(), layer.right.detach().reshape(layer.rank, -1)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.left.grad, dw @ right.T, rtol=1e-12, atol=1e-12)
    grad_r = layer.right.grad.reshape(layer.rank, -1)
    torch.testing.assert_close(grad_r, left.T @ dw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, gx, rtol=1e-12, atol=1e-12)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, db, rtol=1e-12, atol=1e-12)
    if full:
        # Full rank: L R is the dense weight itself.
        w = dense.weight.detach().reshape(dense.weight.shape[0], -1)
        torch.testing.assert_close(layer.dense_weight().reshape(w.shape), w, rtol=0, atol=1e-12)


def test_linear_step_holds_no_whole_rows_by_rank_intermediate() -> None:
    torch.manual_seed(0)
    layer = WASILinear.from_dense(nn.Linear(64, 64), 48, WASIConfig(method="wsi"))
    x = torch.randn(16384, 64, requires_grad=True)
    y, forward = track_memory(lambda: layer(x), "cpu")
    assert forward.peak_bytes < 4 * y.numel() + 2**20  # the output, no whole x R^T
    g = torch.randn_like(y)
    _, mem = track_memory(lambda: torch.autograd.grad(y, (x, layer.left, layer.right), g), "cpu")
    # The input gradient and chunk-sized temporaries; whole G L and X R^T would add
    # 2 * 16384 * 48 * 4 bytes = 6 MiB.
    assert mem.peak_bytes < 4 * x.numel() + 2**20


@pytest.mark.parametrize("kind", ["linear3d", "3x3-stride2-reflect", "2x3-same-dilated"])
def test_full_rank_square_left_recovers_the_dense_gradient(kind: str) -> None:
    """With k = out (L square orthogonal), L dR is vanilla's dW exactly."""
    dense, layer, x = make_layer(kind, "wsi", 1.0)
    assert layer.rank == layer.left.shape[0]
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    _, dw, _, _ = vanilla_grads(layer, dense, x, g, x)
    implied = layer.left.detach() @ layer.right.grad.reshape(layer.rank, -1)
    torch.testing.assert_close(implied, dw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear3d", "linear2d", "3x3", "3x3-stride2-reflect", "1x1"])
def test_wasi_gradient_uses_the_decomposed_input(kind: str) -> None:
    """At a truncated activation rank, dL and dR are vanilla's chain rule on X~."""
    dense, layer, x = make_layer(kind, "wasi", 3, act_rank=0.7)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    res = layer.last_result
    assert isinstance(res, TuckerResult)
    assert res.ranks != tuple(x.shape)  # really truncated
    kept = res.reconstruct().reshape(x.shape)
    _, dw, _, _ = vanilla_grads(layer, dense, x, g, kept)
    _, dw_exact, _, _ = vanilla_grads(layer, dense, x, g, x)
    left, right = layer.left.detach(), layer.right.detach().reshape(layer.rank, -1)
    torch.testing.assert_close(layer.left.grad, dw @ right.T, rtol=1e-11, atol=1e-11)
    grad_r = layer.right.grad.reshape(layer.rank, -1)
    torch.testing.assert_close(grad_r, left.T @ dw, rtol=1e-11, atol=1e-11)
    assert not torch.allclose(dw, dw_exact)  # the compression is real


class _Shapes(TorchDispatchMode):
    """Records the number of elements of every tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("method", ["wsi", "wasi"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_no_tensor_of_the_dense_weight_size_is_formed(method: str, kind: str) -> None:
    """Forward, backward and the refresh never produce a tensor as large as W."""
    torch.manual_seed(0)
    if kind == "linear":
        dense: nn.Module = nn.Linear(48, 64)
        x = torch.randn(4, 3, 48)
    else:
        dense = nn.Conv2d(16, 24, 3, padding=1)
        x = torch.randn(2, 16, 5, 5)
    w_numel = dense.weight.numel()
    model = to_wasi(nn.Sequential(dense), method=method, rank=4, act_rank=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(x).square().mean().backward()  # the cold start (ST-HOSVD) runs outside the check
    opt.step()
    opt.zero_grad()
    with _Shapes() as rec:
        model(x).square().mean().backward()
        opt.step()
    big = [(op, s) for op, s in rec.sizes if torch.Size(s).numel() >= w_numel]
    assert not big, big
    assert len(rec.sizes) > 20  # the mode saw the step


# ---------------------------------------------------------------------------
# Orthonormality and the subspace refresh
# ---------------------------------------------------------------------------


def _trained_pair(
    dtype: torch.dtype = torch.float64, refresh: bool = True, method: str = "wasi"
) -> tuple[Any, ...]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 16), nn.GELU(), nn.Linear(16, 6)).to(dtype)
    model = to_wasi(model, method=method, rank=5, act_rank=0.9, refresh=refresh)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2)
    x = torch.randn(32, 20, dtype=dtype)
    return model, opt, x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_left_is_orthonormal_at_every_training_forward(dtype: torch.dtype) -> None:
    model, opt, x = _trained_pair(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    layer = model[0]
    assert orthonormality_error(layer.left) < tol  # from the SVD
    for _ in range(3):
        loss = model(x).square().mean()
        assert orthonormality_error(layer.left) < tol
        loss.backward()
        opt.step()
        opt.zero_grad()
        drift = orthonormality_error(layer.left)
        assert drift > 10 * tol  # the optimizer step leaves the Stiefel manifold
        product = layer.dense_weight().clone()
        with torch.no_grad():
            model.eval()
            before = model(x)
            model.train()
        model(x)  # the next training forward refreshes
        assert orthonormality_error(layer.left) < tol
        # The refresh is a change of basis only: L R and the outputs are kept.
        torch.testing.assert_close(layer.dense_weight(), product, rtol=tol, atol=tol)
        with torch.no_grad():
            model.eval()
            torch.testing.assert_close(model(x), before, rtol=10 * tol, atol=10 * tol)
            model.train()


def test_refresh_keeps_subspace_and_basis_of_a_fixed_weight() -> None:
    """On an orthonormal L (no step), a refresh changes nothing; repeated, nothing either."""
    _, layer, _ = make_layer("linear3d", "wsi", 4)
    left, right = layer.left.detach().clone(), layer.right.detach().clone()
    for _ in range(3):
        layer.refresh()
        torch.testing.assert_close(layer.left.detach(), left, rtol=0, atol=1e-14)
        torch.testing.assert_close(layer.right.detach(), right, rtol=0, atol=1e-14)


def test_refresh_spans_what_the_papers_subspace_iteration_step_spans() -> None:
    """One warm subspace-iteration step on W = L R (the paper's update) spans range(L).

    The refresh keeps that subspace exactly (projectors equal) while keeping
    L R, which the paper's step (``R <- p_old^T W``) does not.
    """
    torch.manual_seed(3)
    _, layer, _ = make_layer("linear3d", "wsi", 4)
    p_old = layer.left.detach().clone()
    with torch.no_grad():
        layer.left.add_(0.05 * torch.randn_like(layer.left))  # an optimizer step on L
        layer.right.add_(0.05 * torch.randn_like(layer.right))
    w = layer.dense_weight()
    q = w.T @ p_old  # the paper: q = W^T p, p = orth(W q)
    p_new, _ = torch.linalg.qr(w @ q)
    layer.refresh()
    left = layer.left.detach()
    torch.testing.assert_close(left @ left.T, p_new @ p_new.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.dense_weight(), w, rtol=0, atol=1e-12)
    paper_product = p_new @ q.T
    assert float((paper_product - w).norm() / w.norm()) > 1e-6  # the paper's step projects


def _householder_calls(left: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    with mock.patch.object(torch.linalg, "qr", wraps=torch.linalg.qr) as qr:
        q, t = _positive_qr(left)
    return q, t, qr.call_count


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_positive_qr_of_a_stepped_basis_is_cholesky_qr_and_the_unique_qr(
    dtype: torch.dtype,
) -> None:
    """One AdamW step (lr 1e-3) away from orthonormal: Cholesky QR, equal to Householder's."""
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(192, 40, dtype=torch.float64))
    left = (basis + 1e-3 * torch.randn_like(basis).sign()).to(dtype)
    q, t, householder = _householder_calls(left)
    assert householder == 0
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert orthonormality_error(q) < tol
    assert bool((torch.diagonal(t) > 0).all()) and torch.equal(t, t.triu())
    torch.testing.assert_close(q @ t, left, rtol=0, atol=tol)
    q_ref, t_ref = torch.linalg.qr(left)  # the QR with diag(T) > 0 is unique
    signs = torch.sign(torch.diagonal(t_ref))
    torch.testing.assert_close(q, q_ref * signs, rtol=0, atol=10 * tol)
    torch.testing.assert_close(t, t_ref * signs[:, None], rtol=0, atol=10 * tol)


def test_refresh_after_an_adamw_step_takes_the_cholesky_qr() -> None:
    """The ViT run's optimizer (AdamW, lr 1e-3) leaves L close enough for Cholesky QR."""
    torch.manual_seed(2)
    model = to_wasi(nn.Sequential(nn.Linear(192, 768), nn.GELU(), nn.Linear(768, 192)), rank=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, 192)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        with (
            mock.patch.object(torch.linalg, "qr", wraps=torch.linalg.qr) as qr,
            mock.patch.object(torch.linalg, "cholesky", wraps=torch.linalg.cholesky) as chol,
        ):
            model(x)  # refreshes both layers
        assert (qr.call_count, chol.call_count) == (0, 2)
        assert all(orthonormality_error(m.left) < 1e-5 for m in wasi_layers(model).values())


@pytest.mark.parametrize(
    "spoil",
    [
        lambda a: a * torch.logspace(0, 3, a.shape[1], dtype=a.dtype),  # cond 1e3
        lambda a: torch.cat([a[:, :-1], torch.zeros_like(a[:, -1:])], dim=1),  # a zero column
        lambda a: a + 0.3 * a[:, :1],  # far from orthogonal columns
        lambda a: 2.0 * a,  # orthogonal columns, not unit ones (a checkpoint's L)
    ],
    ids=["ill-conditioned", "zero-column", "correlated", "scaled"],
)
def test_positive_qr_falls_back_to_householder_off_the_bound(
    spoil: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    torch.manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(64, 12, dtype=torch.float64))
    left = spoil(basis)
    q, t, householder = _householder_calls(left)
    assert householder == 1
    assert bool(torch.isfinite(q).all()) and bool((torch.diagonal(t) >= 0).all())
    torch.testing.assert_close(q @ t, left, rtol=0, atol=1e-12)
    assert orthonormality_error(q) < 1e-12


def test_refresh_runs_only_when_the_factors_changed() -> None:
    """Gradient accumulation: two forwards without a step in between refresh nothing."""
    model, opt, x = _trained_pair(method="wsi")  # exact input: the sums must match
    layer = model[0]
    version = layer.left._version
    model(x[:16]).square().mean().backward()
    model(x[16:]).square().mean().backward()
    assert layer.left._version == version  # no refresh, no version bump
    grads = layer.left.grad.clone()
    opt.zero_grad()
    model(x[:16]).square().mean().backward()
    first = layer.left.grad.clone()
    opt.zero_grad()
    model(x[16:]).square().mean().backward()
    torch.testing.assert_close(grads, first + layer.left.grad)
    opt.step()
    model(x)
    assert layer.left._version > version  # stepped, then refreshed


def test_refresh_can_be_turned_off() -> None:
    model, opt, x = _trained_pair(refresh=False)
    model(x).square().mean().backward()
    opt.step()
    model(x)
    assert orthonormality_error(model[0].left) > 1e-6
    refresh_subspaces(model)
    assert orthonormality_error(model[0].left) < 1e-12


def test_refresh_after_load_state_dict() -> None:
    model, _, x = _trained_pair()
    state = copy.deepcopy(model.state_dict())
    state["0.left"] = state["0.left"] * 2.0  # a non-orthonormal L from a checkpoint
    model.load_state_dict(state)
    model(x)
    assert orthonormality_error(model[0].left) < 1e-12


# ---------------------------------------------------------------------------
# Training state lives on the factors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-3),
        lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
    ],
    ids=["adamw", "sgd-momentum"],
)
def test_optimizer_state_is_the_factors_size(make_opt: Callable[[Any], Any]) -> None:
    torch.manual_seed(0)
    model = to_wasi(nn.Sequential(nn.Linear(64, 96)), method="wasi", rank=8, act_rank=0.8)
    names = {name for name, _ in model.named_parameters()}
    assert names == {"0.left", "0.right", "0.bias"}  # no dense weight
    opt = make_opt(model.parameters())
    model(torch.randn(16, 64)).square().mean().backward()
    opt.step()
    sizes = {p.numel() for p in model.parameters()}
    assert sizes == {96 * 8, 8 * 64, 96}
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor) and value.ndim:
                assert value.shape == p.shape


def test_training_reduces_the_loss() -> None:
    """WASI fits a low-rank teacher (a sanity check that the factored update descends)."""
    torch.manual_seed(0)
    teacher = torch.randn(24, 4) @ torch.randn(4, 32) / 4
    model = to_wasi(nn.Sequential(nn.Linear(32, 24)), method="wasi", rank=6, act_rank=0.95)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(60):
        x = torch.randn(64, 32)
        loss = F.mse_loss(model(x), x @ teacher.T)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


# ---------------------------------------------------------------------------
# Activation compression state
# ---------------------------------------------------------------------------


class _Attention(nn.Module):
    """q, k and v read the same tensor; o reads another."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 4, dim=-1)
        return self.o(a @ self.v(x))


def test_layers_reading_one_tensor_share_one_decomposition() -> None:
    torch.manual_seed(0)
    model = to_wasi(_Attention(), method="wasi", rank=4, act_rank=0.8)
    x = torch.randn(8, 10, 16)
    model(x).sum().backward()
    q, k, v, o = model.q, model.k, model.v, model.o
    assert q.last_result is k.last_result is v.last_result
    assert o.last_result is not q.last_result
    unshared = to_wasi(_Attention(), method="wasi", rank=4, act_rank=0.8, share_inputs=False)
    unshared(x).sum().backward()
    assert unshared.q.last_result is not unshared.k.last_result


def test_asi_warm_start_keeps_ranks_and_follows_a_smaller_batch() -> None:
    torch.manual_seed(0)
    model = to_wasi(nn.Sequential(nn.Linear(16, 8)), method="wasi", rank=4, act_rank=0.6)
    layer = model[0]
    base = torch.randn(32, 3) @ torch.randn(3, 16)
    model(base + 0.01 * torch.randn(32, 16)).sum().backward()
    first = layer.act_ranks
    assert first is not None and layer.last_result.n_iter == 0  # cold start
    model(base + 0.01 * torch.randn(32, 16)).sum().backward()
    assert layer.act_ranks == first and layer.last_result.n_iter == 1  # warm step
    model(base[:2]).sum().backward()  # a last batch smaller than the batch rank
    assert layer.act_ranks[0] <= 2
    model(base).sum().backward()
    assert layer.act_ranks == first


def test_eval_and_no_grad_forwards_keep_no_state() -> None:
    model, _, x = _trained_pair()
    layer = model[0]
    model.eval()
    model(x)
    assert layer.last_result is None
    model.train()
    with torch.no_grad():
        model(x)
    assert layer.last_result is None
    model(x)
    assert layer.last_result is not None


def test_frozen_factors_train_nothing_and_pass_the_input_gradient() -> None:
    _, layer, x = make_layer("linear3d", "wasi", 3)
    layer.left.requires_grad_(False)
    layer.right.requires_grad_(False)
    x = x.requires_grad_()
    layer(x).sum().backward()
    assert layer.left.grad is None and layer.last_result is None
    assert x.grad is not None


def test_autocast_runs_in_bfloat16_and_grads_keep_the_parameter_dtype() -> None:
    torch.manual_seed(0)
    model = to_wasi(nn.Sequential(nn.Linear(16, 12)), method="wasi", rank=4, act_rank=0.9)
    x = torch.randn(8, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model[0].left.grad.dtype == torch.float32


# ---------------------------------------------------------------------------
# Conversion and errors
# ---------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 1),
        nn.Flatten(),
        nn.Linear(16 * 6 * 6, 10),
    )


def test_to_wasi_selects_layers_and_keeps_everything_else() -> None:
    net = _net()
    x = torch.randn(2, 3, 6, 6)
    before = net(x)
    conv = to_wasi(net, method="wsi", rank=1.0, layers=last_layers(1), example_input=x)
    assert isinstance(conv[4], WASIConv2d) and type(conv[2]) is nn.Conv2d
    net = to_wasi(_net(), method="wasi", rank={"0": 1.0, "6": 10}, layers=["0", "6"])
    assert set(wasi_layers(net)) == {"0", "6"}
    assert net[6].rank == 10 and net[0].rank == 8
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)
    by_filter = to_wasi(_net(), rank=0.5, layers=lambda m, name: isinstance(m, nn.Linear))
    assert list(wasi_layers(by_filter)) == ["6"]
    assert by_filter[6].weight_explained_variance >= 0.5


def test_only_if_smaller_leaves_dense_the_layers_whose_factors_are_larger() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Conv2d(8, 8, 3)
    )
    with torch.no_grad():  # layer 0: rank 4 and a little noise; the others: flat spectra
        net[0].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) + 1e-3 * torch.randn(64, 64))
    layers = ["0", "2", "4"]
    rank = {"0": 0.9, "2": 0.9, "4": 8}
    every = to_wasi(copy.deepcopy(net), method="wsi", rank=rank, layers=layers)
    ranks = {n: m.rank for n, m in wasi_layers(every).items()}
    # Break-even ranks: 64*64/128 = 32, 48*64/112 = 27.4, 8*72/80 = 7.2.
    assert ranks["0"] == 4 and ranks["2"] > 28 and ranks["4"] == 8
    assert [wasi_layers(every)[n].smaller_than_dense for n in layers] == [True, False, False]
    some = to_wasi(
        copy.deepcopy(net), method="wasi", rank=rank, layers=layers, only_if_smaller=True
    )
    assert list(wasi_layers(some)) == ["0"]
    assert type(some[2]) is nn.Linear and type(some[4]) is nn.Conv2d
    torch.testing.assert_close(some[2].weight, net[2].weight, rtol=0, atol=0)


def test_to_wasi_takes_the_last_blocks_of_a_transformer_like_model() -> None:
    torch.manual_seed(0)
    net = nn.ModuleDict(
        {"blocks": nn.ModuleList(_Attention() for _ in range(3)), "head": nn.Linear(16, 2)}
    )
    to_wasi(net, method="wasi", rank=4, layers=last_blocks(2))
    assert sorted(wasi_layers(net)) == [f"blocks.{b}.{n}" for b in (1, 2) for n in "koqv"]
    assert type(net["blocks"][0].q) is nn.Linear and type(net["head"]) is nn.Linear


def test_threshold_rank_reads_the_weights_spectrum() -> None:
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    s = torch.tensor([4.0, 3.0, 2.0, 1.0] + [0.1] * 8, dtype=torch.float64)
    lin = nn.Linear(12, 20).double()
    with torch.no_grad():
        lin.weight.copy_(u[:, :12] * s @ v.T)
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    for threshold, expected in [(0.5, 1), (0.6, 2), (float(energy[2]), 3), (0.99, 4), (1.0, 12)]:
        layer = WASILinear.from_dense(lin, threshold)
        assert layer.rank == expected, threshold
        assert layer.weight_explained_variance >= threshold - 1e-12


@pytest.mark.parametrize(
    ("layers", "rank", "error", "match"),
    [
        (["0"], 9, ValueError, r"layer '0'.*rank 9 is outside \[1, 8\]"),
        (["6"], 0, ValueError, r"layer '6'.*rank 0"),
        (["6"], 1.5, ValueError, r"layer '6'.*\(0, 1\]"),
        (["6"], True, TypeError, r"layer '6'.*rank must be an int or a float"),
        (
            ["0", "2"],
            0.9,
            ValueError,
            r"layer '2' \(Conv2d 8->8 3x3, groups=2\) cannot be factored",
        ),
        (None, 0.9, ValueError, r"layer '2'.*grouped"),
    ],
)
def test_bad_layers_and_ranks_name_the_layer_and_convert_nothing(
    layers: Any, rank: Any, error: type[Exception], match: str
) -> None:
    net = _net()
    with pytest.raises(error, match=match):
        to_wasi(net, method="wasi", rank=rank, layers=layers)
    assert not wasi_layers(net)  # all or nothing


def test_conv1d_cannot_factor() -> None:
    net = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(TypeError, match=r"layer '0' \(Conv1d\) cannot be factored"):
        to_wasi(net, rank=2)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        to_wasi(_net(), method="lora", layers=["6"])
    with pytest.raises(TypeError, match=r"unknown options \['ranks'\]"):
        to_wasi(_net(), layers=["6"], ranks=3)
    with pytest.raises(ValueError, match="act_rank"):
        WASIConfig(act_rank=0)
    with pytest.raises(ValueError, match="a rank dict needs exactly one entry"):
        to_wasi(_net(), rank={"6": 3, "0": 2}, layers=["6"])


def test_wasi_refuses_a_non_finite_input_naming_the_layer() -> None:
    model = to_wasi(nn.Sequential(nn.Linear(4, 4)), method="wasi", rank=2)
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"layer '0' \(WASILinear\).*NaN"):
        model(x)


def test_to_wasi_then_to_dense_round_trip() -> None:
    """Full rank and back: the dense layers compute what the originals did."""
    net = _net()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    net = net.double()
    with torch.no_grad():
        before = net(x)
    to_wasi(net, method="wsi", rank=1.0, layers=["0", "4", "6"])
    assert all(isinstance(m, LowRankModule) for m in (net[0], net[4], net[6]))
    dense = to_dense(net)
    assert type(dense[0]) is nn.Conv2d and type(dense[6]) is nn.Linear
    assert not any(isinstance(m, LowRankModule) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(x), before, rtol=1e-12, atol=1e-12)
