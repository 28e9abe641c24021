"""``tensorcompress run --model vit_tiny``: pretraining, the cache, the rows, the replay."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import tensorcompress
from tensorcompress import _measured
from tensorcompress.experiments import data as D
from tensorcompress.experiments import kinds as K
from tensorcompress.experiments import run as run_mod
from tensorcompress.experiments import train as T
from tensorcompress.experiments.cli import main
from tensorcompress.models import get_model
from tensorcompress.torch.budget import output_grams, plan_weight_ranks
from tensorcompress.torch.lowrank import factor_by_outputs
from tensorcompress.torch.wasi import to_wasi, wasi_layers

pytestmark = pytest.mark.usefixtures("single_thread")

# Two pretraining steps of 4 images (one at 16x16), fine-tuning 2 steps of 16.
TINY_PRETRAIN = replace(T.VIT_PRETRAINING, steps=2, batch_size=4, coarse_steps=1, eval_samples=8)


def _tiny(tmp_path: Path, **changes: Any) -> run_mod.RunConfig:
    base: dict[str, Any] = {
        "model": "vit_tiny",
        "resolution": 32,
        "layers": ("1",),
        "thresholds": (0.8,),
        "finetune": T.FineTuneConfig(
            epochs=1, batch_size=16, lr=1e-3, weight_decay=0.05, optimizer="adamw", grad_clip=1.0
        ),
        "pretrain": TINY_PRETRAIN,
        "train_samples": 32,
        "test_samples": 20,
        "timing_rounds": 1,
        "cache_dir": str(tmp_path / "cache"),
        "quiet": True,
    }
    return run_mod.RunConfig(**{**base, **changes})


# ---------------------------------------------------------------------------
# Pretraining and its cache
# ---------------------------------------------------------------------------


def test_cnn_cache_key_unchanged_by_the_new_fields() -> None:
    """The fields added for transformers stay out of a CNN checkpoint's name."""
    config = T.PretrainConfig()
    spec = {
        "model": "mcunet_in1",
        "resolution": 48,
        "seed": 0,
        "config": {
            "steps": 600,
            "batch_size": 64,
            "lr": 0.1,
            "weight_decay": 5e-5,
            "eval_samples": 1000,
        },
        "device": "cpu",
        "version": T._PRETRAIN_VERSION,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    assert T.cache_key("mcunet_in1", 48, 0, config) == f"mcunet_in1-48px-seed0-{digest}.pt"
    assert T.cache_key("vit_tiny", 32, 0, T.VIT_PRETRAINING) != T.cache_key(
        "vit_tiny", 32, 0, replace(T.VIT_PRETRAINING, coarse_steps=0)
    )


def test_pretrain_config() -> None:
    vit = T.VIT_PRETRAINING
    assert vit.optimizer == "adamw" and vit.coarse_resolution == 16 and vit.grad_clip
    short = vit.with_steps(vit.steps // 2)
    assert short.steps == vit.steps // 2
    assert short.coarse_steps == round(vit.coarse_steps / 2)
    assert T.default_pretraining("vit_tiny") == (32, vit)
    assert T.default_pretraining("mcunet_in1") == (48, T.PretrainConfig())
    with pytest.raises(ValueError, match="optimizer must be"):
        T.PretrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="coarse_steps must be"):
        T.PretrainConfig(steps=5, coarse_steps=6, coarse_resolution=16)
    with pytest.raises(ValueError, match="needs a coarse_resolution"):
        T.PretrainConfig(coarse_steps=1)
    with pytest.raises(ValueError, match="for transformers"):
        T.pretrain("mcunet_in1", 48, 0, T.PretrainConfig(steps=1, coarse_steps=1,
                   coarse_resolution=16), progress=False)  # fmt: skip
    assert vit.trained_blocks == (-4, -3, -2, -1) and short.trained_blocks == vit.trained_blocks
    for bad in [(), (1.0,)]:
        with pytest.raises(ValueError, match="trained_blocks must be"):
            T.PretrainConfig(trained_blocks=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trained_blocks is for transformers"):
        T.pretrain("mcunet_in1", 48, 0, T.PretrainConfig(steps=1, trained_blocks=(0,)),
                   progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="out of range for a model of 12 blocks"):
        T.pretrain("vit_tiny", 32, 0, replace(TINY_PRETRAIN, trained_blocks=(12,)), progress=False)


@pytest.mark.parametrize(("indices", "trained"), [((0,), {"0"}), ((-1, 0), {"0", "11"})])
def test_trained_blocks_leave_the_others_at_their_init(
    indices: tuple[int, ...], trained: set[str]
) -> None:
    """Pretraining some blocks only: the other blocks come back as initialised."""
    config = replace(TINY_PRETRAIN, trained_blocks=indices)
    state, _ = T.pretrain("vit_tiny", 32, 0, config, progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = get_model("vit_tiny", num_classes=len(D.SHAPE_CLASSES)).state_dict()
    assert state.keys() == init.keys()
    changed = {k for k in state if not torch.equal(state[k], init[k])}
    assert any(k.startswith("vit.layers.0.") for k in changed)
    assert "classifier.weight" in changed
    blocks = {k.split(".")[2] for k in changed if k.startswith("vit.layers.")}
    assert blocks == trained


def test_vit_pretraining_and_load_pretrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(T, "VIT_PRETRAINING", TINY_PRETRAIN)
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="tensorcompress run --model vit_tiny"):
        T.load_pretrained("vit_tiny", cache_dir=cache, pretrain=False)
    first = T.load_pretrained("vit_tiny", cache_dir=cache)
    info = first.pretraining  # type: ignore[attr-defined]
    assert not info["cached"] and 0.0 <= info["source_accuracy"] <= 1.0
    assert info["config"]["coarse_steps"] == 1 and info["config"]["optimizer"] == "adamw"
    again = T.load_pretrained("vit_tiny", cache_dir=cache, pretrain=False)
    assert again.pretraining["cached"]  # type: ignore[attr-defined]
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    head = T.load_pretrained("vit_tiny", cache_dir=cache, num_classes=10, pretrain=False)
    assert head.classifier.out_features == 10
    body = {k: v for k, v in first.state_dict().items() if not k.startswith("classifier")}
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in body.items())


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def test_config_of_a_transformer_run() -> None:
    config = run_mod.RunConfig(model="ViT-Tiny", resolution=32)
    assert config.model == "vit_tiny" and config.transformer
    assert config.methods == K.DEFAULT_TRANSFORMER_METHODS
    assert not {"hosvd", "svd", "wsi", "wasi"} & set(config.methods)
    rows = config.rows()
    assert ("vanilla", "all", None) in rows and ("checkpoint", "all", None) not in rows
    assert ("lora+asi", "4", 0.9) in rows and ("lora", "4", None) in rows
    factored = run_mod.RunConfig(model="vit_tiny", methods=("wsi", "wasi")).rows()
    assert ("wasi", "2", 0.8) in factored and ("wsi", "4", 0.95) in factored
    with pytest.raises(ValueError, match="gradient_filter"):
        run_mod.RunConfig(model="vit_tiny", methods=("gradient_filter",))
    with pytest.raises(ValueError, match="unknown model"):
        run_mod.RunConfig(model="tiny_llama")
    assert run_mod.RunConfig().methods == run_mod.METHODS  # a CNN's default


def test_vit_command_line() -> None:
    parser = argparse.ArgumentParser()
    run_mod.add_arguments(parser)

    def config(*argv: str) -> run_mod.RunConfig:
        return run_mod.config_from_args(parser.parse_args(["--model", "vit_tiny", *argv]))

    default = config("--no-cache")
    assert default.thresholds == (0.9, 0.99) and default.pretrain == T.VIT_PRETRAINING
    own = config("--quick", "--no-cache", "--pretrain-blocks", "0", "1", "-2", "-1")
    assert own.pretrain.trained_blocks == (0, 1, -2, -1)
    assert own.reuse_pretrain == ()  # another backbone than a default run's
    assert config("--quick", "--no-cache").reuse_pretrain == (T.VIT_PRETRAINING,)
    with pytest.raises(ValueError, match="--pretrain-blocks is for transformers"):
        run_mod.config_from_args(parser.parse_args(["--no-cache", "--pretrain-blocks", "0"]))
    assert default.plans == "measured"
    assert config("--no-cache", "--plans", "estimated").plans == "estimated"
    with pytest.raises(ValueError, match="plans must be"):
        run_mod.RunConfig(plans="fastest")
    assert default.weight_ranks == "threshold"
    assert config("--no-cache", "--weight-ranks", "budget").weight_ranks == "budget"
    with pytest.raises(ValueError, match="weight_ranks must be one of"):
        run_mod.RunConfig(weight_ranks="spectrum")
    assert default.weight_basis == "weight"
    assert config("--no-cache", "--weight-basis", "outputs").weight_basis == "outputs"
    with pytest.raises(ValueError, match="weight_basis must be one of"):
        run_mod.RunConfig(weight_basis="inputs")
    assert default.frozen_threshold is None
    assert config("--no-cache", "--frozen-threshold", "0.95").frozen_threshold == 0.95
    with pytest.raises(ValueError, match=r"frozen_threshold must be in \(0, 1\]"):
        run_mod.RunConfig(frozen_threshold=1.5)


@pytest.mark.parametrize("plans", ["measured", "estimated"])
def test_run_takes_its_sweep_plans_and_restores_the_setting(
    plans: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    monkeypatch.setattr(run_mod, "_run", lambda *args: seen.append(_measured._measuring))
    before = tensorcompress.measured_plans(True)
    try:
        run_mod.run_experiment(run_mod.RunConfig(model="vit_tiny", plans=plans))
        assert seen == [plans == "measured"] and _measured._measuring
    finally:
        tensorcompress.measured_plans(before)


def test_every_transformer_method_runs(tmp_path: Path) -> None:
    exp = run_mod.run_experiment(
        _tiny(tmp_path, layers=("all", "1"), methods=K.TRANSFORMER_METHODS)
    )
    labels = [r.label for r in exp.rows]
    assert labels == [
        "vanilla",
        "vanilla",
        "checkpointing",
        "LoRA r8",
        "LoRA+ASI ε=0.8",
        "HOSVD ε=0.8",
        "SVD ε=0.8",
        "ASI ε=0.8",
        "WSI ε=0.8",
        "WASI ε=0.8",
    ]
    by = {(r.method, r.layers): r for r in exp.rows}
    # The factored rows keep the layers' inputs (WSI) or their decompositions (WASI).
    assert by["wasi", "1"].mem_mb < by["wsi", "1"].mem_mb <= by["vanilla", "1"].mem_mb
    assert all(r.peak_mb > r.peak_act_mb > 0 for r in exp.rows)
    assert by["checkpoint", "1"].mem_mb == 0  # the block keeps its input only
    assert by["asi", "1"].mem_mb < by["vanilla", "1"].mem_mb
    assert by["vanilla", "all"].mem_mb > by["vanilla", "1"].mem_mb
    seeds = {(r.method, r.layers): r.seeds[0] for r in exp.rows}
    assert seeds["lora", "1"]["layer_names"][0].endswith("lora_A.default")
    assert seeds["asi", "1"]["activations_by_kind"]["compressed"] > 0
    # The factored rows record each layer's weight rank against its break-even rank.
    for method in ("wsi", "wasi"):
        ranks, even = seeds[method, "1"]["weight_ranks"], seeds[method, "1"]["break_even_ranks"]
        assert len(ranks) == 6 and ranks.keys() == even.keys()
        assert all(0 < ranks[n] <= 2 * even[n] for n in ranks)  # k <= min(out, in)
    assert any(n.startswith("WASI ε=0.8, 1 layers: 6 of 6 layers factored") for n in exp.notes)
    # ...and the exported model's inference time against the dense model's.
    for key, fields in seeds.items():
        timed = {"infer_seconds", "infer_dense_seconds", "infer_ratio"} & fields.keys()
        assert len(timed) == (3 if key[0] in ("wsi", "wasi") else 0), key
    wasi = seeds["wasi", "1"]
    assert wasi["infer_ratio"] == wasi["infer_seconds"] / wasi["infer_dense_seconds"] > 0
    assert any("exported for inference" in n and "the dense model's" in n for n in exp.notes)
    # The WASI paper's convention's weight side: vanilla's dense Linear weights and biases, WSI's
    # factors (ranks from the weights' spectra, not the dense numbers).
    model = get_model("vit_tiny", num_classes=10)
    modules = dict(model.named_modules())
    dense = sum(
        4 * (modules[n].weight.numel() + modules[n].bias.numel())
        for n in seeds["vanilla", "1"]["layer_names"]
    )
    assert seeds["vanilla", "1"]["weight_bytes"] == dense
    wsi = seeds["wsi", "1"]
    assert wsi["weight_bytes"] != dense and wsi["weight_bytes"] == sum(
        4
        * (
            wsi["weight_ranks"][n] * (modules[n].in_features + modules[n].out_features)
            + modules[n].out_features
        )
        for n in wsi["layer_names"]
    )
    assert any(n.startswith("WSI ε=0.8") and "WASI paper's convention" in n for n in exp.notes)
    # The WASI targets, each against the row it needs, all measured in this run.
    (wasi_line,) = [n for n in exp.notes if "(WASI targets)" in n]
    assert wasi_line.startswith("WASI ε=0.8, last 1 (WASI targets): accuracy")
    assert "LoRA's" in wasi_line and "the leanest ASI row's" in wasi_line
    assert "n/a" not in wasi_line and "not run" not in wasi_line
    assert any(n.startswith("recommended WASI ε = 0.8") for n in exp.notes)
    text = exp.table()
    assert "peak act MB" in text and "LoRA r8" in text
    assert any("recommended ε = 0.8" in n for n in exp.notes)
    assert any("sdpa attention" in n and "int8" in n for n in exp.notes)


def _first_seeds_blocks(config: run_mod.RunConfig) -> tuple[Any, list[str], list[Any]]:
    """The first seed's backbone, the Linear layers of its last block and the run's
    budget batches, made again as the run makes them."""
    train, _, _ = run_mod._target_data(config)
    state, _ = run_mod._backbone(config, 0, T.init_distributed("cpu"), False)
    model = T.load_backbone(config.model, train.num_classes, state, 0)
    example = D.to_input(train.images[:2], "cpu")
    linears = run_mod.select_layers(model, run_mod.last_blocks(1), example)
    batches = run_mod._budget_batches(train, config, 0, T.init_distributed("cpu"))
    return model, linears, batches


def test_weight_ranks_from_a_budget(tmp_path: Path) -> None:
    """``--weight-ranks budget``: WASI's weight ranks are plan_weight_ranks' allocation
    of the bytes the threshold's factors take, on the run's budget batches."""
    config = _tiny(tmp_path, methods=("vanilla", "wasi"), weight_ranks="budget")
    exp = run_mod.run_experiment(config)
    (row,) = [r for r in exp.rows if r.method == "wasi"]
    fields = row.seeds[0]
    budget = fields["weight_factors"]
    assert budget["source"] == "budget.plan_weight_ranks(budget=0.8)"
    assert 0 < budget["allocated_bytes"] <= budget["budget_bytes"]
    # The same plan, made again on the same backbone and batches.
    model, linears, batches = _first_seeds_blocks(config)
    alloc = plan_weight_ranks(model, batches, linears, 0.8, run_mod.WEIGHT_CANDIDATES)
    assert fields["weight_ranks"] == {n: k for n, (k,) in alloc.ranks.items()}
    assert budget["budget_bytes"] == alloc.budget_bytes
    assert any("--weight-ranks budget" in n for n in exp.notes)


def test_weights_factored_in_their_outputs_basis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--weight-basis outputs``: WASI's layers are factored with the Gram matrices of
    their outputs on the run's budget batches, at the threshold's ranks."""
    import tensorcompress.torch.transformer as transformer

    passed: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        passed.append(kwargs["output_grams"])
        return to_wasi(*args, **kwargs)

    monkeypatch.setattr(transformer, "to_wasi", spy)
    config = _tiny(tmp_path, methods=("wasi",), weight_basis="outputs")
    exp = run_mod.run_experiment(config)
    (row,) = exp.rows
    fields = row.seeds[0]
    assert fields["weight_factors"] == {"basis": "outputs"}
    model, linears, batches = _first_seeds_blocks(config)
    (grams,) = passed
    expected = output_grams(model, batches, linears)
    assert list(grams) == linears
    for name in linears:
        torch.testing.assert_close(grams[name], expected[name])
    # Same ranks as the SVD's at the threshold.
    assert fields["weight_ranks"] == {
        n: m.rank for n, m in wasi_layers(to_wasi(model, rank=0.8, layers=linears)).items()
    }
    assert any("--weight-basis outputs" in n for n in exp.notes)


def test_frozen_layers_factored_in_their_outputs_basis(tmp_path: Path) -> None:
    """``--frozen-threshold``: WASI's frozen Linear layers (every block but the last) are
    factored as factor_by_outputs factors them on the run's budget batches; the row trains
    without the replayed prefix (recorded from the dense layers), vanilla with it."""
    config = _tiny(tmp_path, methods=("vanilla", "wasi"), frozen_threshold=0.9)
    exp = run_mod.run_experiment(config)
    by_method = {r["method"]: r for r in exp.results}
    frozen = by_method["wasi"]["frozen_factors"]
    assert "frozen_factors" not in by_method["vanilla"]
    assert [by_method[m]["replayed_prefix"] for m in ("vanilla", "wasi")] == [True, False]
    model, last, batches = _first_seeds_blocks(config)
    every = run_mod.select_layers(model, run_mod.last_blocks(12), batches[0][0])
    before = [n for n in every if n not in last]
    assert frozen["layers"] == before and frozen["threshold"] == 0.9
    assert frozen["ranks"] == factor_by_outputs(model, output_grams(model, batches, before), 0.9)
    assert 0 < len(frozen["ranks"]) <= len(before)
    assert any("--frozen-threshold 0.9" in n for n in exp.notes)
    assert any("frozen layers factored at 0.9 of their outputs" in n for n in exp.notes)


def test_replaying_the_frozen_blocks_changes_no_result(tmp_path: Path) -> None:
    """The replayed prefix stops before the blocks' first norm, which trains."""
    changes: dict[str, Any] = {"layers": ("1", "2"), "methods": ("vanilla", "checkpoint")}
    replayed = run_mod.run_experiment(_tiny(tmp_path, **changes))
    computed = run_mod.run_experiment(_tiny(tmp_path, replay=False, **changes))
    assert [r["replayed_prefix"] for r in replayed.results] == [True] * 4
    for a, b in zip(replayed.results, computed.results):
        for field in ("accuracy", "final_loss", "mem_bytes", "mem_full_bytes", "steps"):
            assert a[field] == b[field], (a["method"], a["layers"], field)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "run", "--model", "vit_tiny", "--quick", "--quiet", "--threads", "1",
        "--pretrain-steps", "2", "--epochs", "1", "--train-samples", "32",
        "--test-samples", "20", "--batch-size", "16", "--layers", "1",
        "--methods", "vanilla", "asi", "--saved", "none", "--mlp", "separate",
        "--norms", "separate", "--lora-r", "4",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "AdamW" in out and "peak MB" in out and "int8" not in out
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    config = doc["config"]
    assert config["pretrain"]["steps"] == 2 and config["pretrain"]["coarse_steps"] <= 2
    assert config["finetune"]["optimizer"] == "adamw" and config["blocks"]["saved"] is None
    assert config["blocks"]["fused_mlp"] is False and config["blocks"]["norm_fed"] is False
