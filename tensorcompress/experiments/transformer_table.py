"""``tensorcompress table --model tinyllama-1.1b``: the memory of fine-tuning a Llama's last blocks.

TinyLlama-1.1B cannot be trained on a laptop CPU, but the memory of one of its
fine-tuning steps follows from its shape: :func:`llama_memory` adds up, by
formula, everything a float32 training step of the last ``N`` decoder blocks
holds (Hugging Face's ``LlamaForCausalLM``, language-modelling loss on the
batch's own tokens):

- the **weights** and buffers of the whole model, the **gradients** of what
  trains and the **optimizer state** (AdamW: two moments per trained
  parameter and a step counter per trained tensor; SGD: one momentum).
  What trains is the adapter's freeze rule
  (:func:`tensorcompress.torch.transformer.prepare`): the ``N`` blocks and
  everything that runs after them (final norm, LM head);
- every tensor autograd **saves for backward** in the forward, one
  :class:`SavedTensor` each with its formula, by the kind of module that
  saves it (:data:`tensorcompress.torch.measure.training.KINDS`): the Linear
  inputs (or, with ASI, the Tucker factors kept instead), the attention
  tensors, the RMSNorm tensors, the SiLU input, and the rest (the gated
  product's operands, the loss's log-softmax).

The same formulas hold for any :class:`~tensorcompress.models.LlamaShape`,
so they are checked (:func:`check_llama_memory`, and a test) against a
measured step (:func:`~tensorcompress.torch.measure.training_memory`) of the
reduced-width model of the family (:func:`~tensorcompress.models.tiny_llama`:
TinyLlama's blocks with every width divided by 8) at a short sequence: the
weights, gradients, optimizer state and saved bytes of every kind are equal
to the byte. The peak over forward and backward is not a sum of formulas
(transients, allocator); the check prints the measured one beside.

Symbols: B batch, T sequence length, h hidden size, m intermediate size,
H query heads, H_kv key/value heads, d = h / H head width, V vocabulary,
f = 4 bytes (float32). Attention ``"sdpa"`` is the PyTorch CPU kernel
(:func:`torch.nn.functional.scaled_dot_product_attention`, grouped-query
heads without repetition, no padding mask): it keeps q, k, v, its output
(which is ``o_proj``'s input) and one float32 log-sum-exp per row. CUDA
kernels keep the same tensors, plus a random-number seed and offset.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tensorcompress.models import LlamaShape, tinyllama_1b
from tensorcompress.torch.measure import MB, TrainingMemory, training_memory
from tensorcompress.torch.measure.training import KINDS

__all__ = [
    "DEFAULT_RANK_FRACTIONS",
    "LLAMA_MODELS",
    "METHODS",
    "CheckResult",
    "LlamaMemory",
    "SavedTensor",
    "add_arguments",
    "add_llama_arguments",
    "asi_ranks",
    "check_llama_memory",
    "format_check",
    "format_table",
    "format_tensors",
    "is_llama_model",
    "llama_memory",
    "main",
    "measure_llama_memory",
]

LLAMA_MODELS: dict[str, LlamaShape] = {
    "tinyllama_1.1b": tinyllama_1b(),
    "tinyllama_1b": tinyllama_1b(),
    "tinyllama": tinyllama_1b(),
}
"""Names ``tensorcompress table --model`` reads as a Llama shape (``-`` is read as ``_``)."""

METHODS = ("vanilla", "asi")
"""Methods of the analytic table: plain autograd, and ASI on every Linear input of the blocks."""

ATTENTIONS = ("sdpa", "eager")
OPTIMIZERS = ("adamw", "sgd")

DEFAULT_RANK_FRACTIONS: tuple[float, float, float] = (0.5, 0.25, 0.125)
"""ASI's ranks of a ``(B, T, C)`` Linear input as fractions of each mode (batch,
tokens, channels), rounded up. The ranks ASI kept in the ViT-Tiny run of
``tensorcompress run --model vit_tiny`` at its recommended threshold are at or
below these fractions in every layer (see the transformers guide)."""


def is_llama_model(name: str) -> bool:
    """Whether ``name`` is one of :data:`LLAMA_MODELS` (case-insensitive, ``-`` as ``_``)."""
    return name.lower().replace("-", "_") in LLAMA_MODELS


# ---------------------------------------------------------------------------
# The formulas
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedTensor:
    """One tensor (or group of tensors) a training forward keeps for backward.

    Attributes
    ----------
    name : str
        What it is (``"q/k/v input"``, ``"attention: log-sum-exp"``...).
    kind : str
        The kind of module that saves it (:data:`~tensorcompress.torch.measure.training.KINDS`).
    nbytes : int
        Bytes of one occurrence.
    count : int
        Occurrences in the step (blocks that keep it).
    formula : str
        ``nbytes`` in the module docstring's symbols.
    """

    name: str
    kind: str
    nbytes: int
    count: int
    formula: str

    @property
    def total_bytes(self) -> int:
        """``nbytes * count``."""
        return self.nbytes * self.count


@dataclass(frozen=True)
class LlamaMemory:
    """Memory of one training step of a Llama's last blocks, by formula.

    Attributes
    ----------
    shape : LlamaShape
        The model.
    batch, seq, blocks : int
        Batch size B, sequence length T, fine-tuned last blocks N.
    method, attention, optimizer : str
        See :func:`llama_memory`.
    ranks : dict
        ASI's ranks per Linear input (``"qkv"``, ``"o"``, ``"gate_up"``,
        ``"down"``), empty for vanilla.
    weights_bytes, buffers_bytes, gradients_bytes, optimizer_bytes : int
        The model's parameters and buffers, the trained parameters'
        gradients and the optimizer's state tensors.
    tensors : tuple of SavedTensor
        What the forward saves for backward.
    """

    shape: LlamaShape
    batch: int
    seq: int
    blocks: int
    method: str
    attention: str
    optimizer: str
    ranks: Mapping[str, tuple[int, int, int]]
    weights_bytes: int
    buffers_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    tensors: tuple[SavedTensor, ...] = field(default=())

    @property
    def activations_by_kind(self) -> tuple[tuple[str, int], ...]:
        """Saved bytes per kind (every kind of ``training.KINDS``, in its order)."""
        totals = dict.fromkeys(KINDS, 0)
        for t in self.tensors:
            totals[t.kind] += t.total_bytes
        return tuple(totals.items())

    @property
    def activations_bytes(self) -> int:
        """Everything saved for backward."""
        return sum(t.total_bytes for t in self.tensors)

    @property
    def state_bytes(self) -> int:
        """Weights, buffers, gradients and optimizer state."""
        return self.weights_bytes + self.buffers_bytes + self.gradients_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        """``state_bytes + activations_bytes``: held when the forward ends (the peak is more)."""
        return self.state_bytes + self.activations_bytes

    def kind_bytes(self, kind: str) -> int:
        """Saved bytes of one kind."""
        return dict(self.activations_by_kind)[kind]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (MB = 2**20 bytes)."""
        return {
            "model": {
                "hidden_size": self.shape.hidden_size,
                "num_layers": self.shape.num_layers,
                "intermediate_size": self.shape.intermediate_size,
                "vocab_size": self.shape.vocab_size,
            },
            "batch": self.batch,
            "seq": self.seq,
            "blocks": self.blocks,
            "method": self.method,
            "attention": self.attention,
            "optimizer": self.optimizer,
            "ranks": {k: list(v) for k, v in self.ranks.items()},
            "weights_mb": self.weights_bytes / MB,
            "buffers_mb": self.buffers_bytes / MB,
            "gradients_mb": self.gradients_bytes / MB,
            "optimizer_mb": self.optimizer_bytes / MB,
            "activations_mb": self.activations_bytes / MB,
            "activations_by_kind_mb": {k: b / MB for k, b in self.activations_by_kind},
            "total_mb": self.total_bytes / MB,
            "tensors": [
                {
                    "name": t.name,
                    "kind": t.kind,
                    "bytes": t.nbytes,
                    "count": t.count,
                    "formula": t.formula,
                }
                for t in self.tensors
            ],
        }


