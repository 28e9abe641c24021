"""The Llama memory table: formulas equal to a measured step of the reduced-width model."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import pytest

from tensorcompress.experiments import transformer_table as TT
from tensorcompress.experiments.cli import main
from tensorcompress.models import LlamaShape, tinyllama_1b
from tensorcompress.torch.measure import MB
from tensorcompress.torch.measure.training import KINDS

pytestmark = pytest.mark.usefixtures("single_thread")


def small(num_layers: int = 3, **fields: int) -> LlamaShape:
    """TinyLlama's blocks at width / 8 (as tiny_llama builds them), a small vocabulary."""
    return replace(tinyllama_1b().narrowed(8), num_layers=num_layers, vocab_size=256, **fields)


# ---------------------------------------------------------------------------
# Analytic == measured, to the byte, where it must be
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["vanilla", "asi"])
def test_formulas_equal_a_measured_step(method: str, attention: str) -> None:
    shape = small()
    ranks = TT.asi_ranks(shape, 2, 12, (0.5, 0.25, 0.125)) if method == "asi" else None
    check = TT.check_llama_memory(
        shape, batch=2, seq=12, blocks=2, method=method, attention=attention, ranks=ranks
    )
    assert check.pairs() and check.equal, TT.format_check([check])
    # Every kind the formulas name is one the measurement saw, and the other way round.
    kinds = {k for k, b in check.analytic.activations_by_kind if b}
    assert kinds == {k for k, b in check.measured.activations_by_kind if b}
    assert ("compressed" in kinds) == (method == "asi")


def test_every_block_and_sgd() -> None:
    """All blocks trained (the embedding stays frozen), SGD's one momentum buffer."""
    shape = small(num_layers=2)
    check = TT.check_llama_memory(shape, batch=3, seq=5, blocks=2, optimizer="sgd")
    assert check.equal, TT.format_check([check])
    assert check.analytic.optimizer_bytes == check.analytic.gradients_bytes


def test_grouped_query_heads_off() -> None:
    """As many key/value heads as query heads: no repetition, the same formulas."""
    shape = small(num_kv_heads=32)
    for attention in ("sdpa", "eager"):
        check = TT.check_llama_memory(shape, batch=2, seq=6, blocks=1, attention=attention)
        assert check.equal, TT.format_check([check])


# ---------------------------------------------------------------------------
# TinyLlama-1.1B's own figures
# ---------------------------------------------------------------------------


def test_tinyllama_state() -> None:
    shape = tinyllama_1b()
    mem = TT.llama_memory(shape, batch=8, seq=512, blocks=2)
    assert mem.weights_bytes == 4 * 1_100_048_384
    block = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048
    trained = 2 * block + 2048 + 32000 * 2048
    assert mem.gradients_bytes == 4 * trained
    assert mem.optimizer_bytes == 8 * trained + 4 * (2 * 9 + 2)  # moments and step counters


def test_tinyllama_saved_tensors() -> None:
    B, T, h, m, V = 8, 512, 2048, 5632, 32000
    van = TT.llama_memory(tinyllama_1b(), batch=B, seq=T, blocks=4)
    assert van.kind_bytes("layer_input") == 4 * (4 * B * T * (3 * h + m) + B * T * h)
    assert van.kind_bytes("activation") == 4 * 4 * B * T * m
    assert van.kind_bytes("other") == 4 * (4 * 2 * B * T * m) + 4 * B * T * V + 8 * B * T + 4
    eager = TT.llama_memory(tinyllama_1b(), batch=B, seq=T, blocks=4, attention="eager")
    probs = 4 * B * 32 * T * T
    assert eager.kind_bytes("attention") - van.kind_bytes("attention") > 4 * probs * 0.9
    asi = TT.llama_memory(tinyllama_1b(), batch=B, seq=T, blocks=4, method="asi")
    assert asi.kind_bytes("layer_input") == 4 * B * T * h  # the LM head's input only
    r = asi.ranks["down"]
    assert r == (4, 128, 704)
    down = 4 * (math.prod(r) + B * r[0] + T * r[1] + m * r[2])
    assert any(t.nbytes == down and t.kind == "compressed" for t in asi.tensors)
    assert asi.activations_bytes < van.activations_bytes
    # SDPA's output is o_proj's input: compressing o_proj frees nothing there.
    assert asi.kind_bytes("attention") == van.kind_bytes("attention") + 4 * 4 * B * T * h
    assert set(dict(asi.activations_by_kind)) == set(KINDS)


def test_rows_and_output() -> None:
    rows, checks = TT.run("tinyllama-1.1b", layers=[1, 2], check_seq=0)
    assert [(r.blocks, r.method) for r in rows] == [
        (1, "vanilla"),
        (1, "asi"),
        (2, "vanilla"),
        (2, "asi"),
    ]
    assert checks == []
    text = TT.format_table(rows, ["a note"])
    assert (
        text.startswith("a note") and "ASI" in text and f"{rows[0].weights_bytes / MB:.0f}" in text
    )
    assert "log-softmax" in TT.format_tensors(rows[0])
    assert TT.is_llama_model("TinyLlama-1.1B") and not TT.is_llama_model("resnet18")


def test_table_command(capsys: pytest.CaptureFixture[str]) -> None:
    """``tensorcompress table --model tinyllama-1.1b`` prints the table and the measured check."""
    # A short check: the width/8 model has 22 blocks and TinyLlama's vocabulary.
    args = ["table", "--model", "TinyLlama-1.1B", "--layers", "1", "--batch", "2"]
    assert main([*args, "--check-seq", "4", "--tensors"]) == 0
    out = capsys.readouterr().out
    assert out.count("equal to the byte") == 2
    assert "batch 2 x 512 tokens" in out and "log-softmax" in out


def test_alone_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    TT.add_arguments(parser)
    assert TT.main(parser.parse_args(["--check-seq", "0", "--json"])) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["blocks"] for r in doc["rows"]] == [2, 2, 4, 4] and doc["checks"] == []
    assert doc["rows"][0]["batch"] == 8 and doc["rows"][0]["seq"] == 512


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blocks": 23}, "blocks=23"),
        ({"blocks": 0}, "blocks must be"),
        ({"method": "lora"}, "method must be"),
        ({"attention": "flash"}, "attention must be"),
        ({"optimizer": "adam"}, "optimizer must be"),
        ({"method": "asi", "ranks": {"qkv": (1, 1, 1)}}, "entry for 'o'"),
        (
            {"method": "asi", "ranks": dict.fromkeys(("qkv", "o", "gate_up", "down"), (9, 1, 1))},
            "within",
        ),
    ],
)
def test_errors(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"batch": 8, "seq": 16, "blocks": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        TT.llama_memory(tinyllama_1b(), **args)  # type: ignore[arg-type]


def test_rank_fraction_errors() -> None:
    with pytest.raises(ValueError, match="3 numbers"):
        TT.asi_ranks(tinyllama_1b(), 8, 16, (0.5, 0.5))
    with pytest.raises(ValueError, match="3 numbers"):
        TT.asi_ranks(tinyllama_1b(), 8, 16, (0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="unknown Llama model"):
        TT.run("llama-70b", check_seq=0)
