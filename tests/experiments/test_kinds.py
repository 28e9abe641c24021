"""Model kinds of ``tensorcompress run``: what trains, the transformer rows, their measurements."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tensorcompress.experiments import kinds as K
from tensorcompress.experiments import report as R
from tensorcompress.experiments import train as T
from tensorcompress.models import mcunet_in1, vit_tiny
from tensorcompress.torch.measure import MB
from tensorcompress.torch.transformer import block_names

pytestmark = pytest.mark.usefixtures("single_thread")


def small_vit() -> torch.nn.Module:
    """Hidden 32, 2 heads, MLP 64, 3 blocks, 16x16 images in 4x4 patches (17 tokens)."""
    torch.manual_seed(0)
    return vit_tiny(
        num_classes=4, image_size=16, num_layers=3, hidden_size=32, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_kind_and_logits() -> None:
    assert K.is_transformer("vit_tiny") and K.is_transformer("ViT-Tiny")
    assert not K.is_transformer("mcunet_in1")
    x, y = batch()
    out = small_vit()(x)
    assert K.logits(out) is out.logits
    t = torch.randn(2, 3)
    assert K.logits(t) is t
    assert torch.allclose(K.cross_entropy(out, y), torch.nn.functional.cross_entropy(out.logits, y))
    with pytest.raises(TypeError, match="logits"):
        K.logits((t,))


def test_optimizers() -> None:
    assert K.optimizer_name("vit_tiny") == "adamw" and K.optimizer_name("mcunet_in1") == "sgd"
    params = list(small_vit().parameters())
    adam = T.make_optimizer("adamw", params, 1e-3, 0.05)
    assert isinstance(adam, torch.optim.AdamW)
    decayed = {id(p) for p in adam.param_groups[0]["params"]}
    assert (
        adam.param_groups[0]["weight_decay"] == 0.05 and adam.param_groups[1]["weight_decay"] == 0
    )
    assert all(p.ndim >= 2 for p in params if id(p) in decayed)
    sgd = T.make_optimizer("sgd", params, 0.1, 0.0)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    with pytest.raises(ValueError, match="optimizer must be"):
        T.make_optimizer("adam", params, 0.1, 0.0)


def test_tuned_layers_by_kind() -> None:
    x, _ = batch(1)
    vit = small_vit()
    assert K.tuned_layers(vit, 1, x, blocks=True) == [
        "vit.layers.2.attention.q_proj",
        "vit.layers.2.attention.k_proj",
        "vit.layers.2.attention.v_proj",
        "vit.layers.2.attention.o_proj",
        "vit.layers.2.mlp.fc1",
        "vit.layers.2.mlp.fc2",
    ]
    assert (
        K.tuned_layers(vit, "all", x, blocks=True)[0]
        == "vit.embeddings.patch_embeddings.projection"
    )
    cnn = mcunet_in1(num_classes=3)
    convs = K.tuned_layers(cnn, 2, torch.randn(1, 3, 48, 48), blocks=False)
    assert len(convs) == 2 and all("conv" in n or "features" in n or "." in n for n in convs)


@pytest.mark.parametrize("method", K.TRANSFORMER_METHODS)
def test_prepare_blocks(method: str) -> None:
    x, y = batch()
    settings = K.BlockSettings(lora_r=2)
    net, names = K.prepare_blocks(small_vit(), method, "1", 0.9, x, settings, seed=0)
    assert names, "the fine-tuned block has layers whose weights train"
    assert all(".layers.2." in n for n in names)
    if method.startswith("lora"):
        assert all("lora_" in n for n in names)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert not any(".layers.0." in n or ".layers.1." in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    opt = T.make_optimizer("adamw", [p for p in net.parameters() if p.requires_grad], 1e-3, 0)
    blocks = block_names(net, 1)
    fields, mem = K.transformer_measurements(net, x, y, names, opt, blocks)
    assert fields["peak_bytes"] == mem.peak_bytes > fields["peak_activation_bytes"] > 0
    # The fine-tuned part's whole training memory: the frozen blocks 0 and 1 left out,
    # the fine-tuned block's frozen weights (LoRA's base layers) counted.
    state = mem.gradients_bytes + mem.optimizer_bytes + mem.peak_activation_bytes
    tuned_weights = fields["tuned_bytes"] - state
    trainable = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    frozen = {n: p for n, p in net.named_parameters() if not p.requires_grad}
    in_block = sum(
        p.numel() * p.element_size() for n, p in frozen.items() if n.startswith(blocks[0] + ".")
    )
    assert tuned_weights == trainable + in_block < mem.weights_bytes
    assert (in_block > 0) == method.startswith("lora")
    assert fields["mem_full_bytes"] == mem.activations_bytes >= fields["mem_bytes"]
    if method in K.COMPRESSED_METHODS:
        # int8 saved form: the attention, norm and GELU tensors are kept compact.
        assert mem.kind_bytes("compressed") > 0
    if method == "checkpoint":
        assert fields["mem_bytes"] == 0  # the block keeps its input only


@pytest.mark.parametrize("method", ["asi", "hosvd", "lora+asi", "wasi"])
def test_prepare_blocks_passes_the_product_dtype(method: str) -> None:
    from tensorcompress.torch.modules import CompressedModule
    from tensorcompress.torch.wasi import wasi_layers

    x, _ = batch()
    settings = K.BlockSettings(lora_r=2)
    assert settings.options(method, 0.9, torch.bfloat16).product_dtype is torch.bfloat16
    net, _ = K.prepare_blocks(
        small_vit(), method, "1", 0.9, x, settings, seed=0, product_dtype=torch.bfloat16
    )
    configs = [m.compression for m in net.modules() if isinstance(m, CompressedModule)]
    configs += [m.config for m in wasi_layers(net).values()]
    assert configs and all(c.product_dtype is torch.bfloat16 for c in configs)


def test_prepare_blocks_factors_only_smaller_layers_on_request() -> None:
    from tensorcompress.torch.wasi import wasi_layers

    x, _ = batch()
    settings = K.BlockSettings()
    assert settings.options("wasi", 0.9, None, True).only_if_smaller
    assert not settings.options("asi", 0.9, None, True).only_if_smaller  # WSI/WASI only
    every, _ = K.prepare_blocks(small_vit(), "wasi", "1", 1.0, x, settings, seed=0)
    some, _ = K.prepare_blocks(
        small_vit(), "wasi", "1", 1.0, x, settings, seed=0, only_if_smaller=True
    )
    assert wasi_layers(every) and not wasi_layers(some)  # full rank: no factor is smaller


def test_prepare_all_layers() -> None:
    x, _ = batch()
    net, names = K.prepare_blocks(small_vit(), "vanilla", "all", None, x, K.BlockSettings(), seed=0)
    assert all(p.requires_grad for p in net.parameters())
    assert names[0] == "vit.embeddings.patch_embeddings.projection" and names[-1] == "classifier"
    with pytest.raises(ValueError, match="vanilla only"):
        K.prepare_blocks(small_vit(), "asi", "all", 0.8, x, K.BlockSettings(), seed=0)
    with pytest.raises(ValueError, match="method must be"):
        K.prepare_blocks(small_vit(), "gradient_filter", "1", None, x, K.BlockSettings(), seed=0)


def test_block_settings_options() -> None:
    s = K.BlockSettings()
    assert s.options("asi", 0.9).saved == "int8" and s.options("asi", 0.9).rank == 0.9
    assert s.options("lora", None).saved is None and s.options("lora", None).lora_alpha == 16
    assert K.BlockSettings(saved=None).options("hosvd", 0.8).saved is None
    assert all(s.options(m, 0.8).attention == "sdpa" for m in K.TRANSFORMER_METHODS)
    # WSI/WASI: the threshold is the weights' explained variance too; WASI keeps int8.
    assert s.options("wasi", 0.7).weight_rank == 0.7 and s.options("wasi", 0.7).saved == "int8"
    assert s.options("wsi", 0.7).weight_rank == 0.7 and s.options("wsi", 0.7).saved is None
    # The MLP is fused where int8 applies (WASI's factored fc2 too).
    assert all(s.options(m, 0.9).fused_mlp for m in ("asi", "hosvd", "wasi"))
    assert not any(s.options(m, 0.9).fused_mlp for m in ("wsi", "lora", "vanilla"))
    assert not K.BlockSettings(saved=None).options("asi", 0.9).fused_mlp
    assert not K.BlockSettings(fused_mlp=False).options("asi", 0.9).fused_mlp
    # The norm-fed Linear layers wherever the norms keep int8 (WASI's factored ones too).
    assert all(s.options(m, 0.9).norm_fed for m in ("asi", "svd", "hosvd", "wasi"))
    assert not any(s.options(m, 0.9).norm_fed for m in ("wsi", "lora", "vanilla"))
    assert not K.BlockSettings(saved=None).options("asi", 0.9).norm_fed
    assert not K.BlockSettings(norm_fed=False).options("asi", 0.9).norm_fed


# ---------------------------------------------------------------------------
# The report carries the peak columns of transformer rows
# ---------------------------------------------------------------------------


def _result(method: str, peak: float | None) -> dict[str, Any]:
    r: dict[str, Any] = {
        "method": method,
        "label": method,
        "layers": "2",
        "seed": 0,
        "accuracy": 0.9,
        "mem_bytes": MB,
        "mem_full_bytes": 2 * MB,
        "gflops": 1.0,
        "step_seconds": 0.1,
    }
    if peak is not None:
        r["peak_activation_bytes"] = peak * MB
        r["peak_bytes"] = (peak + 10) * MB
        r["tuned_bytes"] = (peak + 4) * MB
    return r


def test_report_peak_columns() -> None:
    rows = R.summarise([_result("vanilla", 3.0), _result("checkpoint", 1.0)])
    assert rows[1].peak_act_mb == 1.0 and rows[1].peak_mb == 11.0
    text = R.format_table(rows)
    assert "peak act MB" in text and "11.0" in text
    assert "tuned MB" in text and rows[1].tuned_mb == 5.0
    assert rows[0].to_dict()["peak_mb"] == 13.0 and rows[0].to_dict()["tuned_mb"] == 7.0
    cnn = R.summarise([_result("vanilla", None)])
    assert math.isnan(cnn[0].peak_mb) and "peak act MB" not in R.format_table(cnn)
    assert cnn[0].to_dict()["peak_mb"] is None


# ---------------------------------------------------------------------------
# The targets of the transformer rows
# ---------------------------------------------------------------------------


def _row(method: str, label: str, eps: float | None, acc: float, peak: float, ms: float) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(
        method=method, label=label, layers="4", threshold=eps, accuracy=acc, peak_act_mb=peak,
        step_ms=ms,
    )  # fmt: skip


def test_target_checks_and_recommended_threshold() -> None:
    rows = [
        _row("vanilla", "vanilla", None, 95.0, 10.0, 100.0),
        _row("checkpoint", "checkpointing", None, 95.0, 3.0, 130.0),
        _row("asi", "ASI ε=0.8", 0.8, 93.5, 2.5, 120.0),
        _row("asi", "ASI ε=0.9", 0.9, 94.5, 2.9, 125.0),
        _row("asi", "ASI ε=0.95", 0.95, 95.2, 3.5, 140.0),
        _row("lora+asi", "LoRA+ASI ε=0.9", 0.9, 90.0, 4.0, 90.0),
    ]
    checks = K.target_checks(rows)
    assert [c.label for c in checks] == ["ASI ε=0.8", "ASI ε=0.9", "ASI ε=0.95", "LoRA+ASI ε=0.9"]
    c8, c9, c95, lora = checks
    assert not c8.accuracy_met and c8.memory_met and c8.time_met
    assert c9.all_met and math.isclose(c9.peak_vs_vanilla, 0.29)
    assert c95.accuracy_met and not c95.memory_met and not c95.time_met
    assert lora.time_met and not lora.accuracy_met
    assert "missed" in c8.text() and "+0.2 points" in c95.text()
    assert K.recommended_threshold(checks) == 0.9
    assert K.recommended_threshold(checks[:1]) == 0.8  # none within 1 point: the best
    assert K.recommended_threshold([]) is None
    assert K.target_checks(rows[1:]) == []  # no vanilla row
    no_ckpt = K.target_checks([rows[0], rows[3]])[0]
    assert math.isnan(no_ckpt.step_vs_checkpoint) and not no_ckpt.time_met
    assert "nan" not in no_ckpt.text() and "checkpointing: not run" in no_ckpt.text()
    assert "0.29x vanilla's (target <= 0.3: met)" in no_ckpt.text()


def _wasi_row(method: str, eps: float | None, acc: float, tuned: float, **fields: Any) -> Any:
    """A row of the WASI targets: one seed per (weight, kept) pair in ``fields['paper']``."""
    from types import SimpleNamespace

    paper = fields.pop("paper", [])
    seeds = tuple(
        {"seed": i, "weight_bytes": w, "mem_bytes": m, **fields} for i, (w, m) in enumerate(paper)
    )
    label = method.upper() if eps is None else f"{method.upper()} ε={eps:g}"
    return SimpleNamespace(
        method=method, label=label, layers="4", threshold=eps, accuracy=acc, tuned_mb=tuned,
        step_ratio=fields.get("step", 1.0), seeds=seeds,
    )  # fmt: skip


def test_paper_convention_pairs_seeds() -> None:
    van = _wasi_row("vanilla", None, 97.0, 130.0, paper=[(60, 40), (80, 20)])
    row = _wasi_row("wasi", 0.7, 96.0, 40.0, paper=[(4, 1), (3, 2), (1, 1)])  # seed 2 unpaired
    bytes_, below, vanilla = K.paper_convention(row, van)  # type: ignore[misc]
    assert bytes_ == 5.0 and vanilla == 100.0 and below == 20.0
    assert K.paper_convention(row, _wasi_row("vanilla", None, 97.0, 130.0)) is None


def test_wasi_target_checks() -> None:
    rows = [
        _wasi_row("vanilla", None, 97.0, 130.0, paper=[(60, 40)]),
        _wasi_row("lora", None, 95.0, 120.0),
        _wasi_row("asi", 0.8, 96.0, 57.0),
        _wasi_row("asi", 0.9, 96.5, 58.0),
        _wasi_row("wasi", 0.7, 95.5, 42.0, paper=[(4, 1)], step=0.7, infer_ratio=0.5),
        _wasi_row("wasi", 0.9, 96.5, 59.0, paper=[(8, 2)], step=1.1, infer_ratio=0.9),
    ]
    good, bad = K.wasi_target_checks(rows)
    assert good.all_met and math.isclose(good.tuned_vs_lora, 0.35)
    assert good.paper_below == 20.0 and good.inference_vs_dense == 0.5
    assert math.isclose(good.tuned_vs_asi, 42 / 57) and good.lora_accuracy_gap == 0.5
    assert bad.accuracy_met and not bad.memory_met and bad.paper_below == 10.0
    assert not (bad.paper_met or bad.time_met or bad.inference_met)
    assert "(target >= 20: met)" in good.text() and "missed" not in good.text()
    assert "10.0x below vanilla's (target >= 20: missed)" in bad.text()
    assert "-1.5 points vs vanilla (target >= -2: met)" in good.text()
    # Without LoRA, ASI or a paired seed, the line says what it could not measure.
    alone = K.wasi_target_checks([rows[0], _wasi_row("wasi", 0.7, 90.0, 42.0)])[0]
    assert not alone.memory_met and not alone.paper_met and not alone.accuracy_met
    text = alone.text()
    assert "not run (add lora to --methods)" in text and "not run (add asi" in text
    assert "nan" not in text
    assert "convention n/a below vanilla's (target >= 20: not measured)" in text
    assert K.wasi_target_checks(rows[1:]) == []  # no vanilla row
    assert K.recommended_threshold([bad, good], "WASI") == 0.7  # the smallest within 2 points
