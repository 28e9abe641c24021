"""torch.transformer: the block methods (checkpointing, LoRA, LoRA+ASI, ASI) and options.

Exact options (checkpointing, recomputation, SDPA) are checked against
vanilla autograd in float64; the int8 saved form against its error bound.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from tensorcompress.models import tiny_llama, vit_tiny
from tensorcompress.torch import CompressedLinear, compressed_layers, last_blocks
from tensorcompress.torch.budget import output_grams
from tensorcompress.torch.lowrank import output_basis
from tensorcompress.torch.measure import activation_memory, track_memory
from tensorcompress.torch.selection import select_layers
from tensorcompress.torch.transformer import (
    METHODS,
    BlockOptions,
    Int8Saved,
    block_names,
    dequantize_int8,
    fused_mlps,
    int8_activations,
    norm_fed_linears,
    prepare,
    quantize_int8,
    restore_blocks,
    share_norm_inputs,
)
from tensorcompress.torch.wasi import WASIConfig, WASILinear, wasi_layers

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    # PEFT asks transformers a deprecated question; not ours.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

BATCH, TOKENS, HEADS = 4, 17, 2


def small_vit(dtype: torch.dtype = torch.float64, attn: str = "eager") -> nn.Module:
    """3 blocks, hidden 32, 2 heads, MLP 64, 16x16 images in 4x4 patches: 17 tokens."""
    torch.manual_seed(0)
    model = vit_tiny(
        num_classes=5,
        image_size=16,
        num_layers=3,
        hidden_size=32,
        num_attention_heads=HEADS,
        intermediate_size=64,
        attn_implementation=attn,
    )
    return model.to(dtype)


def vit_batch(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g).to(dtype)}


def small_llama() -> nn.Module:
    torch.manual_seed(0)
    model = tiny_llama(
        num_layers=2,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    return model.double()


def llama_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"inputs_embeds": torch.randn(BATCH, 12, 32, generator=g, dtype=torch.float64)}


def encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.Sequential(
        nn.TransformerEncoder(layer, 3, enable_nested_tensor=False), nn.Linear(16, 3)
    )


def logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def grads(model: nn.Module, example: Any) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(**example) if isinstance(example, dict) else model(example)
    logits(out).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def saved_shapes(model: nn.Module, example: Any) -> list[tuple[tuple[int, ...], torch.dtype]]:
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**example)
    return shapes


def total_rel_err(got: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    """The relative error of all gradients together (the same parameters in both)."""
    assert got.keys() == exact.keys()
    names = sorted(exact)
    return rel_err(
        torch.cat([got[n].ravel() for n in names]), torch.cat([exact[n].ravel() for n in names])
    )


def trains_close_and_restores(
    model: nn.Module, plain: nn.Module, exact: dict[str, torch.Tensor], example: Any
) -> None:
    """An int8-approximate step of a prepared model, its names, and its undo."""
    assert 0 < total_rel_err(grads(model, example), exact) < 0.02
    assert model.state_dict().keys() == plain.state_dict().keys()
    restore_blocks(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def trains(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------
# What trains, per method
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["vanilla", "checkpoint", "asi", "hosvd", "svd"])
def test_the_blocks_and_the_head_train(method: str) -> None:
    example = vit_batch()
    model = prepare(small_vit(), method, 2, example_input=example)
    names = trains(model)
    assert names and all(
        n.startswith(("vit.layers.1.", "vit.layers.2.", "vit.layernorm.", "classifier."))
        for n in names
    )
    assert "vit.layers.1.layernorm_before.weight" in names  # runs before the block's Linears
    assert "classifier.weight" in names
    layers = compressed_layers(model)
    if method in ("asi", "hosvd", "svd"):
        assert sorted(layers) == sorted(n for n in block_layers(model, (1, 2)))
        assert all(m.compression.method == method for m in layers.values())
    else:
        assert not layers


def block_layers(model: nn.Module, blocks: tuple[int, ...]) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(n.startswith(f"vit.layers.{b}.") for b in blocks)
    ]


@pytest.mark.parametrize("method", ["wsi", "wasi"])
def test_factored_methods_train_the_factors_and_int8_leaves_their_inputs(method: str) -> None:
    from tensorcompress.torch.measure.training import module_kind

    example = vit_batch(torch.float32)
    reference = small_vit(torch.float32)
    linears = block_layers(reference, (1, 2))
    opts = BlockOptions(saved="int8", int8_min_bytes=0, weight_rank=32)  # full rank
    model = prepare(small_vit(torch.float32), method, 2, example_input=example, options=opts)
    layers = wasi_layers(model)
    assert sorted(layers) == sorted(linears)
    assert {module_kind(m) for m in layers.values()} == {
        "compressed" if method == "wasi" else "layer_input"
    }
    names = trains(model)
    assert "vit.layers.1.attention.q_proj.left" in names and "classifier.weight" in names
    assert not any(n.endswith("q_proj.weight") for n in names)
    # The other tensors are int8; the layers' own saves (the inputs, their factors) are not.
    shapes = saved_shapes(model, example)
    assert any(dtype == torch.int8 for _, dtype in shapes)
    if method == "wsi":  # the exact input of every factored layer is saved as float
        saved = {shape for shape, dtype in shapes if dtype == torch.float32}
        assert (BATCH, TOKENS, 32) in saved and (BATCH, TOKENS, 64) in saved
    for name, m in layers.items():
        w = dict(reference.named_modules())[name].weight
        torch.testing.assert_close(m.left @ m.right, w, atol=1e-4, rtol=0)  # full rank


@pytest.mark.parametrize("method", ["lora", "lora+asi"])
def test_lora_trains_the_adapters_and_the_head(method: str) -> None:
    example = vit_batch()
    model = prepare(small_vit(), method, 2, example_input=example)
    names = trains(model)
    adapters = [n for n in names if ".lora_A." in n or ".lora_B." in n]
    assert len(adapters) == 2 * 6 * 2  # 2 blocks, 6 Linears, A and B
    assert all(".layers.1." in n or ".layers.2." in n for n in adapters)
    rest = set(names) - set(adapters)
    assert rest and all("modules_to_save" in n for n in rest)  # the final norm and classifier
    lora_a = {n: m for n, m in model.named_modules() if n.endswith(".lora_A.default")}
    assert len(lora_a) == 12
    compressed = [isinstance(m, CompressedLinear) for m in lora_a.values()]
    assert all(compressed) if method == "lora+asi" else not any(compressed)
    grads(model, example)  # trains


def test_lora_asi_at_full_rank_equals_lora() -> None:
    example = vit_batch()
    lora = prepare(small_vit(), "lora", 2, example_input=example)
    both = prepare(
        small_vit(), "lora+asi", 2, example_input=example, options=BlockOptions(rank=1.0)
    )
    # PEFT initialises lora_B to zero, so lora_A's gradient would be zero: perturb B.
    for model in (lora, both):
        torch.manual_seed(3)
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.data.normal_()
    g_lora, g_both = grads(lora, example), grads(both, example)
    assert g_lora.keys() == g_both.keys()
    for name in g_lora:
        torch.testing.assert_close(g_both[name], g_lora[name], rtol=1e-8, atol=1e-10)
    # In each block the q/k/v lora_A layers read the same normalised input: one shared
    # decomposition per block.
    groups = {id(m.shared_input) for m in compressed_layers(both).values() if m.shared_input}
    assert len(groups) == 2


# ---------------------------------------------------------------------------
# Exact options: checkpointing, recomputation, SDPA
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["vit", "llama", "encoder"])
def test_checkpoint_is_exact_and_keeps_only_block_inputs(case: str) -> None:
    build: Any
    example: Any
    if case == "vit":
        build, example = small_vit, vit_batch()
    elif case == "llama":  # with a key/value cache, a block run twice would fill it twice
        build, example = small_llama, llama_batch()
    else:
        build, example = (
            (lambda: encoder().double()),
            torch.randn(BATCH, 7, 16, dtype=torch.float64),
        )
    vanilla = prepare(build(), "vanilla", 2, example_input=example)
    ckpt = prepare(build(), "checkpoint", 2, example_input=example)
    g_vanilla, g_ckpt = grads(vanilla, example), grads(ckpt, example)
    assert g_vanilla.keys() == g_ckpt.keys()
    for name in g_vanilla:
        torch.testing.assert_close(g_ckpt[name], g_vanilla[name], rtol=0, atol=0)
    layers = lambda m, n: m.weight.requires_grad  # noqa: E731
    saved_vanilla = activation_memory(vanilla, example, layers=layers).total_bytes
    saved_ckpt = activation_memory(ckpt, example, layers=layers).total_bytes
    assert saved_ckpt < saved_vanilla / 2
    restore_blocks(ckpt)
    assert activation_memory(ckpt, example, layers=layers).total_bytes == saved_vanilla


def test_recompute_is_exact_and_drops_the_rmsnorm_copy() -> None:
    example = llama_batch()
    plain = prepare(small_llama(), "vanilla", 2, example_input=example)
    opts = BlockOptions(recompute=("norm", "activation"))
    recomputed = prepare(small_llama(), "vanilla", 2, example_input=example, options=opts)
    g_plain, g_rec = grads(plain, example), grads(recomputed, example)
    for name in g_plain:
        torch.testing.assert_close(g_rec[name], g_plain[name], rtol=0, atol=0)
    # float32, where RMSNorm's upcast is a no-op: it keeps its input x, rsqrt(var) and the
    # normalised x * rsqrt(var) for the weight; recomputed, it keeps x only.
    example = {k: v.float() for k, v in example.items()}
    plain, recomputed = plain.float(), recomputed.float()
    before, after = (saved_by_module(m, example) for m in (plain, recomputed))
    x, row = BATCH * 12 * 32 * 4, BATCH * 12 * 4
    for norm in ("model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm"):
        assert (before[norm], after[norm]) == (2 * x + row, x)
    # SiLU keeps only its input either way.
    assert after["model.layers.1.mlp.act_fn"] == before["model.layers.1.mlp.act_fn"] > 0


def saved_by_module(model: nn.Module, example: Any) -> dict[str, int]:
    report = activation_memory(model, example, layers=lambda m, n: m.weight.requires_grad)
    return dict(report.other_by_module)


def test_recompute_drops_only_the_layernorm_statistics() -> None:
    example = vit_batch(torch.float32)
    plain = prepare(small_vit(torch.float32), "vanilla", 2, example_input=example)
    opts = BlockOptions(recompute=("norm", "activation"))
    recomputed = prepare(
        small_vit(torch.float32), "vanilla", 2, example_input=example, options=opts
    )
    before, after = saved_by_module(plain, example), saved_by_module(recomputed, example)
    # nn.LayerNorm keeps its input and two statistics per row; the GELU its input.
    x, row = BATCH * TOKENS * 32 * 4, BATCH * TOKENS * 4
    assert (before["vit.layers.2.layernorm_after"], after["vit.layers.2.layernorm_after"]) == (
        x + 2 * row,
        x,
    )
    gelu = "vit.layers.2.mlp.activation_fn"
    assert before[gelu] == after[gelu] == BATCH * TOKENS * 64 * 4


def test_sdpa_keeps_no_probabilities() -> None:
    example = vit_batch()
    eager = prepare(small_vit(), "vanilla", 2, example_input=example)
    sdpa = prepare(small_vit(), "vanilla", 2, example_input=example, options=BlockOptions("sdpa"))
    assert sdpa.config._attn_implementation == "sdpa"
    probabilities = (BATCH, HEADS, TOKENS, TOKENS)
    assert sum(s == probabilities for s, _ in saved_shapes(eager, example)) == 2
    assert all(s != probabilities for s, _ in saved_shapes(sdpa, example))
    g_eager, g_sdpa = grads(eager, example), grads(sdpa, example)
    # The same function (torch's CPU kernel evaluates its exponentials to about 1e-8 in
    # float64); the key bias's gradient is zero in theory and round-off in both.
    for name in g_eager:
        if not name.endswith("k_proj.bias"):
            assert rel_err(g_sdpa[name], g_eager[name]) < 1e-6, name


# ---------------------------------------------------------------------------
# The int8 saved form
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 17, 32), (3, 5), (1000,)])
def test_int8_round_trip_is_within_half_a_step(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])
    q, scale = quantize_int8(x, 64)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.numel() == math.ceil(x.numel() / 64) * 64
    y = dequantize_int8(q, scale, x.shape, x.dtype)
    assert y.shape == x.shape and y.dtype == x.dtype
    flat = nn.functional.pad(x.reshape(-1), (0, q.numel() - x.numel())).view(-1, 64)
    bound = flat.abs().amax(1, keepdim=True) / 254 * (1 + 1e-5)
    err = nn.functional.pad((y - x).reshape(-1), (0, q.numel() - x.numel())).view(-1, 64)
    assert bool((err.abs() <= bound).all())
    zeros = dequantize_int8(*quantize_int8(torch.zeros(70), 64), (70,), torch.float32)
    assert torch.equal(zeros, torch.zeros(70))


def test_int8_keeps_the_other_tensors_small_and_layer_inputs_exact() -> None:
    example = vit_batch(torch.float32)
    model_exact = prepare(small_vit(torch.float32), "vanilla", 2, example_input=example)
    opts = BlockOptions(saved="int8", int8_min_bytes=0)
    model_int8 = prepare(
        small_vit(torch.float32), "vanilla", 2, example_input=example, options=opts
    )
    shapes = saved_shapes(model_int8, example)
    assert any(dtype == torch.int8 for _, dtype in shapes)
    layers = lambda m, n: m.weight.requires_grad  # noqa: E731
    exact = activation_memory(model_exact, example, layers=layers)
    small = activation_memory(model_int8, example, layers=layers)
    # Linear inputs are kept as they are; the rest shrinks to about a quarter.
    assert small.kept_bytes == exact.kept_bytes
    assert small.other_bytes < 0.35 * exact.other_bytes
    g_exact, g_int8 = grads(model_exact, example), grads(model_int8, example)
    # The classifier keeps its (exact) input; the final norm's input is int8 too.
    for name in ("classifier.weight", "classifier.bias"):
        torch.testing.assert_close(g_int8[name], g_exact[name], rtol=0, atol=0)
    assert 0 < rel_err(g_int8["vit.layernorm.weight"], g_exact["vit.layernorm.weight"]) < 0.02
    block = [n for n in g_exact if n.startswith("vit.layers.")]
    error = rel_err(
        torch.cat([g_int8[n].ravel() for n in block]),
        torch.cat([g_exact[n].ravel() for n in block]),
    )
    assert 0 < error < 0.02  # approximate, and close


def test_int8_composes_with_asi_and_restores() -> None:
    example = vit_batch(torch.float32)
    opts = BlockOptions(attention="sdpa", saved="int8", int8_min_bytes=0)
    model = prepare(small_vit(torch.float32), "asi", 2, example_input=example, options=opts)
    assert any(dtype == torch.int8 for _, dtype in saved_shapes(model, example))
    grads(model, example)
    restore_blocks(model)
    assert not any(dtype == torch.int8 for _, dtype in saved_shapes(model, example))
    assert compressed_layers(model)  # restore_blocks leaves the compressed layers


@pytest.mark.parametrize(
    "act",
    [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.ReLU(), nn.Mish(), nn.ELU()],
    ids=str,
)
def test_int8_activation_exact_forward_and_the_gradient_at_the_dequantized_input(
    act: nn.Module,
) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, 40, generator=g, requires_grad=True)
    grad = torch.randn(3, 70, 40, generator=g)
    reference = type(act)(**({"approximate": act.approximate} if isinstance(act, nn.GELU) else {}))
    assert int8_activations([act, nn.Softmax(-1), nn.PReLU(), nn.Linear(2, 2)]) == [act]
    # GELU, SiLU and ReLU run aten's in-place kernels; the others autograd, in chunks.
    want_kernel = {nn.GELU: "gelu", nn.SiLU: "silu", nn.ReLU: "relu"}.get(type(act))
    if isinstance(act, nn.GELU) and act.approximate == "tanh":
        want_kernel = "gelu_tanh"
    assert act._int8_kernel == want_kernel
    y = act(x)
    torch.testing.assert_close(y, reference(x), rtol=0, atol=0)  # the forward is exact
    (got,) = torch.autograd.grad(y, x, grad)
    # What the saved-tensor hook path gives: the derivative at the dequantized input.
    x_hat = dequantize_int8(*quantize_int8(x.detach(), 64), x.shape, x.dtype).requires_grad_()
    (want,) = torch.autograd.grad(reference(x_hat), x_hat, grad)
    torch.testing.assert_close(got, want)
    twin = copy.deepcopy(act)  # a copy runs its own forward, not the original's
    twin.eval()
    assert act.training and "Int8" not in type(twin(x).grad_fn).__name__
    act.eval()  # evaluation keeps nothing: the module's own forward
    assert act(x).grad_fn is not None and "Int8" not in type(act(x).grad_fn).__name__


def test_int8_activation_backward_holds_one_float_tensor_besides_the_gradient() -> None:
    n = 1 << 22
    x = torch.randn(n, requires_grad=True)
    grad = torch.randn(n)
    act = nn.GELU()
    int8_activations([act])
    y = act(x)
    _, mem = track_memory(lambda: torch.autograd.grad(y, x, grad), "cpu")
    # The result (4n bytes) and a few chunk-sized temporaries; the saved-tensor hook
    # path holds the dequantized input and the result (8n bytes).
    assert mem.peak_bytes < 4 * n + 4 * (1 << 18) * 4 < 8 * n


def test_int8_activation_in_place_writes_the_output_over_its_input() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1 << 20, generator=g, requires_grad=True)
    grad = torch.randn(1 << 20, generator=g)
    copied, in_place = nn.GELU(), nn.GELU()
    int8_activations([copied])
    int8_activations([in_place], in_place=True)
    h = x * 2  # a non-leaf input, as a Linear's output
    want = copied(h)
    got = in_place(h)
    assert got.data_ptr() == h.data_ptr()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The same gradient: the int8 copy of the input was taken before the overwrite.
    (got_grad,) = torch.autograd.grad(got, x, grad, retain_graph=True)
    torch.testing.assert_close(got_grad, torch.autograd.grad(want, x, grad)[0])
    # In place, the forward holds the int8 copy (a quarter of the input's bytes)
    # and chunk-sized temporaries: less than the full-size float output a copy needs.
    peaks = []
    for act in (in_place, copied):
        h = x * 2
        _, mem = track_memory(lambda act=act, h=h: act(h), "cpu")
        peaks.append(mem.peak_bytes)
    n_bytes = 4 * x.numel()
    assert peaks[0] < n_bytes <= peaks[1] - n_bytes // 4
    with pytest.raises(RuntimeError, match="leaf"):
        in_place(x)  # autograd refuses to overwrite a leaf


def test_in_place_activations_where_the_mlp_reads_its_input_once() -> None:
    example = vit_batch(torch.float32)
    for option, want in ((None, True), (False, False)):
        model = prepare(
            small_vit(torch.float32),
            "asi",
            2,
            example_input=example,
            options=BlockOptions(saved="int8", in_place_activations=option),
        )
        acts = [m for m in model.modules() if "forward" in m.__dict__]
        assert acts and all(m._int8_in_place is want for m in acts)
    with pytest.raises(ValueError, match="saved='int8' only"):
        BlockOptions(in_place_activations=True)


def test_int8_activation_errors_and_restore() -> None:
    with pytest.raises(ValueError, match="recompute='activation' does not combine"):
        BlockOptions(saved="int8", recompute=("activation",))
    act = nn.GELU()
    int8_activations([act])
    with pytest.raises(ValueError, match="own forward"):
        int8_activations([act])
    example = vit_batch(torch.float32)
    model = prepare(
        small_vit(torch.float32),
        "asi",
        2,
        example_input=example,
        options=BlockOptions(saved="int8"),
    )
    acts = [m for m in model.modules() if "forward" in m.__dict__]
    assert acts and all("Activation" in type(m).__name__ for m in acts)
    restore_blocks(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("activation", ["model's", "mish"])
@pytest.mark.parametrize("second", ["dense", "factored"])
def test_fused_mlp_is_exact_forward_and_rebuilds_the_activation_from_int8(
    activation: str, second: str
) -> None:
    model = small_vit(torch.float32)
    mlp = model.vit.layers[0].mlp
    if activation == "mish":  # no aten kernel: the derivative through autograd
        mlp.activation_fn = nn.Mish()
    if second == "factored":  # WASI's fc2: its factors' gradients, contracted by chunks
        mlp.fc2 = WASILinear.from_dense(mlp.fc2, 24, WASIConfig(method="wasi"), name="fc2")
    reference = copy.deepcopy(mlp)
    if second == "factored":
        reference.fc2 = reference.fc2.to_low_rank()  # its plain two products
    assert fused_mlps([mlp, model.vit.layers[0].layernorm_before]) == [mlp]
    # Hugging Face's GELUActivation is recognised as GELU.
    assert (mlp.activation_fn._int8_kernel is None) == (activation == "mish")
    g = torch.Generator().manual_seed(0)
    # 15000 rows of 64: several chunks.
    x = torch.randn(3, 5000, 32, generator=g, requires_grad=True)
    grad = torch.randn(3, 5000, 32, generator=g)
    y = mlp(x)
    torch.testing.assert_close(y, reference(x))  # the forward is exact
    got = torch.autograd.grad(y, (x, *mlp.parameters()), grad)
    # The reference: fc1 exact, the activation and fc2 on the dequantized fc1 output.
    h = reference.fc1(x)
    h_hat = dequantize_int8(*quantize_int8(h.detach(), 64), h.shape, h.dtype)
    y_hat = reference.fc2(reference.activation_fn(h + (h_hat - h).detach()))
    want = torch.autograd.grad(y_hat, (x, *reference.parameters()), grad)
    for a, b in zip(got, want, strict=True):
        # fc2's weight gradient sums 15000 rows chunk by chunk: float32 rounds
        # those sums in another order (3.6e-7 of its norm on an AMX machine's
        # BLAS), so the check is relative to the whole tensor.
        assert float((a - b).norm()) <= 1e-5 * float(b.norm())
    if second == "factored":
        assert mlp.fc2.act_ranks is None  # fc2 decomposed nothing, kept nothing of its own
    mlp.eval()  # evaluation runs the plain layers
    assert "Int8" not in type(mlp(x).grad_fn).__name__
    torch.testing.assert_close(mlp(x), reference(x), rtol=0, atol=0)


def test_fused_mlp_refreshes_a_stepped_factored_layer() -> None:
    mlp = small_vit(torch.float32).vit.layers[0].mlp
    mlp.fc2 = WASILinear.from_dense(mlp.fc2, 24, WASIConfig(method="wasi"), name="fc2")
    fused_mlps([mlp])
    with torch.no_grad():
        mlp.fc2.left.mul_(2.0)  # an optimizer step: L loses its orthonormal columns
    product = (mlp.fc2.left @ mlp.fc2.right).detach()
    mlp(torch.randn(2, 5, 32)).sum().backward()
    left = mlp.fc2.left.detach()
    torch.testing.assert_close(left.T @ left, torch.eye(24), atol=1e-5, rtol=0)
    torch.testing.assert_close((left @ mlp.fc2.right).detach(), product, atol=1e-5, rtol=1e-5)


def test_fused_gated_mlp_rebuilds_the_product_from_int8() -> None:
    model = small_llama().float()
    mlp = model.model.layers[0].mlp
    reference = copy.deepcopy(mlp)
    assert fused_mlps([mlp]) == [mlp]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3000, 32, generator=g, requires_grad=True)  # 9000 rows of 48
    grad = torch.randn(3, 3000, 32, generator=g)
    y = mlp(x)
    torch.testing.assert_close(y, reference(x))  # the forward is exact
    got = torch.autograd.grad(y, (x, *mlp.parameters()), grad)

    def rounded(t: torch.Tensor) -> torch.Tensor:  # t, valued at its int8 form
        t_hat = dequantize_int8(*quantize_int8(t.detach(), 64), t.shape, t.dtype)
        return t + (t_hat - t).detach()

    gate, up = rounded(reference.gate_proj(x)), rounded(reference.up_proj(x))
    y_hat = reference.down_proj(reference.act_fn(gate) * up)
    want = torch.autograd.grad(y_hat, (x, *reference.parameters()), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    mlp.eval()
    torch.testing.assert_close(mlp(x), reference(x), rtol=0, atol=0)


def test_fused_mlp_backward_holds_one_mlp_wide_float_tensor() -> None:
    mlp = small_vit(torch.float32).vit.layers[0].mlp
    fused_mlps([mlp])
    h = torch.randn(4, 16384, 64, requires_grad=True)  # fc1's output
    y = mlp.activation_fn(h, mlp.fc2)  # the fused activation and fc2
    grad = torch.randn_like(y)
    n_bytes = 4 * h.numel()
    _, mem = track_memory(lambda: torch.autograd.grad(y, h, grad), "cpu")
    # The input gradient of fc1's output and chunk-sized temporaries; unfused, the
    # activation's output gradient and its dequantized input are both whole.
    assert mem.peak_bytes < n_bytes + 8 * 2**20 < 2 * n_bytes


def test_fused_factored_second_layer_forward_holds_one_chunk_of_its_product() -> None:
    mlp = small_vit(torch.float32).vit.layers[0].mlp
    mlp.fc2 = WASILinear.from_dense(mlp.fc2, 24, WASIConfig(method="wasi"), name="fc2")
    fused_mlps([mlp])
    h = torch.randn(4, 16384, 64, requires_grad=True)  # fc1's output, 65536 rows
    y, mem = track_memory(lambda: mlp.activation_fn(h, mlp.fc2), "cpu")
    # h's int8 form (1 byte and 1/16 of a scale per element) and the output; a
    # whole h R^T beside them would add 65536 * 24 * 4 bytes = 6 MiB.
    assert mem.peak_bytes < 1.1 * h.numel() + 4 * y.numel() + 2**20


def test_fused_mlp_in_prepare_leaves_the_second_linear_uncompressed() -> None:
    example = vit_batch(torch.float32)
    plain = small_vit(torch.float32)
    exact = grads(prepare(copy.deepcopy(plain), "vanilla", 2, example_input=example), example)
    opts = BlockOptions(attention="sdpa", saved="int8", fused_mlp=True, rank=1.0)
    model = prepare(copy.deepcopy(plain), "asi", 2, example_input=example, options=opts)
    for i in (1, 2):
        mlp = model.vit.layers[i].mlp
        assert type(mlp.fc2) is nn.Linear and isinstance(mlp.fc1, CompressedLinear)
    assert "forward" not in model.vit.layers[0].mlp.__dict__  # a frozen block
    # No float tensor of the MLP's width is saved (fc2's weight aside).
    wide = BATCH * TOKENS * 64
    saved = saved_shapes(model, example)
    assert not [s for s, dtype in saved if math.prod(s) >= wide and dtype != torch.int8]
    trains_close_and_restores(model, plain, exact, example)


def test_a_prepared_model_saves_and_loads_whole() -> None:
    example = vit_batch(torch.float32)
    opts = BlockOptions(attention="sdpa", saved="int8", fused_mlp=True, norm_fed=True)
    model = prepare(small_vit(torch.float32), "asi", 2, example_input=example, options=opts)
    grads(model, example)  # a step first: ASI's state and the hooks' caches exist
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the int8 forms name their kernels: nothing unpicklable
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    g_model, g_loaded = grads(model, example), grads(loaded, example)
    assert g_loaded.keys() == g_model.keys()
    for name in g_model:  # the same warm step from the same state
        torch.testing.assert_close(g_loaded[name], g_model[name], rtol=1e-5, atol=1e-7)
    for m in (loaded, copy.deepcopy(model)):  # restore_blocks undoes a loaded or copied model
        assert any(dtype == torch.int8 for _, dtype in saved_shapes(m, example))
        restore_blocks(m)
        assert not any("forward" in sub.__dict__ for sub in m.modules())
        assert not any(dtype == torch.int8 for _, dtype in saved_shapes(m, example))


def test_fused_mlp_in_prepare_keeps_nothing_for_a_factored_second_layer() -> None:
    example = vit_batch(torch.float32)
    plain = small_vit(torch.float32)
    opts = BlockOptions(saved="int8", fused_mlp=True, norm_fed=True, rank=1.0, int8_min_bytes=0)
    model = prepare(copy.deepcopy(plain), "wasi", 2, example_input=example, options=opts)
    layers = wasi_layers(model)
    fc2 = {n: m for n, m in layers.items() if n.endswith("mlp.fc2")}
    assert len(fc2) == 2 and all("forward" in model.vit.layers[i].mlp.__dict__ for i in (1, 2))
    saved = saved_by_module(model, example)
    assert all(saved.get(n, 0) == 0 for n in fc2)
    wide = BATCH * TOKENS * 64
    shapes = saved_shapes(model, example)
    assert not [s for s, dtype in shapes if math.prod(s) >= wide and dtype != torch.int8]
    model.zero_grad(set_to_none=True)
    logits(model(**example)).square().mean().backward()
    assert all(m.act_ranks is None and m.left.grad is not None for m in fc2.values())
    # Only the attention output's projection decomposes its input now.
    decomposed = sorted(n for n, m in layers.items() if m.act_ranks is not None)
    assert decomposed == ["vit.layers.1.attention.o_proj", "vit.layers.2.attention.o_proj"]
    restore_blocks(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_only_if_smaller_trains_unfactored_layers_as_asi_does() -> None:
    example = vit_batch(torch.float32)
    plain = small_vit(torch.float32)
    common = {"saved": "int8", "fused_mlp": True, "norm_fed": True, "rank": 0.9}
    opts = BlockOptions(**common, weight_rank=1.0, only_if_smaller=True)  # full rank: none pays
    model = prepare(copy.deepcopy(plain), "wasi", 2, example_input=example, options=opts)
    assert not wasi_layers(model)
    asi = prepare(
        copy.deepcopy(plain), "asi", 2, example_input=example, options=BlockOptions(**common)
    )
    assert sorted(compressed_layers(model)) == sorted(compressed_layers(asi))
    got, want = grads(model, example), grads(asi, example)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    # At rank 8 (break-even 16 and 25.6) every Linear is factored.
    opts = BlockOptions(**common, weight_rank=8, only_if_smaller=True)
    model = prepare(copy.deepcopy(plain), "wasi", 2, example_input=example, options=opts)
    assert len(wasi_layers(model)) == 12 and not compressed_layers(model)
    with pytest.raises(ValueError, match="only_if_smaller applies to 'wsi' and 'wasi'"):
        prepare(copy.deepcopy(plain), "asi", 2, example_input=example, options=opts)


def test_fused_mlp_errors() -> None:
    with pytest.raises(ValueError, match="saved='int8' only"):
        BlockOptions(fused_mlp=True)
    opts = BlockOptions(saved="int8", fused_mlp=True)
    with pytest.raises(ValueError, match="no MLP of the blocks has a known layout"):
        prepare(encoder(), "asi", 1, example_input=torch.randn(2, 5, 16), options=opts)
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="method 'lora'"):
        prepare(small_vit(), "lora", 1, example_input=vit_batch(), options=opts)


# ---------------------------------------------------------------------------
# Norm-fed Linear layers
# ---------------------------------------------------------------------------


def rounded(t: torch.Tensor) -> torch.Tensor:
    """``t``, valued at its int8 form, with ``t``'s gradient (straight through)."""
    t_hat = dequantize_int8(*quantize_int8(t.detach(), 64), t.shape, t.dtype)
    return t + (t_hat - t).detach()


