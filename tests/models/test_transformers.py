"""Hugging Face transformers built from configs, selected by blocks and compressed.

Tiny widths keep every test quick; the parity tests are float64 and at full
rank, where every compressed weight gradient equals vanilla autograd's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    ViTForImageClassification,
)

from tensorcompress.models import (
    TRANSFORMER_NAMES,
    LlamaShape,
    get_model,
    tiny_llama,
    tinyllama_1b,
    vit_tiny,
)
from tensorcompress.torch import (
    CompressedLinear,
    compressed_layers,
    convert,
    find_blocks,
    input_groups,
    last_blocks,
    restore,
    select_layers,
)
from tensorcompress.torch.measure import activation_memory

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH = 4


def small_vit() -> nn.Module:
    """2 blocks, hidden 16, 12x12 images in 4x4 patches: 10 tokens of 16 features."""
    torch.manual_seed(0)
    model = vit_tiny(
        num_classes=3,
        image_size=12,
        num_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        attn_implementation="eager",
    )
    return model.double()


def small_llama() -> nn.Module:
    """2 blocks, hidden 32 (4 query, 2 key/value heads), intermediate 48."""
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


def vit_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(BATCH, 3, 12, 12, generator=g, dtype=torch.float64)}


def llama_batch(seed: int) -> dict[str, torch.Tensor]:
    # Embeddings rather than token ids, so the input gradient is checked too.
    g = torch.Generator().manual_seed(seed)
    return {"inputs_embeds": torch.randn(BATCH, 12, 32, generator=g, dtype=torch.float64)}


CASES = {"vit": (small_vit, vit_batch), "llama": (small_llama, llama_batch)}


def input_shapes(model: nn.Module, names: list[str], example: dict[str, Any]) -> dict[str, Any]:
    """Each layer's input shape: the full Tucker rank of its input."""
    shapes: dict[str, Any] = {}
    modules = dict(model.named_modules())

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    with torch.no_grad():
        model(**example)
    for h in handles:
        h.remove()
    return shapes


@pytest.fixture
def decompositions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    calls: list[str] = []
    original = CompressedLinear._compress_input

    def counting(self: CompressedLinear, x: torch.Tensor, out_shape: tuple[int, ...]) -> Any:
        calls.append(self.layer_name)
        return original(self, x, out_shape)

    monkeypatch.setattr(CompressedLinear, "_compress_input", counting)
    yield calls


def step(model: nn.Module, example: dict[str, torch.Tensor]) -> dict[str, Any]:
    model.zero_grad(set_to_none=True)
    example = {k: v.detach().requires_grad_(True) for k, v in example.items()}
    model(**example).logits.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads.update({k: v.grad for k, v in example.items()})
    return grads


# ---------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------


def test_vit_tiny_is_vit_tiny_on_32x32_images() -> None:
    model = vit_tiny()
    assert isinstance(model, ViTForImageClassification)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (192, 12, 3)
    assert (cfg.intermediate_size, cfg.image_size, cfg.patch_size) == (768, 32, 4)
    assert model.classifier.out_features == 10
    assert find_blocks(model)[0] == "vit.layers"
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 10)


def test_tinyllama_shapes() -> None:
    real = tinyllama_1b()
    assert (real.hidden_size, real.num_layers, real.num_heads, real.num_kv_heads) == (
        2048,
        22,
        32,
        4,
    )
    assert (real.intermediate_size, real.vocab_size, real.head_dim, real.kv_size) == (
        5632,
        32000,
        64,
        256,
    )
    assert real.num_parameters() == 1_100_048_384  # TinyLlama-1.1B's published count
    with pytest.raises(ValueError, match="multiple of num_heads"):
        LlamaShape(100, 1, 3, 1, 8, 10)

    model = tiny_llama(vocab_size=64)  # TinyLlama's blocks, every width / 8
    assert isinstance(model, LlamaForCausalLM)
    assert find_blocks(model)[0] == "model.layers"
    narrow = tinyllama_1b().narrowed(8)
    block = dict(model.model.layers[0].named_modules())
    for name, (n_in, n_out) in narrow.linear_shapes().items():
        assert (block[name].in_features, block[name].out_features) == (n_in, n_out), name
    assert len(model.model.layers) == 22
    assert model.config.num_attention_heads == 32 and model.config.num_key_value_heads == 4
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == LlamaShape(**{**narrow.__dict__, "vocab_size": 64}).num_parameters()

    classifier = tiny_llama(num_labels=3, num_layers=1, vocab_size=64)
    assert isinstance(classifier, LlamaForSequenceClassification)
    with torch.no_grad():
        assert classifier(torch.randint(1, 64, (2, 5))).logits.shape == (2, 3)


def test_registry_builds_the_transformers() -> None:
    assert TRANSFORMER_NAMES == ("vit_tiny", "tiny_llama")
    assert get_model("ViT-Tiny", num_classes=5).classifier.out_features == 5
    llama = get_model("tiny_llama", num_classes=3)
    assert isinstance(llama, LlamaForSequenceClassification) and llama.score.out_features == 3
    with pytest.raises(ValueError, match="vit_tiny, tiny_llama"):
        get_model("vit_huge")


