"""``tensorcompress table``: the paper's ImageNet table (Mem and GFLOPs) for one model.

One row per (method, number of fine-tuned convs N):

- **Mem**: the bytes the last N convs keep for their weight gradients (the
  paper's convention: their inputs, or what the method keeps instead),
  measured from the tensors autograd saved
  (:func:`tensorcompress.torch.measure.activation_memory`), next to the
  analytic formula evaluated on the conv shapes (they must agree). MB means
  2**20 bytes.
- **saved**: everything autograd keeps for the step (BatchNorm inputs and
  statistics, activation outputs, pooling, the classifier's input), i.e. the
  real activation memory of that fine-tuning step.
- **GFLOPs**: one training step counted by
  :func:`tensorcompress.torch.flops.training_step_flops` (forward of the whole
  network + decomposition + the backward autograd runs; 2 flops per MAC), and
  the paper's own estimate (:func:`tensorcompress.experiments.paper.paper_flops`:
  MACs of the fine-tuned convs only, groups and stride ignored).

What trains (the paper's setup, as in the authors' ``freeze_layers``): the last
N convs in execution order and every module with parameters that runs after
the first of them (the BatchNorms between them and the classifier), by the
adapter's one freeze rule (:func:`tensorcompress.experiments.train.freeze_for`,
which ``tensorcompress run`` uses too); everything before is frozen. So
"saved" is what autograd keeps for exactly that step, and the frozen layers
below the first fine-tuned conv run no backward at all.

Ranks: HOSVD uses the explained-variance threshold ``--rank`` on the batch
the command generates (crops of scikit-learn's sample images, or uniform
noise with ``--input random``) through the model's weights (seeded random
initialisation unless ``--weights`` gives a state_dict), so its ranks, Mem and
GFLOPs illustrate the formulas rather than reproduce the paper's ImageNet
figures. ASI's ranks are chosen, as in the paper, to fit HOSVD's memory at the
same threshold (budget ``"hosvd@EPS"`` of
:func:`tensorcompress.torch.budget.plan_ranks`, measured on the same batch).

The vanilla and gradient-filter Mem and paper-convention GFLOPs depend on the
architecture alone and reproduce the paper's table
(:data:`tensorcompress.experiments.paper.PAPER_TABLE`).

Cost: each row is one measuring forward and one counted forward + backward,
but only from the first trainable module on. The frozen layers below it are
computed once for all rows (their outputs replayed, their counted forward
flops added back; the figures are the same as without, which a test checks).
ResNet18 at batch 64, 224x224, 8 rows: about a minute on 2 CPU cores.

``--model tinyllama-1.1b`` prints another table: the memory of fine-tuning
TinyLlama-1.1B's last N blocks by formula, checked against a measured step of
its width/8 twin (:mod:`tensorcompress.experiments.transformer_table`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from tensorcompress.experiments import train as T
from tensorcompress.experiments import transformer_table as LT
from tensorcompress.experiments.paper import (
    PAPER_METHODS,
    PATCH,
    PaperFigure,
    PaperFlops,
    paper_figure,
    paper_flops,
    paper_mem_bytes,
)
from tensorcompress.experiments.prefix import FrozenPrefix
from tensorcompress.models import MODEL_NAMES, get_model
from tensorcompress.torch import convert, fine_tuned_modules
from tensorcompress.torch.flops import StepFlops, training_step_flops
from tensorcompress.torch.measure import MB, activation_memory
from tensorcompress.torch.state import preserved_training_state

__all__ = [
    "ConvCall",
    "TableResult",
    "TableRow",
    "add_arguments",
    "main",
    "make_batch",
    "probe_convs",
    "run_table",
]


# ---------------------------------------------------------------------------
# Conv shapes and the analytic (paper-convention) figures
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvCall:
    """A Conv2d's first call in a batch-1 forward.

    Attributes
    ----------
    name : str
        Qualified module name.
    input_shape, output_shape : tuple of int
        ``(1, C, H, W)`` and ``(1, C', H', W')``.
    kernel_size, stride : tuple of int
        The conv's settings.
    groups : int
        The conv's groups.
    """

    name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int

    def input_at(self, batch: int) -> tuple[int, ...]:
        """Input shape with batch size ``batch`` (every shape is linear in the batch)."""
        return (batch, *self.input_shape[1:])

    def output_at(self, batch: int) -> tuple[int, ...]:
        """Output shape with batch size ``batch``."""
        return (batch, *self.output_shape[1:])


def probe_convs(model: nn.Module, resolution: int) -> list[ConvCall]:
    """Every Conv2d of ``model`` in execution order, with its shapes at ``resolution``.

    Runs one ``1 x 3 x resolution x resolution`` forward in eval mode without
    gradients (training flags restored after).

    Raises
    ------
    ValueError
        If the network cannot run at ``resolution``, or a strided conv gets an
        input smaller than its stride (it could not downsample any more: the
        resolution is below what the network is built for).
    """
    calls: dict[str, ConvCall] = {}
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        name = names[id(module)]
        if name not in calls and isinstance(module, nn.Conv2d):
            calls[name] = ConvCall(
                name=name,
                input_shape=tuple(int(s) for s in args[0].shape),
                output_shape=tuple(int(s) for s in out.shape),
                kernel_size=tuple(int(k) for k in module.kernel_size),
                stride=tuple(int(s) for s in module.stride),
                groups=int(module.groups),
            )

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with T.eval_mode(model), torch.no_grad():
            model(torch.zeros(1, 3, resolution, resolution))
    except (RuntimeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"resolution {resolution} is too small for this model: {first}") from err
    finally:
        for h in handles:
            h.remove()
    for call in calls.values():
        small = [(n, s) for n, s in zip(call.input_shape[2:], call.stride) if s > 1 and n < s]
        if small:
            raise ValueError(
                f"resolution {resolution} is too small for this model: conv {call.name!r} "
                f"(stride {call.stride}) gets a {'x'.join(map(str, call.input_shape[2:]))} "
                "input, smaller than its stride"
            )
    return list(calls.values())


# ---------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def make_batch(
    batch: int, resolution: int, *, source: str = "images", seed: int = 0
) -> torch.Tensor:
    """A ``batch x 3 x resolution x resolution`` float32 input, ImageNet-normalised.

    Parameters
    ----------
    batch, resolution : int
        Batch size and side.
    source : {"images", "random"}
        ``"images"``: random square crops (a quarter to all of the shorter
        side, random flip) of scikit-learn's sample images, resized
        bilinearly; ``"random"``: uniform noise in [0, 1] per pixel.
    seed : int
        Seeds the crops or the noise (the global RNG is untouched).

    Raises
    ------
    RuntimeError
        If scikit-learn (which ships the sample images) is not installed.
    """
    rng = np.random.default_rng(seed)
    if source == "random":
        images = torch.from_numpy(rng.random((batch, 3, resolution, resolution), dtype=np.float32))
    elif source == "images":
        try:
            from tensorcompress.experiments.activations import sample_images

            pictures = sample_images()
        except ImportError as err:
            raise RuntimeError(
                f"--input images needs scikit-learn's sample images ({err}); "
                "install scikit-learn or use --input random"
            ) from err
        n, _, h, w = pictures.shape
        crops = []
        for _ in range(batch):
            side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
            i = int(rng.integers(0, n))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = pictures[i : i + 1, :, top : top + side, left : left + side]
            if rng.random() < 0.5:
                crop = crop.flip(-1)
            crops.append(
                nn.functional.interpolate(
                    crop, size=(resolution, resolution), mode="bilinear", align_corners=False
                )
            )
        images = torch.cat(crops)
    else:
        raise ValueError(f"source must be 'images' or 'random', got {source!r}")
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return ((images - mean) / std).contiguous()


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRow:
    """One (method, N) row.

    Attributes
    ----------
    model, method : str
        Model name and method.
    layers : int
        Number of fine-tuned convs N.
    batch, resolution : int
        Batch size and input side.
    layer_names : tuple of str
        The fine-tuned convs, in execution order.
    mem_bytes : int
        Measured Mem: what autograd saved for the N convs' weight gradients.
    analytic_bytes : int
        The formula's Mem on the probed shapes (and the measured ranks).
    saved_bytes : int
        Every activation autograd saved in the step.
    flops : StepFlops
        Counted flops of one training step.
    paper_convention : PaperFlops
        The paper's formulas (MACs) on the same convs and ranks.
    ranks : tuple of (str, tuple of int)
        Tucker ranks per conv (``hosvd``, ``asi``; empty otherwise).
    seconds : float
        Wall time of the row (measurement forward + counted step).
    paper : PaperFigure or None
        The paper's row, when it has one.
    """

    model: str
    method: str
    layers: int
    batch: int
    resolution: int
    layer_names: tuple[str, ...]
    mem_bytes: int
    analytic_bytes: int
    saved_bytes: int
    flops: StepFlops
    paper_convention: PaperFlops
    ranks: tuple[tuple[str, tuple[int, ...]], ...] = ()
    seconds: float = 0.0
    paper: PaperFigure | None = None

    @property
    def mem_mb(self) -> float:
        """Measured Mem in MB (2**20 bytes)."""
        return self.mem_bytes / MB

    @property
    def analytic_mb(self) -> float:
        """Analytic Mem in MB."""
        return self.analytic_bytes / MB

    @property
    def saved_mb(self) -> float:
        """Everything autograd saved, in MB."""
        return self.saved_bytes / MB

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return {
            "model": self.model,
            "method": self.method,
            "layers": self.layers,
            "batch": self.batch,
            "resolution": self.resolution,
            "layer_names": list(self.layer_names),
            "mem_mb": self.mem_mb,
            "mem_analytic_mb": self.analytic_mb,
            "saved_mb": self.saved_mb,
            "gflops": self.flops.gflops,
            "gflops_forward": self.flops.forward / 1e9,
            "gflops_decomposition": self.flops.decomposition / 1e9,
            "gflops_backward": self.flops.backward / 1e9,
            "gflops_linalg": self.flops.linalg / 1e9,
            "paper_convention_gflops": self.paper_convention.gflops,
            "ranks": {name: list(r) for name, r in self.ranks},
            "seconds": self.seconds,
            "paper": None
            if self.paper is None
            else {
                "mem_mb": self.paper.mem_mb,
                "gflops": self.paper.gflops,
                "accuracy": self.paper.accuracy,
            },
        }


@dataclass(frozen=True)
class TableResult:
    """Rows and where their inputs came from.

    Attributes
    ----------
    rows : tuple of TableRow
        Method by method, then by N.
    notes : tuple of str
        Human-readable lines: model, batch, weights, input, rank sources.
    settings : tuple of (str, Any)
        The same as machine-readable pairs (``input``, ``seed``, ``weights``,
        ``rank``, ``asi_ranks``), added to every JSON row.
    """

    rows: tuple[TableRow, ...]
    notes: tuple[str, ...] = field(default=())
    settings: tuple[tuple[str, Any], ...] = field(default=())

    def to_rows(self) -> list[dict[str, Any]]:
        """The rows as JSON-serialisable dicts, settings included."""
        return [{**row.to_dict(), **dict(self.settings)} for row in self.rows]


def _check_positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _model_key(name: str) -> str:
    key = str(name).lower().replace("-", "_")
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names are: {', '.join(MODEL_NAMES)}")
    return key


def _check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = [methods]
    unknown = [m for m in methods if m not in PAPER_METHODS]
    if unknown or not methods:
        raise ValueError(
            f"unknown method(s) {unknown or list(methods)}; the paper's table has {PAPER_METHODS}"
        )
    return tuple(dict.fromkeys(methods))  # drop repeats, keep order


def _check_rank(rank: Any) -> float:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real) or not 0 < float(rank) <= 1:
        raise ValueError(f"rank must be an explained-variance threshold in (0, 1], got {rank!r}")
    return float(rank)


def _with_prefix_flops(flops: StepFlops, prefix: dict[str, int]) -> StepFlops:
    """``flops`` with the replayed prefix's counted forward (by op) added back."""
    by_op = dict(flops.forward_by_op)
    for op, v in prefix.items():
        by_op[op] = by_op.get(op, 0) + v
    return replace(
        flops,
        forward=flops.forward + sum(prefix.values()),
        forward_by_op=tuple(sorted(by_op.items())),
    )


class _Runner:
    """Measures rows of one model on one batch."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        x: torch.Tensor,
        convs: list[ConvCall],
        counts: Sequence[int],
        *,
        reuse_prefix: bool = True,
    ) -> None:
        self.model = model
        self.name = name
        self.x = x
        self.example = x[:1]  # execution order needs one image
        self.convs = {c.name: c for c in convs}
        self.batch = int(x.shape[0])
        self.resolution = int(x.shape[-1])
        # Everything below the first trainable module is frozen and the same in
        # every row: computed once (at the full batch, in training mode, as the
        # rows run), replayed in each row, its counted forward flops added back.
        self.prefix: FrozenPrefix | None = None
        if reuse_prefix:
            trainable = {
                n: fine_tuned_modules(model, T.tuned_convs(model, n, self.example), self.example)
                for n in counts
            }
            self.prefix = FrozenPrefix(model, trainable, self.example)
            with preserved_training_state(model), torch.no_grad():
                self.prefix.record(model, x, count_flops=True)

    def prepared(self, layers: int, method: str, rank: Any = None) -> tuple[nn.Module, list[str]]:
        """A copy of the model fine-tuning the last ``layers`` convs with ``method``."""
        model = copy.deepcopy(self.model)
        names = T.freeze_for(model, layers, self.example)
        if method != "vanilla":
            convert(model, method=method, rank=rank, layers=names, patch=PATCH)
        return model, names

    def replaying(self, model: nn.Module, layers: int) -> contextlib.AbstractContextManager[None]:
        """Replay the frozen prefix of the ``layers`` rows in ``model`` (when reused)."""
        if self.prefix is None:
            return contextlib.nullcontext()
        return self.prefix.replaying(model, layers)

    def asi_ranks(self, layers: int, threshold: float) -> dict[str, tuple[int, ...]]:
        model, names = self.prepared(layers, "vanilla")
        targets = torch.zeros(self.batch, dtype=torch.long)
        with self.replaying(model, layers):
            alloc = T.asi_budget_ranks(model, [(self.x, targets)], names, [threshold])
        return alloc[threshold].ranks

    def row(self, layers: int, method: str, rank: Any) -> TableRow:
        start = time.perf_counter()
        model, names = self.prepared(layers, method, rank)
        # For ASI this forward is the cold start (HOSVD at the fixed ranks), so
        # the counted step below is a steady-state warm step.
        with self.replaying(model, layers):
            report = activation_memory(model, self.x, layers=names)
            flops = training_step_flops(model, self.x)
        if self.prefix is not None:
            flops = _with_prefix_flops(flops, self.prefix.forward_flops(layers, self.x))
        seconds = time.perf_counter() - start
        by_name = {layer.name: layer for layer in report.layers}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the measuring forward")
        ranks = tuple(
            (n, tuple(by_name[n].ranks or ())) for n in names if by_name[n].ranks is not None
        )
        rank_list = [r for _, r in ranks] if method in ("hosvd", "asi") else None
        convs = [self.convs[n] for n in names]
        return TableRow(
            model=self.name,
            method=method,
            layers=layers,
            batch=self.batch,
            resolution=self.resolution,
            layer_names=tuple(names),
            mem_bytes=report.kept_bytes,
            analytic_bytes=paper_mem_bytes(convs, method, self.batch, ranks=rank_list),
            saved_bytes=report.total_bytes,
            flops=flops,
            paper_convention=paper_flops(convs, method, self.batch, ranks=rank_list),
            ranks=ranks,
            seconds=seconds,
            paper=paper_figure(self.name, method, layers),
        )


def run_table(
    model: str = "resnet18",
    *,
    batch: int = 64,
    resolution: int = 224,
    layers: Sequence[int] = (2, 4),
    methods: Sequence[str] = PAPER_METHODS,
    rank: float = 0.8,
    weights: str | None = None,
    num_classes: int = 1000,
    source: str = "images",
    seed: int = 0,
    reuse_prefix: bool = True,
) -> TableResult:
    """Measure the table's rows for one model.

    Parameters
    ----------
    model : str
        A :data:`tensorcompress.models.MODEL_NAMES` name.
    batch, resolution : int
        Batch size and input side.
    layers : sequence of int
        Numbers of fine-tuned convs (each between 1 and the model's conv count).
    methods : sequence of str
        Among :data:`~tensorcompress.experiments.paper.PAPER_METHODS`; rows come
        method by method, as in the paper.
    rank : float, default 0.8
        HOSVD's explained-variance threshold (ASI's budget is HOSVD's memory at it).
    weights : str, optional
        A state_dict file for the model (random initialisation otherwise).
    num_classes : int, default 1000
        Classifier outputs (must match ``weights``).
    source : {"images", "random"}
        Where the batch comes from (see :func:`make_batch`).
    seed : int
        Seeds the batch.
    reuse_prefix : bool, default True
        Compute the frozen layers below the first trainable one once and
        replay their outputs in every row (their counted forward flops are
        added back). The figures are the same either way; it only saves time.

    Returns
    -------
    TableResult

    Raises
    ------
    ValueError
        On an unknown model or method, a non-positive batch, resolution or
        layer count, more layers than the model has convs, a resolution too
        small for the model, or a threshold outside (0, 1].
    """
    key = _model_key(model)
    methods = _check_methods(methods)
    batch = _check_positive(batch, "batch")
    resolution = _check_positive(resolution, "resolution")
    if isinstance(layers, (int, str)) or not layers:
        raise ValueError(f"layers must be a non-empty list of positive ints, got {layers!r}")
    counts = tuple(dict.fromkeys(_check_positive(n, "layers") for n in layers))
    threshold = _check_rank(rank)
    num_classes = _check_positive(num_classes, "num_classes")
    if source not in ("images", "random"):
        raise ValueError(f"input must be 'images' or 'random', got {source!r}")

    with torch.random.fork_rng():  # seeded initialisation, the caller's RNG state untouched
        torch.manual_seed(seed)
        net = get_model(key, num_classes=num_classes, weights=weights)
    convs = probe_convs(net, resolution)
    too_many = [n for n in counts if n > len(convs)]
    if too_many:
        raise ValueError(
            f"layers {too_many} exceed the {len(convs)} Conv2d layers of {key}; "
            f"choose between 1 and {len(convs)}"
        )
    x = make_batch(batch, resolution, source=source, seed=seed)
    runner = _Runner(net, key, x, convs, counts, reuse_prefix=reuse_prefix)

    notes = [
        f"{key}, batch {batch}, {resolution}x{resolution}, float32 on cpu; weights: "
        + (f"{weights}" if weights else f"random initialisation (seed {seed}, no --weights)"),
        "input: "
        + (
            f"{batch} random crops of scikit-learn's sample images (seed {seed})"
            if source == "images"
            else f"uniform noise (seed {seed})"
        )
        + ", ImageNet-normalised",
    ]
    if "hosvd" in methods or "asi" in methods:
        notes.append(f"HOSVD ranks: explained variance {threshold} on this batch")
    if "asi" in methods:
        notes.append(
            f"ASI ranks: fit HOSVD's memory at {threshold} (budget.plan_ranks on this batch)"
        )

    rows: list[TableRow] = []
    for method in methods:
        for n in counts:
            if method == "asi":
                rank_arg: Any = runner.asi_ranks(n, threshold)
            else:
                rank_arg = threshold if method == "hosvd" else None
            rows.append(runner.row(n, method, rank_arg))
    settings = (
        ("input", source),
        ("seed", seed),
        ("weights", weights),
        ("rank", threshold),
        ("asi_ranks", "budget" if "asi" in methods else None),
    )
    return TableResult(rows=tuple(rows), notes=tuple(notes), settings=settings)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _fmt(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.2f}"


def format_table(result: TableResult, *, paper: bool = False) -> str:
    """The rows as aligned text, notes above and a legend below."""
    lines = list(result.notes)
    head = f"{'method':<16}{'N':>3}{'Mem MB':>10}{'analytic':>10}"
    if paper:
        head += f"{'paper':>8}"
    head += f"{'saved MB':>10}{'GFLOPs':>10}{'fwd':>9}{'decomp':>9}{'bwd':>9}{'paper-conv':>12}"
    if paper:
        head += f"{'paper':>9}"
    lines += ["", head, "-" * len(head)]
    for r in result.rows:
        fig = r.paper
        line = f"{r.method:<16}{r.layers:>3}{r.mem_mb:10.2f}{r.analytic_mb:10.2f}"
        if paper:
            line += _fmt(None if fig is None else fig.mem_mb, 8)
        line += (
            f"{r.saved_mb:10.2f}{r.flops.gflops:10.2f}{r.flops.forward / 1e9:9.2f}"
            f"{r.flops.decomposition / 1e9:9.2f}{r.flops.backward / 1e9:9.2f}"
            f"{r.paper_convention.gflops:12.2f}"
        )
        if paper:
            line += _fmt(None if fig is None else fig.gflops, 9)
        lines.append(line)
    lines += [
        "",
        "Mem: what the last N convs keep for their weight gradients (the paper's Mem), "
        "measured from autograd's saved tensors; analytic: the formula on the conv shapes. "
        "MB = 2**20 bytes.",
        "saved: every activation autograd keeps for the step (BatchNorm, ReLU, classifier "
        "included); trainable: the last N convs and every parameter after the first of them.",
        "GFLOPs = fwd + decomp + bwd, counted by torch's FlopCounterMode (2 flops per MAC) with "
        "QR/eigh/SVD formulas; the whole network's forward, the backward autograd runs.",
        "paper-conv: the paper's formulas (MACs of the fine-tuned convs only, groups and "
        "stride ignored)"
        + ("; paper: the paper's figure (ImageNet weights and data)." if paper else "."),
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tensorcompress table``."""
    parser.add_argument(
        "--model",
        default="resnet18",
        help=f"one of {', '.join(MODEL_NAMES)}, or tinyllama-1.1b (its memory by formula)",
    )
    parser.add_argument("--batch", type=int, default=None, help="batch size (64; Llama 8)")
    parser.add_argument("--resolution", type=int, default=224, help="input side in pixels")
    parser.add_argument(
        "--layers", type=int, nargs="+", default=[2, 4], help="numbers of fine-tuned last convs"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(PAPER_METHODS),
        help=f"among {', '.join(PAPER_METHODS)}",
    )
    parser.add_argument(
        "--rank", type=float, default=0.8, help="HOSVD explained-variance threshold"
    )
    parser.add_argument("--weights", default=None, help="a state_dict file for the model")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs")
    parser.add_argument(
        "--input",
        dest="source",
        default="images",
        help="'images' (crops of scikit-learn's sample images) or 'random' (noise)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the batch")
    parser.add_argument("--paper", action="store_true", help="show the paper's figures beside")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    LT.add_llama_arguments(
        parser.add_argument_group(
            "tinyllama-1.1b", "the memory of fine-tuning its last N blocks, by formula"
        )
    )


def main(args: argparse.Namespace) -> int:
    """Run ``tensorcompress table``."""
    if LT.is_llama_model(args.model):
        return LT.main(args)
    start = time.perf_counter()
    result = run_table(
        args.model,
        batch=64 if args.batch is None else args.batch,
        resolution=args.resolution,
        layers=args.layers,
        methods=args.methods,
        rank=args.rank,
        weights=args.weights,
        num_classes=args.num_classes,
        source=args.source,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(result.to_rows(), indent=2))
    else:
        print(format_table(result, paper=args.paper))
        print(f"({len(result.rows)} rows in {time.perf_counter() - start:.1f} s)")
    return 0