def test_norm_fed_linears_are_found_per_norm() -> None:
    vit = small_vit(torch.float32)
    block = vit.vit.layers[2]
    fed = norm_fed_linears(vit, [block], vit_batch(torch.float32))
    attention = block.attention
    assert fed == {
        block.layernorm_before: [attention.q_proj, attention.k_proj, attention.v_proj],
        block.layernorm_after: [block.mlp.fc1],
    }
    llama = small_llama()
    layer = llama.model.layers[1]
    fed = norm_fed_linears(llama, [layer], llama_batch())
    attn = layer.self_attn
    assert fed == {
        layer.input_layernorm: [attn.q_proj, attn.k_proj, attn.v_proj],
        layer.post_attention_layernorm: [layer.mlp.gate_proj, layer.mlp.up_proj],
    }


@pytest.mark.parametrize("factored", [False, True], ids=["plain", "wasi"])
@pytest.mark.parametrize("case", ["layernorm", "rmsnorm"])
def test_shared_norm_input_gradients_are_those_at_the_int8_input(case: str, factored: bool) -> None:
    if case == "layernorm":
        block = small_vit(torch.float32).vit.layers[0]
        norm = block.layernorm_before
        attention = block.attention
        linears = [attention.q_proj, attention.k_proj, attention.v_proj]
    else:
        layer = small_llama().float().model.layers[0]
        norm, linears = layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]
    for p in norm.parameters():  # trained norm parameters, not the initial ones
        p.data.add_(0.1 * torch.randn_like(p))
    reference = copy.deepcopy(nn.ModuleList([norm, *linears]))
    if factored:
        # WASI layers (their own method would decompose the input): the fed ones
        # keep nothing either. The reference trains the same factors on the exact
        # input (WSI).
        ranks = [m.in_features // 2 for m in linears]
        linears = [
            WASILinear.from_dense(m, k, WASIConfig(method="wasi"))
            for m, k in zip(linears, ranks, strict=True)
        ]
        reference = nn.ModuleList(
            [
                reference[0],
                *(
                    WASILinear.from_dense(m, k, WASIConfig(method="wsi"))
                    for m, k in zip(reference[1:], ranks, strict=True)
                ),
            ]
        )
    share_norm_inputs({norm: linears})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 700, 32, generator=g, requires_grad=True)
    grads_out = [torch.randn(3, 700, m.out_features, generator=g) for m in linears]
    y = norm(x)
    outs = [m(y) for m in linears]
    y_ref = reference[0](x)
    for out, m in zip(outs, reference[1:], strict=True):
        torch.testing.assert_close(out, m(y_ref), rtol=0, atol=0)  # the forward is exact
    # Saved: the int8 input and its scales, the weights; no float activation.
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = norm(x)
        outs = [m(y) for m in linears]
    blocks = x.numel() // 64
    weights = [
        (tuple(p.shape), torch.float32)
        for m in linears
        for p in ((m.left, m.right) if factored else (m.weight,))
    ]
    assert shapes == [((blocks, 64), torch.int8), ((blocks, 1), torch.float32), *weights]
    params = [x, *norm.parameters(), *(p for m in linears for p in m.parameters())]
    got = torch.autograd.grad(outs, params, grads_out)
    y_hat = reference[0](rounded(x))
    want_outs = [m(y_hat) for m in reference[1:]]
    ref_params = [x, *(p for m in reference for p in m.parameters())]
    want = torch.autograd.grad(want_outs, ref_params, grads_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    norm.eval()  # evaluation runs the plain norm
    assert not hasattr(norm(x), "_norm_source")


@pytest.mark.parametrize("case", ["vit", "llama"])
def test_norm_fed_in_prepare_leaves_the_fed_linears_plain_and_keeping_nothing(case: str) -> None:
    if case == "vit":
        plain, example = small_vit(torch.float32), vit_batch(torch.float32)
    else:
        plain, example = small_llama().float(), llama_batch()
        example = {"inputs_embeds": example["inputs_embeds"].float()}
    exact = grads(prepare(copy.deepcopy(plain), "vanilla", 2, example_input=example), example)
    opts = BlockOptions(
        attention="sdpa", saved="int8", fused_mlp=True, norm_fed=True, rank=1.0, int8_min_bytes=0
    )
    model = prepare(copy.deepcopy(plain), "asi", 2, example_input=example, options=opts)
    fed, compressed = [], []
    for name, m in model.named_modules():
        if "forward" in m.__dict__ and plain_linear(m):
            fed.append(name.rsplit(".", 1)[1])
        if isinstance(m, CompressedLinear):
            compressed.append(name.rsplit(".", 1)[1])
    if case == "vit":
        assert fed == ["q_proj", "k_proj", "v_proj", "fc1"] * 2
    else:
        assert fed == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"] * 2
    assert compressed == ["o_proj"] * 2  # the attention output's projection
    # The fed layers keep nothing, the norms their int8 input only.
    saved = saved_by_module(model, example)
    for name in saved:
        if name.endswith(("q_proj", "k_proj", "v_proj", "fc1", "gate_proj", "up_proj")):
            assert saved[name] == 0, name
    trains_close_and_restores(model, plain, exact, example)


def plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear


@pytest.mark.parametrize("case", ["vit", "llama"])
def test_norm_fed_in_prepare_feeds_wasi_layers_too(case: str) -> None:
    if case == "vit":
        plain, example = small_vit(torch.float32), vit_batch(torch.float32)
        fed_names = ("q_proj", "k_proj", "v_proj", "fc1")
    else:
        plain, example = small_llama().float(), llama_batch()
        example = {"inputs_embeds": example["inputs_embeds"].float()}
        fed_names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    # Full weight rank and act_rank 1.0: only the int8 forms are approximate.
    opts = BlockOptions(saved="int8", norm_fed=True, rank=1.0, weight_rank=1.0, int8_min_bytes=0)
    model = prepare(copy.deepcopy(plain), "wasi", 2, example_input=example, options=opts)
    layers = wasi_layers(model)
    fed = sorted(n for n, m in layers.items() if "forward" in m.__dict__)
    assert fed and all(n.endswith(fed_names) for n in fed)
    assert len(fed) == 2 * len(fed_names) and len(layers) > len(fed)
    saved = saved_by_module(model, example)
    for name in fed:
        assert saved.get(name, 0) == 0, name  # the norm's int8 input serves them
    model.zero_grad(set_to_none=True)
    logits(model(**example)).square().mean().backward()
    assert all(layers[n].act_ranks is None for n in fed)  # nothing decomposed
    assert all(layers[n].act_ranks is not None for n in layers if n not in fed)
    # The factors' gradients are those of the dense weight, projected: dL = dW R^T.
    exact = grads(prepare(copy.deepcopy(plain), "vanilla", 2, example_input=example), example)
    for name in fed:
        m = layers[name]
        want = exact[name + ".weight"] @ m.right.detach().T
        assert rel_err(m.left.grad, want) < 0.02, name
    restore_blocks(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_int8_options_train_under_autocast() -> None:
    example = vit_batch(torch.float32)
    plain = small_vit(torch.float32)
    exact = grads(prepare(copy.deepcopy(plain), "vanilla", 2, example_input=example), example)
    opts = BlockOptions(saved="int8", fused_mlp=True, norm_fed=True, rank=1.0, int8_min_bytes=0)
    model = prepare(copy.deepcopy(plain), "asi", 2, example_input=example, options=opts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**example).logits
    out.float().square().mean().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(g.dtype == torch.float32 for g in got.values())
    assert total_rel_err(got, exact) < 0.05  # bfloat16's 8-bit mantissa, not a broken gradient


@pytest.mark.parametrize("fused_mlp", [False, True])
def test_norm_fed_wasi_trains_under_autocast(fused_mlp: bool) -> None:
    example = vit_batch(torch.float32)
    opts = BlockOptions(
        saved="int8",
        norm_fed=True,
        fused_mlp=fused_mlp,
        rank=1.0,
        weight_rank=1.0,
        int8_min_bytes=0,
    )
    model = prepare(small_vit(torch.float32), "wasi", 2, example_input=example, options=opts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**example).logits
    out.float().square().mean().backward()
    factors = [p for m in wasi_layers(model).values() for p in (m.left, m.right)]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in factors)
    assert all(bool(torch.isfinite(p.grad).all()) and p.grad.abs().sum() > 0 for p in factors)


def test_norm_fed_errors() -> None:
    with pytest.raises(ValueError, match="norm_fed applies with saved='int8' only"):
        BlockOptions(norm_fed=True)
    opts = BlockOptions(saved="int8", norm_fed=True)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"no plain nn\.Linear of the blocks reads a norm"):
        prepare(model, "vanilla", ["0"], example_input=torch.randn(2, 8), options=opts)
    with pytest.raises(ValueError, match="'wsi' or 'wasi', got 'lora'"):
        prepare(small_vit(), "lora", 1, example_input=vit_batch(), options=opts)


