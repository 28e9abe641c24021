"""Layers that read one tensor share one compressed form (SharedInput).

A toy pre-norm block has the two patterns of a transformer: q/k/v read the
normalised hidden states, gate/up the normalised residual stream. At full
rank every compressed gradient is exact, so sharing must give vanilla
autograd's gradients (float64) while decomposing each distinct input once.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorcompress.torch import (
    CompressedLinear,
    CompressedModule,
    CompressionConfig,
    SharedInput,
    compressed_layers,
    convert,
    input_groups,
    restore,
    shared_inputs,
)
from tensorcompress.torch.measure import activation_memory

pytestmark = pytest.mark.usefixtures("single_thread")

B, T, D, M = 3, 4, 6, 8
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


class Block(nn.Module):
    """Pre-norm attention (q/k/v/o) and a gated MLP (gate/up/down)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.norm2 = nn.LayerNorm(D)
        self.gate, self.up = nn.Linear(D, M), nn.Linear(D, M)
        self.down = nn.Linear(M, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        a = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h))
        x = x + self.o(a)
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def block() -> Block:
    torch.manual_seed(0)
    return Block().double()


def batch(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g, dtype=torch.float64)


def full_ranks(method: str) -> dict[str, Any]:
    """Every mode kept at its size (an int rank, so the factors are really computed)."""
    if method == "svd":
        return {name: (M if name == "down" else D) for name in LINEARS}
    return {name: (B, T, M if name == "down" else D) for name in LINEARS}


@pytest.fixture
def decompositions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the layers whose input was decomposed, one entry per decomposition."""
    calls: list[str] = []
    original = CompressedLinear._compress_input

    def counting(self: CompressedLinear, x: torch.Tensor, out_shape: tuple[int, ...]) -> Any:
        calls.append(self.layer_name)
        return original(self, x, out_shape)

    monkeypatch.setattr(CompressedLinear, "_compress_input", counting)
    yield calls


def step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """One backward of a fixed loss; the gradients of every parameter and of ``x``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    model(x).square().sum().backward()
    grads: dict[str, torch.Tensor | None] = {n: p.grad for n, p in model.named_parameters()}
    grads["input"] = x.grad
    return grads


def assert_same_grads(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        if g is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------


def test_convert_groups_the_layers_that_read_one_tensor() -> None:
    x = batch()
    assert shared_inputs(block(), LINEARS, x) == [["q", "k", "v"], ["gate", "up"]]
    model = convert(block(), method="asi", rank=0.9, layers=list(LINEARS), example_input=x)
    assert [g.names for g in input_groups(model)] == [("q", "k", "v"), ("gate", "up")]
    assert [g.leader for g in input_groups(model)] == [model.q, model.gate]
    assert model.o.shared_input is None and model.down.shared_input is None
    assert "input shared by 3 layers" in repr(model.k)
    # Grouping needs the traced forward, and can be turned off.
    assert input_groups(convert(block(), method="asi", layers=list(LINEARS))) == []
    off = convert(block(), layers=list(LINEARS), example_input=x, share_inputs=False)
    assert input_groups(off) == []


def test_only_layers_of_one_type_and_config_are_grouped() -> None:
    x = batch()
    ranks = {name: 0.9 for name in LINEARS} | {"k": 0.8}
    model = convert(block(), method="hosvd", rank=ranks, layers=list(LINEARS), example_input=x)
    assert [g.names for g in input_groups(model)] == [("q", "v"), ("gate", "up")]

    class TwoConvs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 1, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x).mean() + self.b(x).mean()

    image = torch.randn(2, 3, 6, 6)
    filtered = convert(TwoConvs(), method="gradient_filter", example_input=image)
    assert input_groups(filtered) == []  # its kept form depends on each conv's stride
    tucker = convert(TwoConvs(), method="hosvd", rank=0.9, example_input=image)
    assert [g.names for g in input_groups(tucker)] == [("a", "b")]