def _check_int(value: Any, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _linear_inputs(shape: LlamaShape) -> dict[str, int]:
    """Channels of each distinct Linear input of a block (q/k/v and gate/up share theirs)."""
    return {
        "qkv": shape.hidden_size,
        "o": shape.hidden_size,
        "gate_up": shape.hidden_size,
        "down": shape.intermediate_size,
    }


def asi_ranks(
    shape: LlamaShape,
    batch: int,
    seq: int,
    fractions: Sequence[float] = DEFAULT_RANK_FRACTIONS,
) -> dict[str, tuple[int, int, int]]:
    """ASI's ranks of each Linear input of a block, ``ceil(fraction * size)`` per mode.

    Parameters
    ----------
    shape : LlamaShape
        The model.
    batch, seq : int
        B and T.
    fractions : sequence of 3 floats in (0, 1]
        Batch, token and channel fractions.

    Returns
    -------
    dict
        ``"qkv"``, ``"o"``, ``"gate_up"``, ``"down"`` to ``(r_B, r_T, r_C)``.

    Examples
    --------
    >>> from tensorcompress.models import tinyllama_1b
    >>> asi_ranks(tinyllama_1b(), 8, 512)["down"]
    (4, 128, 704)
    """
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or not all(0.0 < f <= 1.0 for f in fr):
        raise ValueError(
            "rank fractions must be 3 numbers in (0, 1] (batch, tokens, channels), "
            f"got {fractions!r}"
        )
    return {
        name: (
            math.ceil(fr[0] * batch),
            math.ceil(fr[1] * seq),
            math.ceil(fr[2] * channels),
        )
        for name, channels in _linear_inputs(shape).items()
    }


def _tucker(n: tuple[int, int, int], r: tuple[int, int, int]) -> int:
    """Elements of a Tucker form: the core and one factor per mode."""
    return math.prod(r) + sum(a * b for a, b in zip(n, r))


def llama_memory(
    shape: LlamaShape,
    *,
    batch: int,
    seq: int,
    blocks: int,
    method: str = "vanilla",
    attention: str = "sdpa",
    optimizer: str = "adamw",
    ranks: Mapping[str, Sequence[int]] | None = None,
) -> LlamaMemory:
    """The memory of one float32 training step of the last ``blocks`` blocks, by formula.

    Parameters
    ----------
    shape : LlamaShape
        The model (:func:`~tensorcompress.models.tinyllama_1b`, or any other).
    batch, seq : int
        Batch size B and sequence length T (no padding).
    blocks : int
        Fine-tuned last blocks N (1 to ``shape.num_layers``).
    method : {"vanilla", "asi"}
        ``"asi"``: every Linear of the blocks keeps a Tucker form of its input
        (q/k/v share one, gate/up one) instead of the input.
    attention : {"sdpa", "eager"}
        ``"eager"`` keeps the ``B x H x T x T`` probabilities and repeated
        keys and values; ``"sdpa"`` keeps q, k, v, its output and a
        log-sum-exp per row (see the module docstring).
    optimizer : {"adamw", "sgd"}
        AdamW (two moments and a float32 step per trained tensor) or SGD with
        momentum (one buffer).
    ranks : mapping, optional
        ASI's ``(r_B, r_T, r_C)`` for ``"qkv"``, ``"o"``, ``"gate_up"`` and
        ``"down"``; by default :func:`asi_ranks` with
        :data:`DEFAULT_RANK_FRACTIONS`.

    Returns
    -------
    LlamaMemory

    Examples
    --------
    >>> from tensorcompress.models import tinyllama_1b
    >>> mem = llama_memory(tinyllama_1b(), batch=8, seq=512, blocks=2)
    >>> mem.weights_bytes == 4 * tinyllama_1b().num_parameters()
    True
    >>> round(mem.kind_bytes("layer_input") / 2**20)  # 2 x (3 x 32 + 88) + 32 MB
    400
    """
    B = _check_int(batch, "batch")
    T = _check_int(seq, "seq")
    N = _check_int(blocks, "blocks")
    if shape.num_layers < N:
        raise ValueError(f"blocks={N} but the model has {shape.num_layers} blocks")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    f = 4
    h, m, V = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    H, Hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    BT = B * T

    # The state.
    block_params = sum(i * o for i, o in shape.linear_shapes().values()) + 2 * h
    head_params = 0 if shape.tie_word_embeddings else V * h
    trained = N * block_params + h + (V * h)  # blocks, final norm, LM head (shared when tied)
    trained_tensors = N * (len(shape.linear_shapes()) + 2) + 2
    weights = f * shape.num_parameters()
    buffers = f * 2 * (d // 2)  # RoPE inverse frequencies and their original copy
    gradients = f * trained
    opt = (2 * f * trained + f * trained_tensors) if optimizer == "adamw" else f * trained
    del head_params

    chosen: dict[str, tuple[int, int, int]] = {}
    if method == "asi":
        given = asi_ranks(shape, B, T) if ranks is None else ranks
        for name, channels in _linear_inputs(shape).items():
            if name not in given:
                raise ValueError(f"ranks needs an entry for {name!r}, got {sorted(given)}")
            r = tuple(int(x) for x in given[name])
            if len(r) != 3 or not all(1 <= a <= n for a, n in zip(r, (B, T, channels))):
                raise ValueError(
                    f"ranks[{name!r}] must be 3 ints within (B, T, C) = {(B, T, channels)}, "
                    f"got {given[name]!r}"
                )
            chosen[name] = (r[0], r[1], r[2])

    t: list[SavedTensor] = []

    def add(name: str, kind: str, nbytes: int, count: int, formula: str) -> None:
        if count > 0 and nbytes > 0:
            t.append(SavedTensor(name, kind, nbytes, count, formula))

    def linear_input(key: str, label: str, channels: int, sym: str) -> None:
        if method == "vanilla":
            add(f"{label} input", "layer_input", BT * channels * f, N, f"B·T·{sym}·f")
        else:
            r = chosen[key]
            add(
                f"{label} input, Tucker form",
                "compressed",
                _tucker((B, T, channels), r) * f,
                N,
                f"(r_B·r_T·r_C + B·r_B + T·r_T + {sym}·r_C)·f, r = {r}",
            )

    # The first trained block's input needs no gradient: its RMSNorm keeps
    # only the normalised tensor that multiplies its weight.
    add("input RMSNorm: normalised input", "norm", BT * h * f, N, "B·T·h·f")
    add("input RMSNorm: input, 1/rms", "norm", (BT * h + BT) * f, N - 1, "(B·T·h + B·T)·f")
    linear_input("qkv", "q/k/v (one shared)", h, "h")
    add("RoPE cos and sin (all blocks)", "attention", 2 * T * d * f, 1, "2·T·d·f")
    if attention == "eager":
        add("attention: q, repeated k and v", "attention", 3 * BT * h * f, N, "3·B·T·h·f")
        add("attention: probabilities", "attention", B * H * T * T * f, N, "B·H·T²·f")
        linear_input("o", "o_proj", h, "h")
    else:
        add("attention: q", "attention", BT * h * f, N, "B·T·h·f")
        add("attention: k, v", "attention", 2 * BT * Hkv * d * f, N, "2·B·T·H_kv·d·f")
        add("attention: log-sum-exp", "attention", B * H * T * f, N, "B·H·T·f")
        if method == "vanilla":
            add("o_proj input (= SDPA's output)", "layer_input", BT * h * f, N, "B·T·h·f")
        else:
            add("attention: output (o_proj's input)", "attention", BT * h * f, N, "B·T·h·f")
            linear_input("o", "o_proj", h, "h")
    add(
        "post-attention RMSNorm: input, normalised, 1/rms",
        "norm",
        (2 * BT * h + BT) * f,
        N,
        "(2·B·T·h + B·T)·f",
    )
    linear_input("gate_up", "gate/up (one shared)", h, "h")
    add("SiLU input (gate output)", "activation", BT * m * f, N, "B·T·m·f")
    add("SiLU output and up output", "other", 2 * BT * m * f, N, "2·B·T·m·f")
    linear_input("down", "down_proj", m, "m")
    add(
        "final RMSNorm: input, normalised, 1/rms",
        "norm",
        (2 * BT * h + BT) * f,
        1,
        "(2·B·T·h + B·T)·f",
    )
    add("LM head input", "layer_input", BT * h * f, 1, "B·T·h·f")
    add("loss: log-softmax of the logits", "other", BT * V * 4, 1, "B·T·V·4")
    add("loss: targets (int64), total weight", "other", BT * 8 + 4, 1, "B·T·8 + 4")

    return LlamaMemory(
        shape=shape,
        batch=B,
        seq=T,
        blocks=N,
        method=method,
        attention=attention,
        optimizer=optimizer,
        ranks=chosen,
        weights_bytes=weights,
        buffers_bytes=buffers,
        gradients_bytes=gradients,
        optimizer_bytes=opt,
        tensors=tuple(t),
    )


# ---------------------------------------------------------------------------
# The measured check
# ---------------------------------------------------------------------------


def _layer_ranks(
    names: Sequence[str], ranks: Mapping[str, tuple[int, int, int]]
) -> dict[str, tuple[int, int, int]]:
    """Per-layer rank dict for ``convert`` from the per-input ranks."""
    by_suffix = {
        "q_proj": "qkv",
        "k_proj": "qkv",
        "v_proj": "qkv",
        "o_proj": "o",
        "gate_proj": "gate_up",
        "up_proj": "gate_up",
        "down_proj": "down",
    }
    return {n: ranks[by_suffix[n.rsplit(".", 1)[-1]]] for n in names}


def measure_llama_memory(
    shape: LlamaShape,
    *,
    batch: int,
    seq: int,
    blocks: int,
    method: str = "vanilla",
    attention: str = "sdpa",
    optimizer: str = "adamw",
    ranks: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> TrainingMemory:
    """Measure the step :func:`llama_memory` describes on a model of ``shape``.

    Builds a randomly initialised ``LlamaForCausalLM`` of ``shape``, prepares
    it with :func:`tensorcompress.torch.transformer.prepare` (``method`` on
    the last ``blocks`` blocks, ``attention``; ASI with the ranks of
    :func:`asi_ranks` per layer) and measures one step on random tokens
    (labels = the tokens) with
    :func:`~tensorcompress.torch.measure.training_memory`. Use a small shape
    (:func:`~tensorcompress.models.tiny_llama`'s): it really runs.
    """
    from transformers import LlamaForCausalLM

    from tensorcompress.torch import last_blocks, select_layers
    from tensorcompress.torch.transformer import BlockOptions, prepare

    analytic = llama_memory(
        shape,
        batch=batch,
        seq=seq,
        blocks=blocks,
        method=method,
        attention=attention,
        optimizer=optimizer,
        ranks=ranks,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llama = LlamaForCausalLM(shape.to_config())
        ids = torch.randint(0, shape.vocab_size, (batch, seq))
    llama.set_attn_implementation(attention)
    example = {"input_ids": ids, "labels": ids}
    options = BlockOptions(attention=attention)
    if method == "asi":
        names = select_layers(llama, last_blocks(blocks), example)
        options = replace(options, rank=_layer_ranks(names, analytic.ranks))
    model = prepare(llama, method, blocks, example_input=example, options=options)
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (
        torch.optim.AdamW(params, lr=1e-4)
        if optimizer == "adamw"
        else torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    )
    return training_memory(model, example, opt, attribute=False)


@dataclass(frozen=True)
class CheckResult:
    """Analytic against measured figures of one configuration.

    Attributes
    ----------
    analytic : LlamaMemory
        The formulas.
    measured : TrainingMemory
        The measured step.
    """

    analytic: LlamaMemory
    measured: TrainingMemory

    def pairs(self) -> list[tuple[str, int, int]]:
        """``(figure, analytic bytes, measured bytes)`` for every figure that must be equal."""
        a, m = self.analytic, self.measured
        out = [
            ("weights", a.weights_bytes, m.weights_bytes),
            ("buffers", a.buffers_bytes, m.buffers_bytes),
            ("gradients", a.gradients_bytes, m.gradients_bytes),
            ("optimizer", a.optimizer_bytes, m.optimizer_bytes),
        ]
        measured_kinds = dict(m.activations_by_kind)
        out += [(k, b, measured_kinds[k]) for k, b in a.activations_by_kind]
        out.append(("saved", a.activations_bytes, m.activations_bytes))
        return out

    @property
    def equal(self) -> bool:
        """Every figure of :meth:`pairs` equal to the byte."""
        return all(x == y for _, x, y in self.pairs())


def check_llama_memory(
    shape: LlamaShape,
    *,
    batch: int,
    seq: int,
    blocks: int,
    method: str = "vanilla",
    attention: str = "sdpa",
    optimizer: str = "adamw",
    ranks: Mapping[str, Sequence[int]] | None = None,
) -> CheckResult:
    """:func:`llama_memory` beside :func:`measure_llama_memory` for the same arguments."""
    kwargs: dict[str, Any] = {
        "batch": batch,
        "seq": seq,
        "blocks": blocks,
        "method": method,
        "attention": attention,
        "optimizer": optimizer,
        "ranks": ranks,
    }
    return CheckResult(llama_memory(shape, **kwargs), measure_llama_memory(shape, **kwargs))


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _label(mem: LlamaMemory) -> str:
    return "vanilla" if mem.method == "vanilla" else "ASI"


_KIND_HEADS = (
    ("layer_input", "Linear in"),
    ("compressed", "ASI"),
    ("attention", "attn"),
    ("norm", "norm"),
    ("activation", "act"),
    ("other", "other"),
)


def format_table(rows: Sequence[LlamaMemory], notes: Sequence[str] = ()) -> str:
    """The analytic rows as aligned text (MB = 2**20 bytes), notes above, legend below."""
    head: tuple[str, ...] = ("N", "method", "weights", "grads", "optim")
    head += (*(h for _, h in _KIND_HEADS), "saved", "total")
    body = []
    for r in rows:
        kinds = dict(r.activations_by_kind)
        body.append(
            (
                str(r.blocks),
                _label(r),
                f"{r.weights_bytes / MB:.0f}",
                f"{r.gradients_bytes / MB:.0f}",
                f"{r.optimizer_bytes / MB:.0f}",
                *(f"{kinds[k] / MB:.1f}" for k, _ in _KIND_HEADS),
                f"{r.activations_bytes / MB:.0f}",
                f"{r.total_bytes / MB:.0f}",
            )
        )
    widths = [max(len(line[k]) for line in [head, *body]) for k in range(len(head))]

    def fmt(line: Sequence[str]) -> str:
        cells = [f"{line[0]:>{widths[0]}}", f"{line[1]:<{widths[1]}}"]
        cells += [f"{c:>{w}}" for c, w in zip(line[2:], widths[2:])]
        return "  ".join(cells)

    lines = [*notes, "", fmt(head), "-" * len(fmt(head)), *(fmt(b) for b in body)]
    lines += [
        "",
        "MB = 2**20 bytes, float32. weights: the whole model (and its RoPE buffers); grads, "
        "optim: of what trains (the last N blocks, the final norm and the LM head).",
        "Saved for backward, by the kind of module that keeps it: Linear in = inputs of the "
        "blocks' Linears and the LM head; ASI = the Tucker factors kept instead; attn = q, k, v, "
        "SDPA's log-sum-exp (eager: the probabilities), RoPE cos/sin; norm = RMSNorm inputs, "
        "normalised tensors and 1/rms; act = SiLU input; other = the gated product's operands "
        "and the loss's log-softmax (B·T·V floats). total = state + saved: what is held at the "
        "end of the forward; the peak adds the backward's transients.",
    ]
    return "\n".join(lines)


def format_tensors(mem: LlamaMemory) -> str:
    """Every saved tensor of ``mem`` with its formula, count and size."""
    rows = [
        (t.name, t.kind, t.formula, str(t.count), f"{t.total_bytes / MB:.2f}") for t in mem.tensors
    ]
    head = ("tensor", "kind", "bytes each", "count", "MB")
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]

    def fmt(line: Sequence[str]) -> str:
        return "  ".join(
            f"{c:<{w}}" if k < 3 else f"{c:>{w}}" for k, (c, w) in enumerate(zip(line, widths))
        )

    return "\n".join([fmt(head), "-" * len(fmt(head)), *(fmt(r) for r in rows)])


def format_check(checks: Sequence[CheckResult]) -> str:
    """Analytic and measured bytes of each check, and whether they are equal."""
    lines = []
    for c in checks:
        a = c.analytic
        verdict = "equal to the byte" if c.equal else "DIFFERENT"
        lines.append(
            f"{_label(a)}, N={a.blocks}, B={a.batch}, T={a.seq}, {a.attention}: analytic "
            f"{verdict} to the measured step ({c.measured.activations_bytes / MB:.3f} MB saved; "
            f"measured peak {c.measured.peak_bytes / MB:.2f} MB, analytic state + saved "
            f"{a.total_bytes / MB:.2f} MB)"
        )
        for name, x, y in c.pairs():
            if x != y:
                lines.append(f"  {name}: analytic {x} B, measured {y} B")
    return "\n".join(lines)


def add_llama_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """The Llama table's own arguments (``tensorcompress table`` adds them in a group)."""
    parser.add_argument("--seq", type=int, default=512, help="Llama: sequence length (512)")
    parser.add_argument(
        "--attention", choices=ATTENTIONS, default="sdpa", help="Llama: attention (sdpa)"
    )
    parser.add_argument(
        "--optimizer", choices=OPTIMIZERS, default="adamw", help="Llama: optimizer (adamw)"
    )
    parser.add_argument(
        "--rank-fractions",
        type=float,
        nargs=3,
        default=list(DEFAULT_RANK_FRACTIONS),
        metavar=("BATCH", "TOKENS", "CHANNELS"),
        help="Llama: ASI ranks as fractions of each mode "
        f"({' '.join(f'{x:g}' for x in DEFAULT_RANK_FRACTIONS)})",
    )
    parser.add_argument(
        "--check-seq",
        type=int,
        default=32,
        help="Llama: tokens of the measured check on the width/8 model (32; 0: none)",
    )
    parser.add_argument("--tensors", action="store_true", help="Llama: list every saved tensor")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the Llama table alone (``tensorcompress table`` has its own, and these)."""
    parser.add_argument("--model", default="tinyllama-1.1b", help="tinyllama-1.1b")
    parser.add_argument("--batch", type=int, default=None, help="batch size (8)")
    parser.add_argument(
        "--layers", type=int, nargs="+", default=[2, 4], help="numbers of fine-tuned last blocks"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_llama_arguments(parser)


def run(
    model: str = "tinyllama-1.1b",
    *,
    batch: int = 8,
    seq: int = 512,
    layers: Sequence[int] = (2, 4),
    attention: str = "sdpa",
    optimizer: str = "adamw",
    rank_fractions: Sequence[float] = DEFAULT_RANK_FRACTIONS,
    check_seq: int = 32,
) -> tuple[list[LlamaMemory], list[CheckResult]]:
    """The analytic rows (each N, vanilla and ASI) and the measured checks.

    The checks run on the model's width/8 twin (:meth:`LlamaShape.narrowed`,
    as :func:`~tensorcompress.models.tiny_llama` builds it) with the same
    blocks, batch and rank fractions, at ``check_seq`` tokens, for the
    smallest N; ``check_seq=0`` skips them.
    """
    key = model.lower().replace("-", "_")
    if key not in LLAMA_MODELS:
        raise ValueError(
            f"unknown Llama model {model!r}; valid names are: {', '.join(LLAMA_MODELS)}"
        )
    shape = LLAMA_MODELS[key]
    depths = [_check_int(n, "--layers") for n in layers]
    if not depths:
        raise ValueError("--layers is empty; give numbers of fine-tuned last blocks")
    rows = [
        llama_memory(
            shape,
            batch=batch,
            seq=seq,
            blocks=n,
            method=method,
            attention=attention,
            optimizer=optimizer,
            ranks=asi_ranks(shape, batch, seq, rank_fractions) if method == "asi" else None,
        )
        for n in depths
        for method in METHODS
    ]
    checks = []
    if check_seq:
        small = shape.narrowed(8)
        n = min(depths)
        for method in METHODS:
            checks.append(
                check_llama_memory(
                    small,
                    batch=batch,
                    seq=_check_int(check_seq, "--check-seq"),
                    blocks=n,
                    method=method,
                    attention=attention,
                    optimizer=optimizer,
                    ranks=asi_ranks(small, batch, check_seq, rank_fractions)
                    if method == "asi"
                    else None,
                )
            )
    return rows, checks


def main(args: argparse.Namespace) -> int:
    """Print the Llama table (and its measured check)."""
    start = time.perf_counter()
    batch = 8 if args.batch is None else args.batch
    rows, checks = run(
        args.model,
        batch=batch,
        seq=args.seq,
        layers=args.layers,
        attention=args.attention,
        optimizer=args.optimizer,
        rank_fractions=args.rank_fractions,
        check_seq=args.check_seq,
    )
    if args.json:
        doc = {
            "rows": [r.to_dict() for r in rows],
            "checks": [
                {
                    "analytic": c.analytic.to_dict(),
                    "measured": c.measured.to_dict(),
                    "equal": c.equal,
                }
                for c in checks
            ],
        }
        print(json.dumps(doc, indent=2))
        return 0 if all(c.equal for c in checks) else 1
    shape = rows[0].shape
    asi = next(r for r in rows if r.method == "asi")
    notes = [
        f"{args.model}: hidden {shape.hidden_size}, {shape.num_layers} blocks, {shape.num_heads} "
        f"heads ({shape.num_kv_heads} key/value), MLP {shape.intermediate_size}, vocabulary "
        f"{shape.vocab_size}; {shape.num_parameters():,} parameters",
        f"one training step, batch {batch} x {args.seq} tokens, float32, {args.attention} "
        f"attention, {'AdamW' if args.optimizer == 'adamw' else 'SGD with momentum'}, "
        "language-modelling loss; last N blocks fine-tuned",
        "ASI ranks (r_B, r_T, r_C) = ceil(fraction x (B, T, C)) with fractions "
        f"{tuple(args.rank_fractions)}: " + ", ".join(f"{k} {v}" for k, v in asi.ranks.items()),
    ]
    print(format_table(rows, notes))
    if args.tensors:
        for r in rows:
            print(f"\n{_label(r)}, N={r.blocks}:")
            print(format_tensors(r))
    if checks:
        print(
            f"\nChecked against a measured step (training_memory) of the width/8 model "
            f"(tiny_llama: hidden {checks[0].analytic.shape.hidden_size}, the same blocks), "
            f"{batch} x {checks[0].analytic.seq} tokens:"
        )
        print(format_check(checks))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0 if all(c.equal for c in checks) else 1
