"""training_memory: weights, gradients, optimizer state, saved activations and the step's peak."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from tensorcompress.models import vit_tiny
from tensorcompress.torch import convert, last_blocks
from tensorcompress.torch.measure import TrainingMemory, activation_memory, training_memory
from tensorcompress.torch.measure.training import KINDS, _Alloc, _group, module_kind
from tensorcompress.torch.transformer import prepare

pytestmark = pytest.mark.usefixtures("single_thread")

F32 = 4


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )


def small_vit(layers: int = 3) -> nn.Module:
    """Hidden 32, 2 heads, MLP 64, 16x16 images in 4x4 patches: 17 tokens."""
    torch.manual_seed(0)
    return vit_tiny(
        num_classes=5,
        image_size=16,
        num_layers=layers,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        attn_implementation="eager",
    )


def vit_batch(batch: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.randn(batch, 3, 16, 16, generator=g),
        "labels": torch.randint(0, 5, (batch,), generator=g),
    }


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def numel(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def freeze_first(model: nn.Sequential, n: int) -> None:
    for layer in list(model)[:n]:
        for p in layer.parameters():
            p.requires_grad_(False)


# ---------------------------------------------------------------------------
# The state: weights, gradients, optimizer, by the formula
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_cnn_state_equals_the_formula(opt_name: str) -> None:
    model = small_cnn()
    freeze_first(model, 2)  # the first conv and its BatchNorm stay frozen
    params = trainable(model)
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        expected_opt = numel(params) * F32  # one momentum buffer per parameter
    else:
        opt = torch.optim.AdamW(params, lr=1e-3)
        # exp_avg and exp_avg_sq per parameter, and a float32 step counter per tensor
        expected_opt = 2 * numel(params) * F32 + len(params) * F32
    x = torch.randn(4, 3, 16, 16)
    mem = training_memory(model, x, opt)
    assert mem.weights_bytes == numel(list(model.parameters())) * F32
    assert mem.buffers_bytes == sum(b.numel() * b.element_size() for b in model.buffers())
    assert mem.gradients_bytes == numel(params) * F32
    assert mem.optimizer_bytes == expected_opt
    assert mem.optimizer == type(opt).__name__
    assert mem.peak_bytes == (
        mem.weights_bytes
        + mem.buffers_bytes
        + mem.gradients_bytes
        + mem.optimizer_bytes
        + mem.peak_activation_bytes
    )


def test_vit_state_equals_the_formula() -> None:
    model = small_vit()
    example = vit_batch()
    model = prepare(model, "vanilla", 2, example_input=example)
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-3)
    mem = training_memory(model, example, opt)
    assert mem.weights_bytes == numel(list(model.parameters())) * F32
    assert mem.gradients_bytes == numel(params) * F32
    assert mem.optimizer_bytes == 2 * numel(params) * F32 + len(params) * F32


# ---------------------------------------------------------------------------
# Activations: activation_memory's figure, split by kind; the peak
# ---------------------------------------------------------------------------


def test_cnn_activations_equal_activation_memory() -> None:
    model = small_cnn()
    freeze_first(model, 2)
    x = torch.randn(4, 3, 16, 16)
    opt = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.9)
    mem = training_memory(model, x, opt)
    report = activation_memory(model, x, layers=["3", "6"])
    assert mem.activations_bytes == report.total_bytes > 0
    assert [layer.name for layer in mem.saved.layers] == ["3", "6"]  # the trainable layers
    assert mem.kept_bytes == report.kept_bytes
    assert sum(b for _, b in mem.activations_by_kind) == mem.activations_bytes
    # conv 3 keeps the ReLU's output (8x16x16 per image), the Linear its flattened input;
    # BatchNorm is frozen (eval statistics are not used: it still normalises in train mode)
    assert mem.kind_bytes("layer_input") == 4 * 8 * 16 * 16 * F32 + 4 * 16 * 8 * 8 * F32
    assert mem.peak_activation_bytes >= mem.activations_bytes


def test_vit_activations_by_kind() -> None:
    model = small_vit()
    example = vit_batch()
    model = prepare(model, "vanilla", 2, example_input=example)
    opt = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.9)
    mem = training_memory(model, example, opt)
    report = activation_memory(model, example, layers=lambda m, n: m.weight.requires_grad)
    assert mem.activations_bytes == report.total_bytes
    kinds = dict(mem.activations_by_kind)
    assert list(kinds) == list(KINDS)
    assert sum(kinds.values()) == mem.activations_bytes
    tokens, hidden, mlp, heads = 17, 32, 64, 2
    # Per block: the GELU keeps its input; eager attention keeps q, k, v copies and the
    # probabilities (softmax and the second matmul share them: counted once).
    assert kinds["activation"] == 2 * 8 * tokens * mlp * F32
    assert kinds["attention"] == 2 * 8 * (3 * tokens * hidden + heads * tokens * tokens) * F32
    assert kinds["norm"] > 0 and kinds["layer_input"] > 0
    assert kinds["compressed"] == 0
    assert mem.peak_activation_bytes >= mem.activations_bytes


def test_compressed_layers_are_their_own_kind() -> None:
    model = small_vit()
    example = vit_batch()
    model = prepare(model, "asi", 2, example_input=example)
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    mem = training_memory(model, example, opt)
    assert mem.kind_bytes("compressed") > 0
    assert (
        mem.activations_bytes
        == activation_memory(model, example, layers=lambda m, n: m.weight.requires_grad).total_bytes
    )


def test_peak_decreases_under_checkpointing() -> None:
    example = vit_batch(16)
    peaks = {}
    for method in ("vanilla", "checkpoint"):
        model = prepare(small_vit(4), method, 3, example_input=example)
        opt = torch.optim.SGD(trainable(model), lr=0.1)
        mem = training_memory(model, example, opt)
        peaks[method] = mem
    assert peaks["checkpoint"].peak_activation_bytes < peaks["vanilla"].peak_activation_bytes
    assert peaks["checkpoint"].activations_bytes < peaks["vanilla"].activations_bytes
    # Same parameters train: the state is the same.
    assert peaks["checkpoint"].state_bytes == peaks["vanilla"].state_bytes


# ---------------------------------------------------------------------------
# What is live at the peak
# ---------------------------------------------------------------------------


def test_live_at_peak_adds_up_and_names_the_savers() -> None:
    model = small_vit()
    example = vit_batch()
    model = prepare(model, "vanilla", 2, example_input=example)
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    mem = training_memory(model, example, opt)
    live = mem.live_at_peak
    assert live and sum(g.nbytes for g in live) == mem.attributed_peak_bytes
    assert [g.nbytes for g in live] == sorted((g.nbytes for g in live), reverse=True)
    saved = [g for g in live if g.phase == "saved"]
    assert {g.kind for g in saved} >= {"attention", "activation", "norm", "layer_input"}
    assert any(g.where == "vit.layers.2.mlp.activation_fn" for g in saved)
    assert {g.phase for g in live} <= {"saved", "forward", "backward"}
    # The two passes run the same step.
    assert math.isclose(mem.attributed_peak_bytes, mem.peak_activation_bytes, rel_tol=0.1)
    assert "live at the peak" in mem.format()


def test_a_reused_address_is_not_taken_for_a_saved_tensor() -> None:
    # A forward temporary freed before a saved tensor took its address is "forward".
    temp = _Alloc(1, 100, 8, ("aten::mul",))
    kept = _Alloc(3, 100, 8, ("aten::add",))
    saved = {100: ("activation", "act")}
    (group,) = _group({100: temp}, saved, {100: kept}, backward_start=5)
    assert (group.phase, group.kind) == ("forward", "aten::mul")
    (group,) = _group({100: kept}, saved, {100: kept}, backward_start=5)
    assert (group.phase, group.kind, group.where) == ("saved", "activation", "act")


def test_attribute_false_skips_the_pass() -> None:
    model = small_cnn()
    mem = training_memory(model, torch.randn(2, 3, 16, 16), torch.optim.SGD(model.parameters()))
    assert mem.live_at_peak and mem.attributed_peak_bytes > 0
    mem = training_memory(
        model, torch.randn(2, 3, 16, 16), torch.optim.SGD(model.parameters()), attribute=False
    )
    assert mem.live_at_peak == () and mem.attributed_peak_bytes == 0


# ---------------------------------------------------------------------------
# No side effects; options
# ---------------------------------------------------------------------------


def test_the_step_is_undone() -> None:
    model = small_cnn()
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    rng = torch.get_rng_state()
    training_memory(model, x, opt)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())
    assert len(opt.state) == 0
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_existing_gradients_and_state_are_kept() -> None:
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3, 16, 16)
    model(x).sum().backward()
    opt.step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    momentum = {id(p): s["momentum_buffer"].clone() for p, s in opt.state.items()}
    training_memory(model, x, opt)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(s["momentum_buffer"], momentum[id(p)]) for p, s in opt.state.items())


def test_loss_fn_and_layers() -> None:
    model = small_cnn()
    x = torch.randn(4, 3, 16, 16)
    labels = torch.randint(0, 10, (4,))
    seen: list[Any] = []

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        seen.append(out.shape)
        return nn.functional.cross_entropy(out, labels)

    mem = training_memory(
        model, x, torch.optim.SGD(model.parameters()), loss_fn=loss_fn, layers=["6"]
    )
    assert seen and all(s == (4, 10) for s in seen)
    assert [layer.name for layer in mem.saved.layers] == ["6"]
    assert isinstance(mem, TrainingMemory)
    assert mem.to_dict()["peak_mb"] == mem.peak_bytes / 2**20


def test_module_kinds() -> None:
    model = convert(small_vit(), method="asi", rank=0.9, layers=last_blocks(1))
    block = model.vit.layers[2]
    assert module_kind(block.attention.q_proj) == "compressed"
    assert module_kind(model.vit.layers[0].attention.q_proj) == "layer_input"
    assert module_kind(block.attention) == "attention"
    assert module_kind(block.layernorm_before) == "norm"
    assert module_kind(block.mlp.activation_fn) == "activation"
    assert module_kind(nn.MultiheadAttention(4, 2)) == "attention"
    assert module_kind(nn.ReLU()) == "activation"
    assert module_kind(block) == "other"
    mem = TrainingMemory(1, 0, 1, 1, 0, tuple((k, 0) for k in KINDS), 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        mem.kind_bytes("probabilities")
