"""Model kinds of ``tensorcompress run``: a CNN's last convs, or a transformer's last blocks.

One run loop (:mod:`tensorcompress.experiments.run`) fine-tunes both; what
differs between them is gathered here, behind :func:`kind_of`:

- **what is fine-tuned**: the last N convs in execution order
  (:func:`~tensorcompress.torch.last_layers`) or the Linear layers of the last
  N blocks (:func:`~tensorcompress.torch.last_blocks`); either way the adapter's
  one freeze rule (:func:`~tensorcompress.torch.fine_tuned_modules`) trains
  them and everything that runs after the first of them;
- **the methods**: the CNN's are :data:`tensorcompress.torch.METHODS`; a
  transformer's are those of :func:`tensorcompress.torch.transformer.prepare`
  (:data:`TRANSFORMER_METHODS`): vanilla, activation checkpointing, LoRA
  (``peft``), LoRA+ASI, HOSVD, SVD, ASI on the blocks' Linear inputs, and
  WSI and WASI (the blocks' Linear weights trained as factors); the
  compressed methods with the block options of :class:`BlockSettings` (the
  attention through SDPA, and the other tensors the blocks save kept as
  per-block int8);
- **the optimizer**: SGD with Nesterov momentum for the CNNs (the paper's),
  AdamW for transformers (:func:`optimizer_name`);
- **the output**: Hugging Face models return an output object, whose
  ``logits`` the loss and the accuracy read (:func:`logits`);
- **what is measured**: transformers also get the whole step's memory
  (:func:`~tensorcompress.torch.measure.training_memory`: weights, gradients,
  optimizer state and the peak over forward and backward), because the
  Linear inputs are a minority of what their blocks keep.

ASI's ranks differ too: the CNN rows fit ASI's per-layer ranks to HOSVD's
memory at the same threshold (the paper's protocol, a sensitivity
measurement per N); the transformer rows give ASI the threshold itself, from
which its cold start fixes each input's ranks (as HOSVD's are chosen), so
that the layers reading one input (q/k/v, gate/up) keep one decomposition
with one set of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorcompress.models import TRANSFORMER_NAMES
from tensorcompress.torch import (
    METHODS,
    fine_tuned_modules,
    last_blocks,
    last_layers,
    select_layers,
)
from tensorcompress.torch.lowrank import LowRankModule
from tensorcompress.torch.measure import MemoryReport, TrainingMemory, training_memory
from tensorcompress.torch.selection import execution_order, plain_type

__all__ = [
    "ASI_METHODS",
    "CNN_METHODS",
    "COMPRESSED_METHODS",
    "DEFAULT_CNN_METHODS",
    "DEFAULT_TRANSFORMER_METHODS",
    "FACTORED_METHODS",
    "FACTORED_SGD_LR_SCALE",
    "LORA_LR_SCALE",
    "LORA_METHODS",
    "TRANSFORMER_METHODS",
    "AccuracyCheck",
    "BlockSettings",
    "TargetCheck",
    "WasiTargetCheck",
    "cross_entropy",
    "factored_kept_bytes",
    "finetune_lr",
    "is_transformer",
    "logits",
    "optimizer_name",
    "paper_convention",
    "prepare_blocks",
    "recommended_threshold",
    "split_factored",
    "target_checks",
    "trained_layers",
    "trained_modules",
    "transformer_measurements",
    "tuned_layers",
    "wasi_target_checks",
]

CNN_METHODS: tuple[str, ...] = (*METHODS, "wsi", "wasi")
"""Methods of a CNN run: :data:`tensorcompress.torch.METHODS`, and WSI/WASI on
request (they factor the fine-tuned convs that factor cleanly: groups 1)."""

DEFAULT_CNN_METHODS: tuple[str, ...] = METHODS
"""The methods of a CNN run without ``--methods``: all but WSI and WASI."""

FACTORED_SGD_LR_SCALE = 0.1
"""A CNN run's SGD learning rate is scaled by this for WSI and WASI. A step on
the factors L and R moves the effective weight L R by both steps and their
product, so the dense layers' lr is too large: at the run's lr 0.2 and at 0.05
(a scale of 0.25), WSI on mcunet_in1's last 4 convs diverged (NaN loss); at
0.02 it trains (``tensorcompress run --methods vanilla asi wsi wasi --layers 2
4 --thresholds 0.8 0.9`` prints every row)."""


LORA_LR_SCALE = 4.0
"""A run's learning rate is scaled by this for LoRA and LoRA+ASI, whose adapters
start at a zero update and, as is usual for LoRA, need a larger step than full
fine-tuning. Chosen on the former ViT-Tiny backbone (blocks 1-2 pretrained,
``--pretrain-blocks 0 1``): on its last 4 blocks (AdamW, 2 epochs) LoRA r 8 reached
74.9 % at the run's lr 1e-3 and 89.3 % at 4e-3, where vanilla reached 89.6 % and
90.0 % (``--methods vanilla lora --layers 4 --lr 0.004``); one lr for every row
would have cost vanilla on all blocks 13 points (81.6 % at 4e-3 against 94.9 %)."""


def finetune_lr(method: str, lr: float, optimizer: str) -> float:
    """The learning rate a row fine-tunes with: ``lr``, scaled by
    :data:`FACTORED_SGD_LR_SCALE` for WSI/WASI under SGD (AdamW's steps are
    normalised per parameter and need no scaling) and by :data:`LORA_LR_SCALE`
    for LoRA and LoRA+ASI."""
    if method in FACTORED_METHODS and optimizer == "sgd":
        return lr * FACTORED_SGD_LR_SCALE
    if method in LORA_METHODS:
        return lr * LORA_LR_SCALE
    return lr


TRANSFORMER_METHODS: tuple[str, ...] = (
    "vanilla",
    "checkpoint",
    "lora",
    "lora+asi",
    "hosvd",
    "svd",
    "asi",
    "wsi",
    "wasi",
)
"""Methods of a transformer run, those of :func:`tensorcompress.torch.transformer.prepare`."""

DEFAULT_TRANSFORMER_METHODS: tuple[str, ...] = tuple(
    m for m in TRANSFORMER_METHODS if m not in ("hosvd", "svd", "wsi", "wasi")
)
"""A transformer run's methods when none are given. HOSVD and SVD keep what ASI keeps
at 1.4-7.0x vanilla's step CPU time (``docs/guides/transformer-memory.md``); WSI and
WASI (:data:`FACTORED_METHODS`) add 8 fine-tunes to a default run, whose cold run then
took 713 s at 2 threads instead of the 10 minutes it is meant to fit. All four run
when asked for (``--methods``), as in a CNN run (:data:`DEFAULT_CNN_METHODS`)."""

COMPRESSED_METHODS: tuple[str, ...] = ("hosvd", "svd", "asi", "wasi")
"""Methods that compress the blocks' Linear inputs at an explained-variance threshold."""

