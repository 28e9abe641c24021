"""``tensorcompress run``: end to end on tiny settings, reproducibility, bad input, torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tensorcompress.experiments import report as R
from tensorcompress.experiments import run as run_mod
from tensorcompress.experiments.cli import main
from tensorcompress.models import get_model
from tensorcompress.torch import METHODS

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
    for label in ("vanilla", "gradient filter R2", "HOSVD ε=0.8", "SVD ε=0.8", "ASI"):
        assert label in stdout
    assert sorted(p.name for p in first.iterdir()) == sorted(R.FILES)
    for png in ("accuracy_vs_memory.png", "accuracy_vs_gflops.png"):
        assert (first / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (first / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 6 and csv_lines[0].startswith("method,label,layers,accuracy")

    doc = json.loads((first / "results.json").read_text())
    assert [p["cached"] for p in doc["pretraining"]] == [False]
    rows = _rows(first)
    assert set(rows) == {("vanilla", "all")} | {(m, "2") for m in METHODS}
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
        "no cuda": ["--device", "cuda:99"]
        if not torch.cuda.is_available()
        else ["--device", "tpu"],
    }


BAD_CASES = [
    "missing data", "one class", "npz without y", "mismatched weights", "unreadable weights",
    "missing weights", "unknown method", "unknown model", "out is a file", "out under a file",
    "all layers only", "bad layers", "bad threshold", "no cuda",
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
    with pytest.raises(ValueError, match="unknown method"):
        run_mod.RunConfig(methods=("vanilla", "nope"))
    with pytest.raises(ValueError, match="vanilla only"):
        run_mod.RunConfig(methods=("asi",), layers=("all",))
    cfg = run_mod.RunConfig(methods=("asi", "vanilla"), layers=("all", "2", "2"))
    assert cfg.rows() == [("asi", "2"), ("vanilla", "all"), ("vanilla", "2")]


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