def test_int8_saved_only_while_training() -> None:
    example = vit_batch(torch.float32)
    model = small_vit(torch.float32)
    saver = Int8Saved(list(model.vit.layers), min_bytes=0)
    model.eval()
    with torch.no_grad():
        model(**example)
    assert saver._contexts == [] and saver._depth == 0
    saver.remove()
    assert not saver.handles


# ---------------------------------------------------------------------------
# Selection and errors
# ---------------------------------------------------------------------------


def test_block_names() -> None:
    model = small_vit()
    assert block_names(model, 2) == ["vit.layers.1", "vit.layers.2"]
    assert block_names(model, last_blocks(1)) == ["vit.layers.2"]
    assert block_names(model, ["vit.layers.0"]) == ["vit.layers.0"]
    with pytest.raises(TypeError, match="list of names"):
        block_names(model, "vit.layers.0")
    with pytest.raises(ValueError, match="not modules"):
        block_names(model, ["vit.nope"])


def test_errors() -> None:
    example = vit_batch()
    assert set(METHODS) == {
        "vanilla",
        "checkpoint",
        "lora",
        "lora+asi",
        "asi",
        "hosvd",
        "svd",
        "wsi",
        "wasi",
    }
    with pytest.raises(ValueError, match="method must be one of"):
        prepare(small_vit(), "gradient_filter", 1, example_input=example)
    with pytest.raises(ValueError, match="already keeps only each block's input"):
        prepare(
            small_vit(), "checkpoint", 1, example_input=example, options=BlockOptions(saved="int8")
        )
    x = torch.randn(2, 5, 16)
    with pytest.raises(TypeError, match="Hugging Face model"):
        prepare(encoder(), "vanilla", 1, example_input=x, options=BlockOptions(attention="sdpa"))
    with pytest.raises(ValueError, match="attention must be"):
        BlockOptions(attention="flash")
    with pytest.raises(TypeError, match="tuple of kinds"):
        BlockOptions(recompute="norm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="recompute kinds"):
        BlockOptions(recompute=("attention",))
    with pytest.raises(ValueError, match="saved must be"):
        BlockOptions(saved="int4")
    with pytest.raises(ValueError, match="lora_r must be a positive int"):
        BlockOptions(lora_r=0)
    model = prepare(small_vit(), "checkpoint", 1, example_input=example)
    with pytest.raises(ValueError, match="own forward"):
        prepare(model, "checkpoint", 1, example_input=example)


def test_output_grams_factor_the_blocks_weights_in_their_outputs_basis() -> None:
    """``BlockOptions(output_grams=...)``: each factored Linear's ``L`` is the leading
    eigenvectors of its outputs' Gram matrix, measured on a Hugging Face batch (a dict
    of keyword arguments); other methods refuse the option."""
    example = vit_batch(torch.float32)
    plain = small_vit(torch.float32)
    names = select_layers(plain, last_blocks(2), example)
    grams = output_grams(plain, [(example, None)], names)
    opts = BlockOptions(weight_rank=4, output_grams=grams)
    model = prepare(copy.deepcopy(plain), "wasi", 2, example_input=example, options=opts)
    layers = wasi_layers(model)
    assert sorted(layers) == sorted(names)
    for name, layer in layers.items():
        basis = output_basis(grams[name])[:, :4].float()
        torch.testing.assert_close(layer.left.detach(), basis, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="output_grams applies to 'wsi' and 'wasi'"):
        prepare(copy.deepcopy(plain), "asi", 2, example_input=example, options=opts)