FACTORED_METHODS: tuple[str, ...] = ("wsi", "wasi")
"""Methods that train the blocks' Linear weights as factors of the threshold's rank."""

LORA_METHODS: tuple[str, ...] = ("lora", "lora+asi")
"""Methods that train LoRA adapters (PEFT) instead of the blocks' weights."""


def is_transformer(model: str) -> bool:
    """Whether ``model`` names one of :data:`tensorcompress.models.TRANSFORMER_NAMES`."""
    return model.lower().replace("-", "_") in TRANSFORMER_NAMES


def logits(out: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or a Hugging Face output's ``logits``."""
    if isinstance(out, torch.Tensor):
        return out
    value = getattr(out, "logits", None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the model returned a {type(out).__name__} without a logits tensor")
    return value


def cross_entropy(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a model's output (tensor or Hugging Face output) against ``target``."""
    return F.cross_entropy(logits(out), target)


def optimizer_name(model_name: str) -> str:
    """The optimizer of a model kind: ``"sgd"`` (Nesterov momentum) or ``"adamw"`` for transformers.

    See :func:`tensorcompress.experiments.train.make_optimizer`.
    """
    return "adamw" if is_transformer(model_name) else "sgd"


# ---------------------------------------------------------------------------
# What is fine-tuned
# ---------------------------------------------------------------------------


def _is_layer(module: nn.Module, name: str) -> bool:
    return plain_type(module) is not None


def tuned_layers(
    model: nn.Module, layers: int | str, example_input: Any, *, blocks: bool
) -> list[str]:
    """The layers that define "the last N" of a CNN (``blocks=False``) or a transformer.

    ``"all"``: every Conv/Linear. A number: a CNN's last N convs in execution
    order (:func:`~tensorcompress.torch.last_layers`); a transformer's Linear
    layers of its last N blocks (:func:`~tensorcompress.torch.last_blocks`).
    Pass the result to :func:`~tensorcompress.torch.fine_tuned_modules` for
    what trains.
    """
    if str(layers) == "all":
        return select_layers(model, _is_layer)
    n = int(layers)
    selector = last_blocks(n) if blocks else last_layers(n)
    return select_layers(model, selector, example_input)


def trained_modules(
    model: nn.Module, layers: int | str, example_input: Any, *, blocks: bool
) -> list[str]:
    """The modules that train when the last N convs (or blocks) are fine-tuned.

    The adapter's one freeze rule (:func:`~tensorcompress.torch.fine_tuned_modules`:
    every module with parameters that runs at or after a first one). A CNN:
    from the first of its last N convs. A transformer: from the first module
    of its last N blocks that runs, the block's first norm included, as
    :func:`tensorcompress.torch.transformer.prepare` trains them. ``"all"``:
    from the first Conv/Linear.
    """
    if not blocks or str(layers) == "all":
        return fine_tuned_modules(
            model, tuned_layers(model, layers, example_input, blocks=blocks), example_input
        )
    from tensorcompress.torch.transformer import block_names

    names = block_names(model, int(layers))
    order = execution_order(model, example_input)
    first = next(o for o in order if any(o.startswith(b + ".") for b in names))
    return fine_tuned_modules(model, [first], example_input)


def trained_layers(model: nn.Module) -> list[str]:
    """Conv/Linear layers of ``model`` whose weight trains (LoRA's adapters, compressed
    layers, the factors of WSI/WASI layers)."""
    return [
        name
        for name, m in model.named_modules()
        if (
            plain_type(m) is not None
            and getattr(m, "weight", None) is not None
            and m.weight.requires_grad
        )
        or (isinstance(m, LowRankModule) and m.left.requires_grad)
    ]


# ---------------------------------------------------------------------------
# Transformer configurations
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSettings:
    """The block options of a transformer run (see ``torch.transformer.BlockOptions``).

    Attributes
    ----------
    attention : {"sdpa", "eager"}
        Attention of every row (SDPA: exact, and it keeps no probabilities).
    saved : {"int8"} or None
        Compact form of the tensors the blocks save that are not Linear
        inputs (attention, norm, GELU), for the compressed methods
        (:data:`COMPRESSED_METHODS`); ``None`` keeps them as they are.
    fused_mlp : bool
        With ``saved="int8"``, HOSVD, SVD, ASI and WASI run each MLP's
        activation and second Linear as one function that keeps only the
        activation's int8 input (``BlockOptions.fused_mlp``); that Linear is
        then not compressed (WASI's still trains as factors).
    norm_fed : bool
        With ``saved="int8"``, HOSVD, SVD, ASI and WASI leave the Linear
        layers that read a norm's output (q/k/v, fc1) uncompressed and
        keeping nothing: their weight gradients (WASI: their factors'
        gradients) rebuild the norm's output from the int8 input the norm
        keeps (``BlockOptions.norm_fed``).

    Notes
    -----
    A row's threshold is the explained variance of the compressed inputs
    and, for WSI and WASI, of each weight's spectrum too (one knob per row).
    lora_r : int
        LoRA's rank.
    """

    attention: str = "sdpa"
    saved: str | None = "int8"
    fused_mlp: bool = True
    norm_fed: bool = True
    lora_r: int = 8

    def options(
        self,
        method: str,
        threshold: float | None,
        product_dtype: torch.dtype | None = None,
        only_if_smaller: bool = False,
        weight_rank: Mapping[str, int] | None = None,
        output_grams: Mapping[str, torch.Tensor] | None = None,
    ) -> Any:
        """The :class:`~tensorcompress.torch.transformer.BlockOptions` of one row.

        ``product_dtype`` and ``only_if_smaller`` (WSI/WASI rows only) are
        the run's (:attr:`RunConfig.product_dtype
        <tensorcompress.experiments.run.RunConfig.product_dtype>`,
        :attr:`RunConfig.factor <tensorcompress.experiments.run.RunConfig.factor>`);
        ``weight_rank``, WSI/WASI's per-layer weight ranks, replaces the
        threshold's (:attr:`RunConfig.weight_ranks
        <tensorcompress.experiments.run.RunConfig.weight_ranks>`); ``output_grams``
        factors them in their outputs' basis (:attr:`RunConfig.weight_basis
        <tensorcompress.experiments.run.RunConfig.weight_basis>`).
        """
        from tensorcompress.torch.transformer import BlockOptions

        eps = 0.8 if threshold is None else threshold
        saved = self.saved if method in COMPRESSED_METHODS else None
        return BlockOptions(
            attention=self.attention,
            saved=saved,
            fused_mlp=self.fused_mlp and saved == "int8",
            norm_fed=self.norm_fed and saved == "int8",
            rank=eps,
            weight_rank=(
                (eps if weight_rank is None else dict(weight_rank))
                if method in FACTORED_METHODS
                else 0.9
            ),
            lora_r=self.lora_r,
            lora_alpha=2 * self.lora_r,
            product_dtype=product_dtype,
            only_if_smaller=only_if_smaller and method in FACTORED_METHODS,
            output_grams=output_grams if method in FACTORED_METHODS else None,
        )


def prepare_blocks(
    model: nn.Module,
    method: str,
    layers: str,
    threshold: float | None,
    example_input: torch.Tensor,
    settings: BlockSettings,
    *,
    seed: int,
    product_dtype: torch.dtype | None = None,
    only_if_smaller: bool = False,
    weight_rank: Mapping[str, int] | None = None,
    output_grams: Mapping[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, list[str]]:
    """A transformer ready to fine-tune one row: the model to train and its trained layers.

    ``layers="all"`` (vanilla only) trains every parameter. A number of blocks goes through
    :func:`tensorcompress.torch.transformer.prepare` with
    :meth:`BlockSettings.options` (LoRA's initialisation seeded by ``seed``).

    Returns
    -------
    tuple
        The model to train (a ``peft`` model for LoRA) and the Conv/Linear
        layers whose weights train inside the fine-tuned blocks (for the
        paper's memory convention: what they keep for their weight gradients).
    """
    from tensorcompress.torch.transformer import block_names, prepare

    if method not in TRANSFORMER_METHODS:
        raise ValueError(f"method must be one of {TRANSFORMER_METHODS}, got {method!r}")
    if layers == "all":
        if method != "vanilla":
            raise ValueError(f"layers='all' is for vanilla only, got method {method!r}")
        # Every parameter: the class token and position embeddings too (they
        # belong to the embeddings module, which runs before the patch conv).
        model.requires_grad_(True)
        return model, trained_layers(model)
    n = int(layers)
    modules = dict(model.named_modules())
    blocks = [modules[name] for name in block_names(model, n)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = prepare(
            model,
            method,
            n,
            example_input=example_input,
            options=settings.options(
                method, threshold, product_dtype, only_if_smaller, weight_rank, output_grams
            ),
        )
    # After prepare: the blocks hold LoRA's adapters or the compressed layers.
    inside = {id(m) for b in blocks for m in b.modules()}
    trains = set(trained_layers(net))
    return net, [name for name, m in net.named_modules() if id(m) in inside and name in trains]


def split_factored(model: nn.Module, layers: Sequence[str]) -> tuple[list[str], list[str]]:
    """``layers`` split into the Conv/Linear ones (plain or compressed) and the factored
    ones (WSI/WASI), which the saved-tensor report cannot select as layers."""
    modules = dict(model.named_modules())
    factored = [n for n in layers if isinstance(modules[n], LowRankModule)]
    return [n for n in layers if n not in factored], factored


def factored_kept_bytes(report: MemoryReport, factored: Sequence[str]) -> int:
    """What the ``factored`` layers keep for their weight gradients: their own saves,
    among the report's other modules'."""
    by_module = dict(report.other_by_module)
    return sum(by_module.get(n, 0) for n in factored)


def transformer_measurements(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: Sequence[str],
    optimizer: torch.optim.Optimizer,
    blocks: Sequence[str] = (),
) -> tuple[dict[str, Any], TrainingMemory]:
    """The whole step's memory of a transformer row, as result fields.

    :func:`~tensorcompress.torch.measure.training_memory` with the row's own
    optimizer and loss: ``mem_bytes`` (what ``layers`` keep for their weight
    gradients), ``mem_full_bytes`` (everything saved), the weights,
    gradients, optimizer state, the peak activation memory over forward and
    backward and the step's peak, and the saved bytes by kind. Also
    ``tuned_bytes``, the fine-tuned part's whole training memory: the
    parameters of the fine-tuned ``blocks`` (module names; frozen ones too,
    as LoRA's base weights) and every trainable one, their gradients and
    optimizer state, plus the peak activation memory. Unlike ``peak_bytes``
    it leaves out the frozen rest of the model, which every method shares.
    """
    plain, factored = split_factored(model, layers)
    mem = training_memory(
        model,
        x,
        optimizer,
        loss_fn=lambda out: cross_entropy(out, y),
        layers=plain,
        attribute=False,
    )
    prefixes = tuple(b + "." for b in blocks)
    tuned_weights = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if p.requires_grad or n.startswith(prefixes)
    )
    fields = {
        "mem_bytes": mem.kept_bytes + factored_kept_bytes(mem.saved, factored),
        "mem_analytic_bytes": mem.saved.analytic_bytes,
        "mem_vanilla_bytes": mem.saved.vanilla_bytes,
        "mem_full_bytes": mem.activations_bytes,
        "weights_bytes": mem.weights_bytes + mem.buffers_bytes,
        "gradients_bytes": mem.gradients_bytes,
        "optimizer_bytes": mem.optimizer_bytes,
        "peak_activation_bytes": mem.peak_activation_bytes,
        "peak_bytes": mem.peak_bytes,
        "tuned_bytes": tuned_weights
        + mem.gradients_bytes
        + mem.optimizer_bytes
        + mem.peak_activation_bytes,
        "activations_by_kind": dict(mem.activations_by_kind),
    }
    return fields, mem


# ---------------------------------------------------------------------------
# The transformer targets
# ---------------------------------------------------------------------------

ASI_METHODS: tuple[str, ...] = ("asi", "lora+asi", "wasi")
"""The ASI-based methods of a transformer run."""


@dataclass(frozen=True)
class AccuracyCheck:
    """A row of a threshold frontier against vanilla's accuracy with the same blocks.

    The base of :class:`TargetCheck` and :class:`WasiTargetCheck`, and what
    :func:`recommended_threshold` reads.

    Attributes
    ----------
    label, layers : str
        The row.
    threshold : float or None
        Its threshold.
    accuracy_gap : float
        Accuracy minus vanilla's, in points.
    accuracy_points : float
        The target: at most this many points below vanilla.
    """

    label: str
    layers: str
    threshold: float | None
    accuracy_gap: float
    accuracy_points: float = field(default=1.0, kw_only=True)

    @property
    def accuracy_met(self) -> bool:
        """Within ``accuracy_points`` of vanilla."""
        return self.accuracy_gap >= -self.accuracy_points


@dataclass(frozen=True)
class TargetCheck(AccuracyCheck):
    """An ASI-based row against the transformer targets, from the run's own measurements.

    The targets: accuracy within ``accuracy_points`` of vanilla's with the
    same blocks; peak activation memory at most checkpointing's and at most
    ``peak_fraction`` of vanilla's; step time at most checkpointing's.

    Attributes
    ----------
    peak_vs_vanilla, peak_vs_checkpoint, step_vs_checkpoint : float
        Ratios of the peak activation memory and step time (NaN when the
        other row is missing).
    peak_fraction : float
        The peak's target; the row, its gap and ``accuracy_points`` are
        :class:`AccuracyCheck`'s.
    """

    peak_vs_vanilla: float
    peak_vs_checkpoint: float
    step_vs_checkpoint: float
    peak_fraction: float = 0.3

    @property
    def memory_met(self) -> bool:
        """Peak activation memory at most checkpointing's and ``peak_fraction`` of vanilla's."""
        return self.peak_vs_checkpoint <= 1.0 and self.peak_vs_vanilla <= self.peak_fraction

    @property
    def time_met(self) -> bool:
        """Step time at most checkpointing's."""
        return self.step_vs_checkpoint <= 1.0

    @property
    def all_met(self) -> bool:
        """Every target."""
        return self.accuracy_met and self.memory_met and self.time_met

    def text(self) -> str:
        """One line: the figures, each with its target, met or missed ("not run"
        where the run has no checkpointing row to compare with)."""

        def verdict(ok: bool) -> str:
            return "met" if ok else "missed"

        accuracy = (
            f"{self.label}, last {self.layers}: accuracy {self.accuracy_gap:+.1f} points vs "
            f"vanilla (target >= -{self.accuracy_points:g}: {verdict(self.accuracy_met)})"
        )
        vanilla = f"peak activation memory {self.peak_vs_vanilla:.2f}x vanilla's"
        if math.isnan(self.peak_vs_checkpoint):
            return (
                f"{accuracy}; {vanilla} (target <= {self.peak_fraction:g}: "
                f"{verdict(self.peak_vs_vanilla <= self.peak_fraction)}); against "
                "checkpointing: not run (add checkpoint to --methods)"
            )
        return (
            f"{accuracy}; {vanilla} and {self.peak_vs_checkpoint:.2f}x checkpointing's "
            f"(targets <= {self.peak_fraction:g} and <= 1: {verdict(self.memory_met)}); "
            f"step time {self.step_vs_checkpoint:.2f}x checkpointing's "
            f"(target <= 1: {verdict(self.time_met)})"
        )


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def target_checks(
    rows: Sequence[Any],
    layers: str = "4",
    *,
    accuracy_points: float = 1.0,
    peak_fraction: float = 0.3,
) -> list[TargetCheck]:
    """Every ASI-based row with ``layers`` against the targets (see :class:`TargetCheck`).

    ``rows`` are :class:`~tensorcompress.experiments.report.Row` s (``method``,
    ``label``, ``layers``, ``threshold``, ``accuracy``, ``peak_act_mb``,
    ``step_ms``); empty when the run has no vanilla row with those layers.
    """
    by = {(r.method, r.layers): r for r in rows if r.threshold is None}
    van, ckpt = by.get(("vanilla", layers)), by.get(("checkpoint", layers))
    if van is None:
        return []
    nan = math.nan
    return [
        TargetCheck(
            label=r.label,
            layers=layers,
            threshold=r.threshold,
            accuracy_gap=r.accuracy - van.accuracy,
            peak_vs_vanilla=_ratio(r.peak_act_mb, van.peak_act_mb),
            peak_vs_checkpoint=nan if ckpt is None else _ratio(r.peak_act_mb, ckpt.peak_act_mb),
            step_vs_checkpoint=nan if ckpt is None else _ratio(r.step_ms, ckpt.step_ms),
            accuracy_points=accuracy_points,
            peak_fraction=peak_fraction,
        )
        for r in rows
        if r.method in ASI_METHODS and r.layers == layers
    ]


def recommended_threshold(checks: Sequence[AccuracyCheck], method: str = "ASI") -> float | None:
    """The smallest threshold whose ``method`` row (label prefix) meets the accuracy target.

    The cheapest point of the frontier within the accuracy tolerance; when
    none is, the threshold of the most accurate row. ``None`` without rows.
    """
    own = [c for c in checks if c.label.startswith(method + " ") and c.threshold is not None]
    if not own:
        return None
    good = [c for c in own if c.accuracy_met]
    if good:
        return min(c.threshold for c in good if c.threshold is not None)
    best = max(own, key=lambda c: c.accuracy_gap)
    return best.threshold


# ---------------------------------------------------------------------------
# The WASI targets
# ---------------------------------------------------------------------------


def paper_convention(row: Any, vanilla: Any) -> tuple[float, float, float] | None:
    """The WASI paper's memory convention of ``row`` against ``vanilla``'s, seed by seed.

    The convention counts the trained layers' weights (their factors where
    factored) plus what they keep for their weight gradients: a seed's
    ``weight_bytes`` plus ``mem_bytes``.

    Parameters
    ----------
    row, vanilla : Row
        :class:`~tensorcompress.experiments.report.Row` s with the same
        layers; their ``seeds`` pair by ``"seed"``.

    Returns
    -------
    tuple of float or None
        The row's bytes, vanilla's bytes over the row's, and vanilla's bytes,
        each a mean over the paired seeds; ``None`` where no seed pairs (or a
        seed lacks ``weight_bytes``).
    """

    def convention(fields: Mapping[str, Any]) -> float:
        return float(fields["weight_bytes"] + fields["mem_bytes"])

    theirs = {s["seed"]: convention(s) for s in vanilla.seeds if "weight_bytes" in s}
    pairs = [
        (convention(s), theirs[s["seed"]])
        for s in row.seeds
        if "weight_bytes" in s and s["seed"] in theirs
    ]
    if not pairs:
        return None
    return (
        sum(p for p, _ in pairs) / len(pairs),
        sum(v / p for p, v in pairs) / len(pairs),
        sum(v for _, v in pairs) / len(pairs),
    )


@dataclass(frozen=True)
class WasiTargetCheck(AccuracyCheck):
    """A WASI row against the WASI targets, from the run's own measurements.

    The targets: accuracy within ``accuracy_points`` of vanilla's with the
    same blocks; whole training memory (``tuned MB``) at most
    ``lora_fraction`` of LoRA's and at most the leanest ASI row's; the WASI
    paper's convention at least ``paper_factor`` times below vanilla's; the
    training step at most vanilla's; the exported model's forward at most
    ``inference_fraction`` of the dense model's. A ratio is NaN where the
    run lacks the row it needs (LoRA, ASI) or the measurement.

    Attributes
    ----------
    lora_accuracy_gap : float
        Accuracy minus LoRA's, in points (the row, its gap to vanilla and
        ``accuracy_points``, 2 here, are :class:`AccuracyCheck`'s).
    tuned_vs_lora, tuned_vs_asi : float
        Whole training memory over LoRA's and over the smallest of the ASI rows'.
    paper_below : float
        Vanilla's paper-convention bytes over the row's (mean over seeds).
    step_vs_vanilla, inference_vs_dense : float
        The step over vanilla's and the exported model's forward over the
        dense model's, each paired by seed and averaged.
    lora_fraction, paper_factor, inference_fraction : float
        The other targets.
    """

    lora_accuracy_gap: float
    tuned_vs_lora: float
    tuned_vs_asi: float
    paper_below: float
    step_vs_vanilla: float
    inference_vs_dense: float
    accuracy_points: float = field(default=2.0, kw_only=True)
    lora_fraction: float = 0.5
    paper_factor: float = 20.0
    inference_fraction: float = 0.8

    @property
    def memory_met(self) -> bool:
        """At most ``lora_fraction`` of LoRA's and at most the leanest ASI row's."""
        return self.tuned_vs_lora <= self.lora_fraction and self.tuned_vs_asi <= 1.0

    @property
    def paper_met(self) -> bool:
        """The paper convention at least ``paper_factor`` times below vanilla's."""
        return self.paper_below >= self.paper_factor

    @property
    def time_met(self) -> bool:
        """The step at most vanilla's."""
        return self.step_vs_vanilla <= 1.0

    @property
    def inference_met(self) -> bool:
        """The exported forward at most ``inference_fraction`` of the dense one's."""
        return self.inference_vs_dense <= self.inference_fraction

    @property
    def all_met(self) -> bool:
        """Every target."""
        return (
            self.accuracy_met
            and self.memory_met
            and self.paper_met
            and self.time_met
            and self.inference_met
        )

    def text(self) -> str:
        """One line: each figure with its target, met or missed ("not run" where a
        needed row is missing)."""

        def verdict(ok: bool, value: float = 0.0) -> str:
            return "not measured" if math.isnan(value) else "met" if ok else "missed"

        def times(value: float, fmt: str = ".2f") -> str:
            return "n/a" if math.isnan(value) else f"{value:{fmt}}x"

        if math.isnan(self.tuned_vs_lora):
            lora = "against LoRA: not run (add lora to --methods)"
        else:
            lora = (
                f"{times(self.tuned_vs_lora)} LoRA's, at {self.lora_accuracy_gap:+.1f} points "
                f"vs LoRA (target <= {self.lora_fraction:g}: "
                f"{verdict(self.tuned_vs_lora <= self.lora_fraction)})"
            )
        if math.isnan(self.tuned_vs_asi):
            asi = "against ASI: not run (add asi to --methods)"
        else:
            asi = (
                f"{times(self.tuned_vs_asi)} the leanest ASI row's "
                f"(target <= 1: {verdict(self.tuned_vs_asi <= 1.0)})"
            )
        return (
            f"{self.label}, last {self.layers} (WASI targets): accuracy "
            f"{self.accuracy_gap:+.1f} points vs vanilla (target >= -{self.accuracy_points:g}: "
            f"{verdict(self.accuracy_met)}); whole training memory {lora}, {asi}; "
            f"paper convention {times(self.paper_below, '.1f')} below vanilla's (target >= "
            f"{self.paper_factor:g}: {verdict(self.paper_met, self.paper_below)}); step "
            f"{times(self.step_vs_vanilla)} vanilla's (target <= 1: "
            f"{verdict(self.time_met, self.step_vs_vanilla)}); exported forward "
            f"{times(self.inference_vs_dense)} the dense model's (target <= "
            f"{self.inference_fraction:g}: "
            f"{verdict(self.inference_met, self.inference_vs_dense)})"
        )


def wasi_target_checks(rows: Sequence[Any], layers: str = "4") -> list[WasiTargetCheck]:
    """Every WASI row with ``layers`` against the WASI targets (see :class:`WasiTargetCheck`).

    ``rows`` are :class:`~tensorcompress.experiments.report.Row` s; empty
    when the run has no vanilla row with those layers.
    """
    by = {(r.method, r.layers): r for r in rows if r.threshold is None}
    van, lora = by.get(("vanilla", layers)), by.get(("lora", layers))
    if van is None:
        return []
    asi = [r.tuned_mb for r in rows if r.method == "asi" and r.layers == layers]
    nan = math.nan
    checks = []
    for r in rows:
        if r.method != "wasi" or r.layers != layers:
            continue
        paper = paper_convention(r, van)
        inference = [s["infer_ratio"] for s in r.seeds if "infer_ratio" in s]
        checks.append(
            WasiTargetCheck(
                label=r.label,
                layers=layers,
                threshold=r.threshold,
                accuracy_gap=r.accuracy - van.accuracy,
                lora_accuracy_gap=nan if lora is None else r.accuracy - lora.accuracy,
                tuned_vs_lora=nan if lora is None else _ratio(r.tuned_mb, lora.tuned_mb),
                tuned_vs_asi=_ratio(r.tuned_mb, min(asi)) if asi else nan,
                paper_below=nan if paper is None else paper[1],
                step_vs_vanilla=r.step_ratio,
                inference_vs_dense=sum(inference) / len(inference) if inference else nan,
            )
        )
    return checks
