"""``tensorcompress run``: end to end on tiny settings, reproducibility, bad input, torchrun."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tensorcompress.experiments import report as R
from tensorcompress.experiments import run as run_mod
from tensorcompress.experiments.cli import main
from tensorcompress.models import get_model
from tensorcompress.torch import METHODS
from tensorcompress.torch.budget import output_grams
from tensorcompress.torch.lowrank import LowRankConv2d, factor_by_outputs
from tensorcompress.torch.wasi import wasi_layers

# Small enough for seconds per run: 4 steps of 16 images at 32x32, 3 pretraining steps.
TINY = [
    "run", "--quick", "--quiet", "--threads", "1", "--resolution", "32", "--epochs", "1",
    "--batch-size", "16", "--train-samples", "64", "--test-samples", "40",
    "--pretrain-steps", "3", "--timing-rounds", "1",
]  # fmt: skip


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _rows(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    doc = json.loads((out / "results.json").read_text())
    return {(r["method"], r["layers"]): r for r in doc["rows"]}


def test_quick_run_end_to_end_cached_and_reproducible(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, first, second = tmp_path / "cache", tmp_path / "a", tmp_path / "b"
    code, stdout, _ = _run(
        capsys, *TINY, "--layers", "all", "2", "--cache-dir", cache, "--out", first
    )
    assert code == 0
    for label in ("vanilla", "gradient filter R2", "HOSVD ε=0.8", "SVD ε=0.8", "ASI ε=0.8"):
        assert label in stdout
    assert "Equal accuracy" in stdout
    assert sorted(p.name for p in first.iterdir()) == sorted(R.FILES)
    for png in ("accuracy_vs_memory.png", "accuracy_vs_gflops.png"):
        assert (first / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (first / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 6
    assert csv_lines[0].startswith("method,label,layers,threshold,accuracy")

    doc = json.loads((first / "results.json").read_text())
    assert [p["cached"] for p in doc["pretraining"]] == [False]
    # The step times were taken with freed memory reused (--allocator reuse).
    if platform.libc_ver()[0] == "glibc":
        assert doc["environment"]["allocator"].startswith("allocator: freed memory reused")
    rows = _rows(first)
    assert set(rows) == {("vanilla", "all")} | {(m, "2") for m in METHODS}
    for (method, _), row in rows.items():
        assert row["threshold"] == (0.8 if method in run_mod.THRESHOLD_METHODS else None)
    # One comparison per non-vanilla method with 2 layers, with the keys promised.
    equal = doc["summary"]["equal_accuracy"]
    assert sorted(e["method"] for e in equal) == sorted(m for m in METHODS if m != "vanilla")
    for e in equal:
        assert {"method", "layers", "accuracy", "memory_ratio", "gflops_ratio", "tolerance"} <= set(
            e
        )
        assert e["layers"] == "2" and e["tolerance"] > 0
        assert e["accuracy"] == pytest.approx(rows["vanilla", "2"]["accuracy"] - e["tolerance"])
        if e["memory_ratio"] is not None:
            assert 0 < e["memory_ratio"] <= 1.0 and e["gflops_ratio"] > 0
    van = rows["vanilla", "2"]
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 100.0 and row["step_ms"] > 0
        assert row["step_ratio"] == pytest.approx(
            row["step_ms"] / rows["vanilla", row["layers"]]["step_ms"]
        )
    # Memory: the compressed methods keep less than vanilla in the same layers,
    # and full fine-tuning keeps the most.
    assert rows["vanilla", "all"]["mem_mb"] > van["mem_mb"] > 0
    for method in ("hosvd", "svd", "asi"):
        assert 0 < rows[method, "2"]["mem_mb"] < van["mem_mb"]
    assert rows["gradient_filter", "2"]["mem_mb"] <= van["mem_mb"]
    assert rows["vanilla", "all"]["gflops"] > van["gflops"] > 0
    asi = rows["asi", "2"]["seeds"][0]
    assert set(asi["ranks"]) == set(asi["layer_names"]) and len(asi["layer_names"]) == 2

    # Second run: seed 0's pretrained model comes from the cache, and seed 0
    # gives exactly the same numbers (timing aside); --seeds 2 adds seed 1,
    # with its own pretraining.
    code, stdout, _ = _run(
        capsys, *TINY, "--layers", "all", "2", "--seeds", "2", "--cache-dir", cache, "--out", second
    )
    assert code == 0
    pre = json.loads((second / "results.json").read_text())["pretraining"]
    assert [(p["seed"], p["cached"]) for p in pre] == [(0, True), (1, False)]
    assert len(list((cache / "pretrained").glob("*.pt"))) == 2
    again = _rows(second)
    for key, row in rows.items():
        seeds = {s["seed"]: s for s in again[key]["seeds"]}
        assert sorted(seeds) == [0, 1]
        for field in ("accuracy", "mem_bytes", "mem_full_bytes", "final_loss", "ranks"):
            assert seeds[0][field] == row["seeds"][0][field], (key, field)
        assert again[key]["n_seeds"] == 2 and again[key]["accuracy_std"] is not None


def _tiny(tmp_path: Path, **changes: Any) -> run_mod.RunConfig:
    base = {
        "resolution": 32,
        "layers": ("2",),
        "methods": ("vanilla", "hosvd", "asi"),
        "thresholds": (0.8,),
        "finetune": run_mod.T.FineTuneConfig(epochs=2, batch_size=16),
        "pretrain": run_mod.T.PretrainConfig(steps=3, batch_size=16, eval_samples=40),
        "train_samples": 64,
        "test_samples": 40,
        "timing_rounds": 1,
        "cache_dir": str(tmp_path / "cache"),
        "quiet": True,
    }
    return run_mod.RunConfig(**{**base, **changes})


def test_replaying_the_frozen_prefix_changes_no_result(tmp_path: Path, single_thread: None) -> None:
    # One recording serves both depths; each configuration's results are those
    # of computing the frozen prefix (bit for bit).
    changes: dict[str, Any] = {"layers": ("2", "4"), "methods": ("vanilla", "asi")}
    replayed = run_mod.run_experiment(_tiny(tmp_path, **changes))
    computed = run_mod.run_experiment(_tiny(tmp_path, replay=False, **changes))
    assert [r["replayed_prefix"] for r in replayed.results] == [True] * 4
    assert [r["replayed_prefix"] for r in computed.results] == [False] * 4
    fields = ("accuracy", "final_loss", "mem_bytes", "mem_full_bytes", "gflops", "ranks", "steps")
    for a, b in zip(replayed.results, computed.results):
        assert (a["method"], a["threshold"]) == (b["method"], b["threshold"])
        for field in fields:
            assert a[field] == b[field], (a["method"], field)
    assert any("replayed" in note for note in replayed.notes)


def test_frontier_over_thresholds(tmp_path: Path, single_thread: None) -> None:
    exp = run_mod.run_experiment(
        _tiny(tmp_path, methods=("vanilla", "hosvd", "asi"), thresholds=(0.5, 0.95))
    )
    by = {(r.method, r.threshold): r for r in exp.rows}
    assert set(by) == {
        ("vanilla", None),
        ("hosvd", 0.5),
        ("hosvd", 0.95),
        ("asi", 0.5),
        ("asi", 0.95),
    }
    # More explained variance keeps more; ASI fits HOSVD's memory at the same threshold.
    assert by["hosvd", 0.5].mem_mb < by["hosvd", 0.95].mem_mb < by["vanilla", None].mem_mb
    for t in (0.5, 0.95):
        seed = by["asi", t].seeds[0]
        assert seed["asi_ranks"]["source"] == f"budget.plan_ranks(budget='hosvd@{t}')"
        assert seed["asi_ranks"]["allocated_bytes"] <= seed["asi_ranks"]["budget_bytes"]
    assert [(e.method, e.layers) for e in exp.equal] == [("hosvd", "2"), ("asi", "2")]
    tol = exp.tolerances["2"]
    van = by["vanilla", None].accuracy
    assert tol == pytest.approx(100 * math.sqrt(van / 100 * (1 - van / 100) / 40))
    summary = exp.summary()
    assert summary["tolerance"] == {"2": tol} and len(summary["equal_accuracy"]) == 2


def test_product_dtype_reaches_every_warm_asi_step(
    tmp_path: Path, single_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorcompress import asi

    seen: list[Any] = []
    decompose = asi.decompose

    def recording(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("warm_start") is not None:
            seen.append(kwargs.get("product_dtype"))
        return decompose(*args, **kwargs)

    monkeypatch.setattr(asi, "decompose", recording)
    exp = run_mod.run_experiment(
        _tiny(tmp_path, methods=("vanilla", "asi", "wasi"), product_dtype="bfloat16")
    )
    assert seen and set(seen) == {torch.bfloat16}  # ASI's and WASI's layers, every step
    assert any("tensor products in bfloat16" in note for note in exp.notes)
    assert all(math.isfinite(r.accuracy) for r in exp.rows)


def test_findings_state_the_noise() -> None:
    def res(method: str, acc: float, mem: float, threshold: float | None) -> dict[str, Any]:
        return {"method": method, "label": method, "layers": "2", "seed": 0, "accuracy": acc,
                "mem_bytes": mem * 2**20, "mem_full_bytes": 2**21, "gflops": 1.0,
                "decomp_gflops": 0.1, "step_seconds": 0.1, "threshold": threshold}  # fmt: skip

    rows = R.summarise(
        [
            res("vanilla", 0.90, 4.0, None),
            res("hosvd", 0.895, 0.5, 0.8),
            res("asi", 0.80, 0.25, 0.8),
        ]
    )
    (line,) = run_mod._findings(rows, n_test=450)
    # ASI vs vanilla: 10 points, beyond the sampling noise of 450 images (2.4).
    assert "Mem 6.2% of vanilla's, accuracy -10.0 points vs vanilla (noise ±2.4)" in line
    # ASI vs HOSVD: 9.5 points, beyond noise too; HOSVD vs vanilla would be within it.
    assert "accuracy -9.5 points vs HOSVD" in line
    rows = R.summarise([res("vanilla", 0.90, 4.0, None), res("asi", 0.895, 0.25, 0.8)])
    (line,) = run_mod._findings(rows, n_test=450)
    assert "accuracy within noise of vanilla's (±2.0 points)" in line and "-0.5" not in line


def test_weights_replace_pretraining(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "mcunet.pt"
    torch.save(get_model("mcunet_in1").state_dict(), weights)  # a 1000-class head
    code, _, _ = _run(
        capsys, *TINY, "--layers", "2", "--methods", "vanilla", "--weights", weights,
        "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["pretraining"] == [{"weights": str(weights), "seed": 0}]
    assert not (tmp_path / "cache").exists()  # nothing was pretrained


def _bad_inputs(tmp: Path) -> dict[str, list[str]]:
    one_class = tmp / "one"
    (one_class / "a").mkdir(parents=True)
    np.savez(tmp / "noy.npz", x=np.zeros((4, 8, 8)))
    (tmp / "file").write_text("x")
    torch.save(get_model("resnet18", num_classes=10).state_dict(), tmp / "resnet.pt")
    (tmp / "junk.pt").write_bytes(b"junk")
    return {
        "missing data": ["--data", str(tmp / "nowhere")],
        "one class": ["--data", str(one_class)],
        "npz without y": ["--data", str(tmp / "noy.npz")],
        "mismatched weights": ["--weights", str(tmp / "resnet.pt")],
        "unreadable weights": ["--weights", str(tmp / "junk.pt")],
        "missing weights": ["--weights", str(tmp / "none.pt")],
        "unknown method": ["--methods", "vanilla", "lora"],
        "unknown model": ["--model", "vgg16"],
        "out is a file": ["--out", str(tmp / "file")],
        "out under a file": ["--out", str(tmp / "file" / "sub")],
        "all layers only": ["--methods", "asi", "--layers", "all"],
        "bad layers": ["--layers", "two"],
        "bad threshold": ["--threshold", "1.5"],
        "zero threshold": ["--thresholds", "0.5", "0"],
        "no thresholds": ["--thresholds"],
        "repeated thresholds": ["--thresholds", "0.8", "0.9", "0.80"],
        "threshold not a number": ["--thresholds", "high"],
        "negative tolerance": ["--tolerance", "-1"],
        "no cuda": ["--device", "cuda:99"]
        if not torch.cuda.is_available()
        else ["--device", "tpu"],
    }


BAD_CASES = [
    "missing data", "one class", "npz without y", "mismatched weights", "unreadable weights",
    "missing weights", "unknown method", "unknown model", "out is a file", "out under a file",
    "all layers only", "bad layers", "bad threshold", "zero threshold", "no thresholds",
    "repeated thresholds", "threshold not a number", "negative tolerance", "no cuda",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_leaves_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = _bad_inputs(tmp_path)[case]
    out = tmp_path / "results"
    argv = [*TINY, "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra]
    code, stdout, stderr = _run(capsys, *argv)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tensorcompress run: error:"), stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()
    assert not (tmp_path / "cache").exists()  # refused before any pretraining


def test_failed_write_leaves_nothing_in_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier")
    rows = R.summarise(
        [
            {"method": "vanilla", "label": "vanilla", "layers": "2", "seed": 0, "accuracy": 0.5,
             "mem_bytes": 2**20, "mem_full_bytes": 2**21, "gflops": 1.0, "step_seconds": 0.1},
        ]
    )  # fmt: skip

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(R, "_plot", boom)
    with pytest.raises(OSError, match="disk full"):
        R.write_results(out, rows, {}, "table")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_summary_groups_by_threshold() -> None:
    def res(method: str, threshold: float | None, acc: float) -> dict[str, Any]:
        return {"method": method, "label": method, "layers": "2", "seed": 0, "accuracy": acc,
                "mem_bytes": 2**20, "mem_full_bytes": 2**20, "gflops": 1.0,
                "step_seconds": 1.0, "threshold": threshold}  # fmt: skip

    rows = R.summarise([res("vanilla", None, 0.9), res("asi", 0.7, 0.5), res("asi", 0.9, 0.7)])
    assert [(r.method, r.threshold, r.accuracy) for r in rows] == [
        ("vanilla", None, 90.0),
        ("asi", 0.7, 50.0),
        ("asi", 0.9, 70.0),
    ]
    assert [r.to_dict()["threshold"] for r in rows] == [None, 0.7, 0.9]
    assert R.csv_text(rows).splitlines()[0].startswith("method,label,layers,threshold,accuracy")


def test_summary_ratios_spread_and_missing_flops() -> None:
    def res(method: str, seed: int, acc: float, step: float) -> dict[str, Any]:
        return {"method": method, "label": method, "layers": "2", "seed": seed, "accuracy": acc,
                "mem_bytes": 2**20, "mem_full_bytes": 2**20, "gflops": math.nan,
                "step_seconds": step}  # fmt: skip

    rows = R.summarise(
        [res("vanilla", 0, 0.5, 1.0), res("asi", 0, 0.4, 0.5), res("vanilla", 1, 0.7, 2.0),
         res("asi", 1, 0.6, 3.0)]
    )  # fmt: skip
    asi = rows[1]
    assert asi.accuracy == pytest.approx(50.0) and asi.accuracy_std == pytest.approx(math.sqrt(200))
    assert asi.step_ratio == pytest.approx((0.5 + 1.5) / 2)  # per-seed ratios, averaged
    text = R.format_table(rows, ["note"], seeds=2)
    assert "n/a" in text and "50.0±14.1" in text and text.startswith("note")
    assert R.csv_text(rows).splitlines()[1].split(",")[:3] == ["vanilla", "vanilla", "2"]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="product_dtype must be one of"):
        run_mod.RunConfig(product_dtype="float16")
    assert run_mod.RunConfig(product_dtype="bfloat16").products is torch.bfloat16
    assert run_mod.RunConfig().products is None
    with pytest.raises(ValueError, match="factor must be one of"):
        run_mod.RunConfig(factor="some")
    with pytest.raises(ValueError, match="unknown method"):
        run_mod.RunConfig(methods=("vanilla", "nope"))
    with pytest.raises(ValueError, match="vanilla only"):
        run_mod.RunConfig(methods=("asi",), layers=("all",))
    cfg = run_mod.RunConfig(methods=("asi", "vanilla"), layers=("all", "2", "2"), thresholds=(0.8,))
    assert cfg.rows() == [("asi", "2", 0.8), ("vanilla", "all", None), ("vanilla", "2", None)]
    cfg = run_mod.RunConfig(
        methods=("gradient_filter", "hosvd"), layers=("2", "4"), thresholds=(0.9, 0.5)
    )
    assert cfg.thresholds == (0.5, 0.9)
    assert cfg.rows() == [
        ("gradient_filter", "2", None),
        ("gradient_filter", "4", None),
        ("hosvd", "2", 0.5),
        ("hosvd", "2", 0.9),
        ("hosvd", "4", 0.5),
        ("hosvd", "4", 0.9),
    ]
    # The error message prints the canonical tuple.
    with pytest.raises(ValueError) as info:
        run_mod.RunConfig(methods=("lora",))
    assert str(run_mod.K.CNN_METHODS) in str(info.value)
    assert run_mod.K.CNN_METHODS[: len(METHODS)] == METHODS


@pytest.mark.parametrize(
    ("values", "expected"),
    [(["0.8"], (0.8,)), (["0.95", "0.5", "0.7"], (0.5, 0.7, 0.95)), ([1], (1.0,))],
)
def test_thresholds_parse(values: list[Any], expected: tuple[float, ...]) -> None:
    assert run_mod.parse_thresholds(values) == expected


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([], "empty"),
        (["1.5"], r"in \(0, 1\], got '1.5'"),
        (["0"], r"in \(0, 1\], got '0'"),
        (["-0.2"], "got '-0.2'"),
        (["nan"], "got 'nan'"),
        (["0.8", "0.8"], "0.8 twice"),
        (["0.5", "0.50"], "0.5 twice"),
        (["x"], "takes numbers"),
    ],
)
def test_thresholds_refused(values: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        run_mod.parse_thresholds(values)
    assert "\n" not in str(info.value)


def test_threshold_is_the_one_element_case() -> None:
    parser = __import__("argparse").ArgumentParser()
    run_mod.add_arguments(parser)
    one = run_mod.config_from_args(parser.parse_args(["--threshold", "0.9", "--no-cache"]))
    many = run_mod.config_from_args(parser.parse_args(["--thresholds", "0.9", "--no-cache"]))
    assert one.thresholds == many.thresholds == (0.9,)
    assert run_mod.config_from_args(parser.parse_args(["--no-cache"])).thresholds == (
        run_mod.DEFAULT_THRESHOLDS
    )
    quick = run_mod.config_from_args(parser.parse_args(["--quick", "--no-cache"]))
    assert quick.thresholds == (0.8,)
    # --quick reuses a default run's cached backbone (and only without --pretrain-steps).
    assert quick.reuse_pretrain == (run_mod.T.PretrainConfig(),)
    assert quick.pretrain.steps < run_mod.T.PretrainConfig().steps
    own = run_mod.config_from_args(
        parser.parse_args(["--quick", "--no-cache", "--pretrain-steps", "7"])
    )
    assert own.reuse_pretrain == () and own.pretrain.steps == 7


def test_torchrun_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "tensorcompress.experiments.cli",
        *TINY, "--layers", "2", "--methods", "vanilla", "asi",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["environment"]["processes"] == 2
    assert "per process x 2 processes" in doc["notes"][0]
    rows = {(r["method"], r["layers"]): r for r in doc["rows"]}
    assert set(rows) == {("vanilla", "2"), ("asi", "2")}
    # 64 samples over 2 processes of 16: 2 steps each; one table printed, by process 0.
    assert rows["asi", "2"]["seeds"][0]["steps"] == 2
    assert proc.stdout.count("acc: top-1") == 1


def test_wsi_and_wasi_rows_on_a_cnn(tmp_path: Path, single_thread: None) -> None:
    assert "wsi" not in run_mod.RunConfig().methods  # on request only
    # Factored steps take a smaller SGD learning rate; AdamW's are left alone.
    lr = run_mod.K.finetune_lr
    assert (lr("wsi", 0.2, "sgd"), lr("asi", 0.2, "sgd"), lr("wasi", 1e-3, "adamw")) == (
        0.2 * run_mod.K.FACTORED_SGD_LR_SCALE,
        0.2,
        1e-3,
    )
    # LoRA's adapters take a larger one.
    assert lr("lora", 1e-3, "adamw") == lr("lora+asi", 1e-3, "adamw") == 4e-3
    config = _tiny(tmp_path, methods=("vanilla", "wsi", "wasi"), thresholds=(0.5, 0.9))
    for method in ("wsi", "wasi"):
        model = get_model(config.model, num_classes=10)
        names = run_mod.T.freeze_for(model, "4", torch.randn(2, 3, 32, 32))
        run_mod._factor(model, method, names, 0.9, 0, config)
        modules = dict(model.named_modules())
        kinds = {n: type(modules[n]).__name__ for n in names}
        grouped = {n for n in names if getattr(modules[n], "groups", 1) > 1}
        # Convs with groups 1 factor; WASI compresses a depthwise conv's input with ASI.
        assert grouped and len(grouped) < len(names), kinds
        for n, kind in kinds.items():
            if n not in grouped:
                assert kind == "WASIConv2d", kinds  # the one factored class, either method
            else:
                assert kind == ("CompressedConv2d" if method == "wasi" else "Conv2d"), kinds
    # --factor smaller: a random initialisation's flat spectra at ε 0.99 give factors
    # larger than the weights, so those convs train dense (WASI: compressed by ASI).
    smaller = dataclasses.replace(config, factor="smaller")
    model = get_model(config.model, num_classes=10)
    names = run_mod.T.freeze_for(model, "4", torch.randn(2, 3, 32, 32))
    every = copy.deepcopy(model)
    run_mod._factor(every, "wasi", names, 0.99, 0, config)
    run_mod._factor(model, "wasi", names, 0.99, 0, smaller)
    larger = [n for n, m in wasi_layers(every).items() if not m.smaller_than_dense]
    assert larger and not set(larger) & set(wasi_layers(model))
    modules = dict(model.named_modules())
    assert all(type(modules[n]).__name__ == "CompressedConv2d" for n in larger)
    assert set(wasi_layers(model)) == set(wasi_layers(every)) - set(larger)
    exp = run_mod.run_experiment(config)
    by = {(r.method, r.threshold): r for r in exp.rows}
    assert set(by) == {("vanilla", None), ("wsi", 0.5), ("wsi", 0.9), ("wasi", 0.5), ("wasi", 0.9)}
    # WASI keeps compressed inputs: less than vanilla's and WSI's (which keeps them whole).
    for t in (0.5, 0.9):
        assert 0 < by["wasi", t].mem_mb < by["wsi", t].mem_mb <= by["vanilla", None].mem_mb


def test_frozen_convs_factored_on_a_cnn(tmp_path: Path, single_thread: None) -> None:
    """``--frozen-threshold`` on a CNN: the convs with groups 1 that run before the
    fine-tuned part become frozen LowRankConv2d layers in their outputs' basis (those
    whose factors are smaller); depthwise convs and the trained part are left alone."""
    config = _tiny(tmp_path, methods=("vanilla", "wasi"), frozen_threshold=0.5)
    train, _, _ = run_mod._target_data(config)
    env = run_mod.T.init_distributed("cpu")
    model = get_model(config.model, num_classes=train.num_classes)
    example = run_mod.D.to_input(train.images[:2], "cpu")
    trained = set(run_mod.K.trained_modules(model, "2", example, blocks=False))
    modules = dict(model.named_modules())
    order = run_mod.execution_order(model, example)
    before = [
        n
        for n in order
        if n not in trained and isinstance(modules[n], nn.Conv2d) and modules[n].groups == 1
    ]
    batches = run_mod._budget_batches(train, config, 0, env)
    grams = output_grams(copy.deepcopy(model), batches, before)
    expected = factor_by_outputs(copy.deepcopy(model), grams, 0.5)
    frozen = run_mod._factor_frozen(model, "2", train, 0, config, example, env)
    assert frozen["layers"] == before and frozen["threshold"] == 0.5
    assert frozen["ranks"] == expected
    assert frozen["ranks"], "a random init at 0.5 of the outputs factors some convs"
    after = dict(model.named_modules())
    for name in before:
        layer = after[name]
        if name in frozen["ranks"]:
            assert isinstance(layer, LowRankConv2d) and layer.rank == frozen["ranks"][name]
            assert not layer.left.requires_grad and not layer.right.requires_grad
        else:
            assert type(layer) is nn.Conv2d
    assert all(type(after[n]) is type(modules[n]) for n in trained)
    depthwise = [
        n for n, m in modules.items() if isinstance(m, nn.Conv2d) and m.groups > 1 and n in order
    ]
    assert depthwise and all(type(after[n]) is nn.Conv2d for n in depthwise)
    exp = run_mod.run_experiment(config)
    by = {r["method"]: r for r in exp.results}
    # The run's backbone is pretrained, so its ranks are its own.
    run_frozen = by["wasi"]["frozen_factors"]
    assert run_frozen["layers"] == before and set(run_frozen["ranks"]) <= set(before)
    assert not by["wasi"]["replayed_prefix"] and "frozen_factors" not in by["vanilla"]