# ---------------------------------------------------------------------------
# Blocks and compression
# ---------------------------------------------------------------------------


def test_last_blocks_on_vit_and_llama() -> None:
    vit, x = small_vit(), vit_batch(0)
    assert select_layers(vit, last_blocks(1), x) == [
        f"vit.layers.1.{name}"
        for name in (
            *("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
            *("mlp.fc1", "mlp.fc2"),
        )
    ]
    llama, e = small_llama(), llama_batch(0)
    assert select_layers(llama, last_blocks(1), e) == [
        f"model.layers.1.{name}"
        for name in (
            *("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
            *("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        )
    ]


def test_blocks_are_found_after_every_layer_is_factored() -> None:
    """WSI/WASI replace every Linear of the blocks; the blocks are still the blocks."""
    from tensorcompress.torch.wasi import to_wasi

    vit = small_vit()
    blocks = find_blocks(vit)
    to_wasi(vit, method="wsi", rank=2, layers=last_blocks(len(blocks[1])))
    assert not any(type(m) is nn.Linear for m in blocks[1].modules())
    assert find_blocks(vit) == blocks


def test_gpt2_conv1d_is_refused() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64))
    assert find_blocks(gpt2)[0] == "transformer.h"
    with pytest.raises(ValueError, match="transformers Conv1D layers") as info:
        select_layers(gpt2, last_blocks(1))
    assert "'transformer.h.1.attn.c_attn'" in str(info.value)
    assert "hold no Conv1d/Conv2d/Linear" in str(info.value)


@pytest.mark.parametrize("case", ["vit", "llama"])
def test_full_rank_gradients_equal_vanilla(case: str, decompositions: list[str]) -> None:
    build, batch = CASES[case]
    vanilla, model = build(), build()
    layers = select_layers(model, last_blocks(2), batch(0))
    ranks = input_shapes(model, layers, batch(0))
    convert(model, method="asi", rank=ranks, layers=last_blocks(2), example_input=batch(0))
    groups = [len(g.members) for g in input_groups(model)]
    assert groups == ([3] * 2 if case == "vit" else [3, 2] * 2)  # q/k/v (and gate/up)
    for seed in (1, 2):  # the cold start, then warm ASI from each group's state
        decompositions.clear()
        got, expected = step(model, batch(seed)), step(vanilla, batch(seed))
        assert got.keys() == expected.keys()
        for name, g in expected.items():
            torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12, msg=name)
        # One decomposition per distinct input: 4 per block instead of 6 (ViT) or 7 (Llama).
        assert len(decompositions) == 8
    assert all(layer.ranks == ranks[name] for name, layer in compressed_layers(model).items())


@pytest.mark.parametrize("case", ["vit", "llama"])
def test_state_dict_and_restore(case: str) -> None:
    build, batch = CASES[case]
    plain = build().eval()
    model = convert(build(), method="asi", rank=0.9, layers=last_blocks(1), example_input=batch(0))
    step(model, batch(1))
    assert list(model.state_dict()) == list(plain.state_dict())
    other = build()
    for p in other.parameters():
        p.data.normal_()
    model.load_state_dict(other.state_dict(), strict=True)
    plain.load_state_dict(model.state_dict(), strict=True)
    restore(model)
    assert compressed_layers(model) == {} and input_groups(model) == []
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch(2)).logits, plain(**batch(2)).logits)


def test_vit_keeps_the_shared_factors_once() -> None:
    x = vit_batch(0)
    shared = convert(small_vit(), method="hosvd", rank=0.8, layers=last_blocks(1), example_input=x)
    alone = convert(
        small_vit(), method="hosvd", rank=0.8, layers=last_blocks(1), share_inputs=False
    )
    a, b = (activation_memory(m, x, layers=last_blocks(1)) for m in (shared, alone))
    qkv = a["vit.layers.1.attention.q_proj"].measured_bytes
    assert [layer.measured_bytes for layer in a.layers] == [l.measured_bytes for l in b.layers]
    assert (a.shared_bytes, b.shared_bytes) == (2 * qkv, 0)
    # The selected layers' distinct bytes: q/k/v's factors counted once.
    assert a.kept_bytes - a.shared_bytes == b.kept_bytes - 2 * qkv
    assert a.total_bytes == b.total_bytes - 2 * qkv


def test_vit_under_no_grad_and_eval_matches_vanilla() -> None:
    x = vit_batch(0)
    plain = small_vit()
    model = convert(small_vit(), method="asi", rank=0.5, layers=last_blocks(2), example_input=x)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, plain(**x).logits, rtol=0, atol=0)
    model.eval()
    plain.eval()
    torch.testing.assert_close(model(**x).logits, plain(**x).logits, rtol=0, atol=0)
    assert all(layer.last_result is None for layer in compressed_layers(model).values())