def test_reconvert_dissolves_and_restore_drops_the_groups() -> None:
    x = batch()
    plain = block()
    model = convert(copy.deepcopy(plain), method="asi", layers=list(LINEARS), example_input=x)
    convert(model, method="hosvd", rank=0.9, layers=["q"])
    assert [g.names for g in input_groups(model)] == [("gate", "up")]
    assert model.k.shared_input is None and model.v.shared_input is None
    restore(model)
    assert compressed_layers(model) == {}
    assert all(not hasattr(m, "shared_input") for m in model.modules())
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_state_dict_loads_both_ways_and_the_model_copies() -> None:
    x = batch()
    model = convert(block(), method="asi", rank=full_ranks("asi"), example_input=x)
    step(model, x)  # the group remembers this step's input
    plain = Block().double()
    plain.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(plain.state_dict(), strict=True)
    for clone in (copy.deepcopy(model), torch.load(_saved(model), weights_only=False)):
        group = clone.q.shared_input
        assert group is not None and group.members == (clone.q, clone.k, clone.v)
        assert clone.q.last_result is not None  # the warm start came along
        assert_same_grads(step(clone, batch(2)), step(copy.deepcopy(model), batch(2)))


def _saved(model: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


# ---------------------------------------------------------------------------
# Exactness, decompositions and memory
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["asi", "hosvd", "svd"])
def test_full_rank_gradients_are_vanillas_with_one_decomposition_per_input(
    method: str, decompositions: list[str]
) -> None:
    vanilla = block()
    model = convert(block(), method=method, rank=full_ranks(method), example_input=batch())
    for seed in (1, 2):  # ASI: the cold start, then a warm step from the group's state
        decompositions.clear()
        assert_same_grads(step(model, batch(seed)), step(vanilla, batch(seed)))
        assert decompositions == ["q", "o", "gate", "down"]  # 4 inputs, not 7 layers
        assert model.q.last_result is model.k.last_result is model.v.last_result
        assert model.gate.last_result is model.up.last_result


def test_without_sharing_every_layer_decomposes(decompositions: list[str]) -> None:
    model = convert(block(), method="asi", rank=full_ranks("asi"), share_inputs=False)
    step(model, batch())
    assert decompositions == list(LINEARS)


def test_shared_factors_are_kept_once() -> None:
    x = batch()
    # Below full rank: at full rank the core is the input itself (nothing to share but it).
    shared = convert(block(), method="hosvd", rank=(2, 3, 4), example_input=x)
    alone = convert(block(), method="hosvd", rank=(2, 3, 4), share_inputs=False)
    a, b = (activation_memory(m, x, layers=list(LINEARS)) for m in (shared, alone))
    # Per layer nothing changes: each layer keeps (and is charged for) its input's factors.
    assert [layer.measured_bytes for layer in a.layers] == [l.measured_bytes for l in b.layers]
    assert all(layer.measured_bytes == layer.analytic_bytes for layer in a.layers)
    # But the q/k/v and gate/up factors are one storage each: memory holds them once.
    qkv, gate_up = a["q"].measured_bytes, a["gate"].measured_bytes
    assert b.shared_bytes == 0
    assert a.shared_bytes == 2 * qkv + gate_up
    distinct = sum(a[name].measured_bytes for name in ("q", "o", "gate", "down"))
    assert a.kept_bytes - a.shared_bytes == distinct
    assert a.total_bytes == b.total_bytes - (2 * qkv + gate_up)


# ---------------------------------------------------------------------------
# Modes, frozen layers, no_grad, autocast, in-place changes
# ---------------------------------------------------------------------------


def test_members_in_different_modes_or_frozen(decompositions: list[str]) -> None:
    vanilla = block()
    model = convert(block(), method="asi", rank=full_ranks("asi"), example_input=batch())
    # The leader in eval mode (plain forward), the others training: k decomposes for the group.
    for m in (vanilla, model):
        m.q.eval()
    assert_same_grads(step(model, batch()), step(vanilla, batch()))
    assert decompositions == ["q", "o", "gate", "down"]  # by the leader, for k and v
    assert model.k.last_result is model.v.last_result is model.q.last_result
    # A frozen member: no weight gradient, the others still exact.
    for m in (vanilla, model):
        m.train()
        m.k.weight.requires_grad_(False)
    decompositions.clear()
    got = step(model, batch(2))
    assert got["k.weight"] is None
    assert_same_grads(got, step(vanilla, batch(2)))
    assert decompositions == ["q", "o", "gate", "down"]


def test_no_grad_and_eval_decompose_nothing(decompositions: list[str]) -> None:
    vanilla = block()
    model = convert(block(), method="asi", rank=0.9, example_input=batch())
    with torch.no_grad():
        torch.testing.assert_close(model(batch()), vanilla(batch()), rtol=0, atol=0)
    model.eval()
    out = model(batch().requires_grad_(True))
    out.sum().backward()
    assert decompositions == []
    assert all(m.last_result is None for m in compressed_layers(model).values())


class ReadTwice(nn.Module):
    """Two Linears reading ``h``; ``change`` modifies it in place between them."""

    def __init__(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(D, D).double(), nn.Linear(D, D).double()
        self.change = change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 1.0
        a = self.q(h)
        return a.square().sum() + self.k(self.change(h)).square().sum()


@pytest.mark.parametrize(
    ("change", "count"),
    [
        (lambda h: h, 1),  # the same tensor: decomposed once
        (lambda h: h.mul_(2.0), 2),  # modified in place: its version moved on
        (lambda h: h.clone(), 2),  # another tensor with equal values
        (lambda h: h.view(h.shape), 2),  # a view is another tensor object
    ],
    ids=["same", "in-place", "copy", "view"],
)
def test_a_changed_input_is_decomposed_again(
    change: Callable[[torch.Tensor], torch.Tensor], count: int, decompositions: list[str]
) -> None:
    torch.manual_seed(0)
    model = ReadTwice(change)
    # Below full rank (at full rank the kept core is the input itself, which an
    # in-place change would invalidate, as it would vanilla autograd's saved input).
    cfg = CompressionConfig(method="hosvd", rank=(B, T, D - 2))
    model.q = CompressedLinear.from_module(model.q, cfg, name="q")
    model.k = CompressedLinear.from_module(model.k, cfg, name="k")
    alone = copy.deepcopy(model)  # every layer decomposes its own input
    SharedInput([model.q, model.k])
    x = torch.randn(B, T, D, dtype=torch.float64)
    model(x).backward()
    assert len(decompositions) == count
    alone(x).backward()
    for name in ("q", "k"):
        got, expected = getattr(model, name).weight.grad, getattr(alone, name).weight.grad
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_autocast_shares_the_cast_input(decompositions: list[str]) -> None:
    torch.manual_seed(0)
    q, k = nn.Linear(D, D), nn.Linear(D, D)
    cfg = CompressionConfig(method="hosvd", rank=0.9)
    q, k = (CompressedLinear.from_module(m, cfg, name=n) for m, n in ((q, "q"), (k, "k")))
    SharedInput([q, k])
    x = torch.randn(B, T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (q(x).float().square().sum() + k(x).float().square().sum()).backward()
    assert decompositions == ["q"]
    assert q.last_result is k.last_result
    assert q.last_result is not None and q.last_result.core.dtype == torch.bfloat16
    assert q.weight.grad is not None and q.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------------------
# The group object
# ---------------------------------------------------------------------------


def test_reset_state_resets_the_whole_group() -> None:
    model = convert(block(), method="asi", rank=0.9, example_input=batch())
    step(model, batch())
    assert model.q.last_result is not None
    model.k.reset_state()
    assert all(m.last_result is None for m in (model.q, model.k, model.v))
    assert model.gate.last_result is not None  # another group
    group = model.q.shared_input
    assert group is not None
    group.dissolve()
    assert all(m.shared_input is None for m in (model.q, model.k, model.v))


def _linear(cfg: CompressionConfig, name: str) -> CompressedModule:
    return CompressedLinear.from_module(nn.Linear(D, D), cfg, name=name)


@pytest.mark.parametrize(
    ("layers", "error", "match"),
    [
        (lambda: [_linear(CompressionConfig(), "a")], ValueError, "at least two"),
        (lambda: [nn.Linear(2, 2), nn.Linear(2, 2)], TypeError, "compressed layers"),
        (
            lambda: [_linear(CompressionConfig(), "a"), _linear(CompressionConfig(rank=0.5), "b")],
            ValueError,
            "configured differently",
        ),
        (
            lambda: [
                _linear(CompressionConfig(), "a"),
                convert(nn.Conv2d(2, 2, 1), method="asi"),
            ],
            ValueError,
            "different types",
        ),
        (
            lambda: [_linear(CompressionConfig(method="vanilla"), n) for n in "ab"],
            ValueError,
            "not shared",
        ),
    ],
    ids=["one", "plain", "configs", "types", "vanilla"],
)
def test_bad_groups_are_refused(
    layers: Callable[[], list[Any]], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        SharedInput(layers())


def test_a_layer_joins_one_group() -> None:
    a, b, c = (_linear(CompressionConfig(), name) for name in "abc")
    SharedInput([a, b])
    with pytest.raises(ValueError, match=r"\['b'\] are already in a group"):
        SharedInput([b, c])
    with pytest.raises(ValueError, match="given twice"):
        SharedInput([c, c])
