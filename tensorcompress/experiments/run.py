"""``tensorcompress run``: an on-device fine-tuning experiment, end to end.

A model is pretrained on a source task (procedural shapes, cached on disk),
then its last N convs (and everything after them) are fine-tuned on a target
task (scikit-learn's digits by default), once per method:

- ``vanilla``: plain autograd, on all layers and on the last N;
- ``gradient_filter``: Gradient Filtering with patch R (default 2);
- ``hosvd``: ST-HOSVD every step at explained variance ε (default 0.8);
- ``svd``: truncated SVD of the channel unfolding at explained variance ε;
- ``asi``: Activation Subspace Iteration with per-layer ranks allocated under
  HOSVD's memory at ε (:func:`tensorcompress.torch.budget.plan_ranks`, the
  paper's protocol).

For each (method, layers) it reports top-1 test accuracy, the activation
memory the fine-tuned convs keep (paper convention) and all the activations
the step keeps (:func:`tensorcompress.torch.measure.activation_memory`), the
training FLOPs of one step (:func:`tensorcompress.torch.flops.training_step_flops`)
and the median step time with its ratio to vanilla, all from the same run.

Model and resolution: MCUNet-in1 at 48x48 by default. MCUNet is the paper's
headline model and the cheapest of :mod:`tensorcompress.models` on a CPU;
48 is the smallest side at which its last stage still has spatial extent
(2x2 after the /32 downsampling; at 32 it is 1x1 and the spatial modes that
Tucker compresses vanish), and an integer upscale (x6) of the 8x8 digits.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tensorcompress.experiments import data as D
from tensorcompress.experiments import report as R
from tensorcompress.experiments import train as T
from tensorcompress.models import MODEL_NAMES, get_model
from tensorcompress.torch import METHODS, convert
from tensorcompress.torch.flops import training_step_flops
from tensorcompress.torch.measure import activation_memory

__all__ = [
    "RunConfig",
    "add_arguments",
    "config_from_args",
    "main",
    "prepare",
    "run_experiment",
]


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines an experiment.

    Attributes
    ----------
    model : str
        A :data:`tensorcompress.models.MODEL_NAMES` name.
    resolution : int
        Input side in pixels.
    layers : tuple of str
        ``"all"`` (vanilla only: the full fine-tuning reference) and numbers
        of fine-tuned last convs, as strings (``("all", "2", "4")``).
    methods : tuple of str
        Among :data:`tensorcompress.torch.METHODS` (all of them, in that order,
        by default).
    threshold : float
        Explained variance of HOSVD and SVD, and the budget ``hosvd@threshold`` of ASI.
    patch : int
        Gradient filter patch size R.
    finetune : FineTuneConfig
        Fine-tuning hyper-parameters.
    pretrain : PretrainConfig
        Pretraining hyper-parameters (part of the cache key).
    seed : int
        Base seed: the train/test split and the first repeat.
    seeds : int
        Repeats with seeds ``seed .. seed + seeds - 1``, each with its own
        pretraining (cached per seed) and fine-tuning order, classifier
        initialisation and ASI seed, on the base seed's split: the table
        shows mean and spread.
    data : str or None
        Target data (image folder or .npz); None: scikit-learn's digits.
    weights : str or None
        A state_dict for the model instead of pretraining.
    test_fraction : float
        Held-out share when the data have no test split of their own.
    train_samples, test_samples : int or None
        Stratified caps on the split sizes (None: everything).
    cache_dir : str or None
        Pretrained-checkpoint cache (None: no cache).
    budget_batches : int
        Training batches :func:`~tensorcompress.torch.budget.plan_ranks` measures.
    timing_rounds : int
        Interleaved timing rounds (one step per configuration each).
    device : str
        ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).
    quiet : bool
        No progress bars or per-run lines.
    """

    model: str = "mcunet_in1"
    resolution: int = 48
    layers: tuple[str, ...] = ("all", "2", "4")
    methods: tuple[str, ...] = METHODS
    threshold: float = 0.8
    patch: int = 2
    finetune: T.FineTuneConfig = field(default_factory=T.FineTuneConfig)
    pretrain: T.PretrainConfig = field(default_factory=T.PretrainConfig)
    seed: int = 0
    seeds: int = 1
    data: str | None = None
    weights: str | None = None
    test_fraction: float = 0.25
    train_samples: int | None = None
    test_samples: int | None = None
    cache_dir: str | None = None
    budget_batches: int = 2
    timing_rounds: int = 5
    device: str = "cpu"
    quiet: bool = False

    def __post_init__(self) -> None:
        key = self.model.lower().replace("-", "_")
        if key not in MODEL_NAMES:
            raise ValueError(
                f"unknown model {self.model!r}; valid names are: {', '.join(MODEL_NAMES)}"
            )
        object.__setattr__(self, "model", key)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"unknown method(s) {unknown or list(self.methods)}; valid methods are: "
                f"{', '.join(METHODS)}"
            )
        object.__setattr__(self, "methods", tuple(dict.fromkeys(self.methods)))
        layers = []
        for item in self.layers:
            text = str(item).strip().lower()
            if text != "all" and (not text.isdigit() or int(text) < 1):
                raise ValueError(f"--layers takes 'all' or positive ints, got {item!r}")
            layers.append(text if text == "all" else str(int(text)))
        if not layers:
            raise ValueError("--layers is empty; give 'all' and/or numbers of last convs")
        object.__setattr__(self, "layers", tuple(dict.fromkeys(layers)))
        if not self.rows():
            raise ValueError(
                "nothing to run: 'all' is for vanilla only; give numbers of layers for "
                f"{', '.join(self.methods)}"
            )
        positive = {
            "--resolution": self.resolution,
            "--patch": self.patch,
            "--epochs": self.finetune.epochs,
            "--batch-size": self.finetune.batch_size,
            "--pretrain-steps": self.pretrain.steps,
            "--seeds": self.seeds,
            "--budget-batches": self.budget_batches,
            "--timing-rounds": self.timing_rounds,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value}")
        for name, cap in {
            "--train-samples": self.train_samples,
            "--test-samples": self.test_samples,
        }.items():
            if cap is not None and cap < 2:
                raise ValueError(f"{name} must be at least 2, got {cap}")
        if self.resolution < 16:
            raise ValueError(f"--resolution must be at least 16 pixels, got {self.resolution}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"--threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if not (self.finetune.lr > 0 and math.isfinite(self.finetune.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.finetune.lr}")

    def rows(self) -> list[tuple[str, str]]:
        """The (method, layers) configurations, in table order."""
        return [(m, n) for m in self.methods for n in self.layers if n != "all" or m == "vanilla"]


LABELS = {
    "vanilla": "vanilla",
    "gradient_filter": "gradient filter R{patch}",
    "hosvd": "HOSVD ε={eps}",
    "svd": "SVD ε={eps}",
    "asi": "ASI (budget)",
}


def _label(method: str, config: RunConfig) -> str:
    return LABELS[method].format(patch=config.patch, eps=config.threshold)


# ---------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------


@dataclass
class _Trained:
    """A fine-tuned configuration kept for the interleaved timing."""

    method: str
    layers: str
    stepper: T.Stepper
    result: dict[str, Any]


def _asi_ranks(
    model: nn.Module,
    names: list[str],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    threshold: float,
    env: T.DistEnv,
) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """ASI's per-layer ranks under HOSVD's memory, decided on process 0 and shared.

    The allocation of ``plan_ranks(..., budget="hosvd@threshold")`` on the
    first training batches (:func:`~tensorcompress.experiments.train.asi_budget_ranks`).
    """
    shared = None
    if env.main:
        alloc = T.asi_budget_ranks(model, batches, names, [threshold])[threshold]
        ranks = {n: tuple(int(r) for r in alloc.ranks[n]) for n in names}
        info = {
            "source": f"budget.plan_ranks(budget='hosvd@{threshold}')",
            "budget_bytes": alloc.budget_bytes,
            "allocated_bytes": alloc.total_bytes,
            "thresholds": alloc.thresholds,
        }
        shared = (ranks, info)
    ranks, info = env.broadcast(shared)
    return ranks, info


def prepare(
    method: str,
    layers: str,
    seed: int,
    config: RunConfig,
    state: dict[str, torch.Tensor],
    train: D.ImageData,
    example: torch.Tensor,
    env: T.DistEnv,
) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """The model of one configuration, ready to fine-tune.

    The backbone with a fresh classifier (seeded by ``seed``), frozen by
    :func:`~tensorcompress.experiments.train.freeze_for` (the rule
    ``tensorcompress table`` uses too) and converted for ``method``.

    Parameters
    ----------
    method, layers : str
        The configuration (``layers``: ``"all"`` or a number of last convs).
    seed : int
        Seeds the classifier, the ASI budget batches and the layers.
    config : RunConfig
        The experiment.
    state : dict
        The pretrained backbone.
    train : ImageData
        Training split (ASI measures its budget on its first batches).
    example : Tensor
        One batch on the device, to find execution order.
    env : DistEnv
        Process placement.

    Returns
    -------
    tuple
        The model, the fine-tuned convs and extra result fields (ASI's ranks).
    """
    device = env.device
    model = T.load_backbone(config.model, train.num_classes, state, seed).to(device)
    names = T.freeze_for(model, layers, example)
    extra: dict[str, Any] = {}
    rank: Any = config.threshold
    if method == "asi":
        batches = [
            (D.to_input(images, device), labels.to(device))
            for images, labels in T.step_iter(
                train, config.budget_batches, config.finetune.batch_size, seed, env
            )
        ]
        ranks, extra["asi_ranks"] = _asi_ranks(model, names, batches, config.threshold, env)
        rank = {n: ranks[n] for n in names}
    if method != "vanilla":
        convert(model, method=method, rank=rank, layers=names, patch=config.patch, seed=seed)
    return model, names, extra


def _run_one(
    method: str,
    layers: str,
    seed: int,
    config: RunConfig,
    state: dict[str, torch.Tensor],
    train: D.ImageData,
    test: D.ImageData,
    measure: tuple[torch.Tensor, torch.Tensor],
    env: T.DistEnv,
    progress: str | None,
) -> _Trained:
    device = env.device
    x_measure = D.to_input(measure[0], device)
    y_measure = measure[1].to(device)
    model, names, extra = prepare(method, layers, seed, config, state, train, x_measure, env)
    net: nn.Module = model
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    start = time.perf_counter()
    log, stepper = T.fine_tune(net, train, config.finetune, seed=seed, env=env, progress=progress)
    train_seconds = time.perf_counter() - start
    accuracy = T.evaluate(model, test, env)

    # Measured after training: ASI is in its steady state (warm start), and
    # HOSVD's ranks are those of the trained weights.
    memory = activation_memory(model, x_measure, layers=names)
    step = training_step_flops(
        model, x_measure, loss_fn=lambda out: F.cross_entropy(out, y_measure)
    )
    result = {
        "method": method,
        "label": _label(method, config),
        "layers": layers,
        "seed": seed,
        "accuracy": accuracy,
        "mem_bytes": memory.kept_bytes,
        "mem_analytic_bytes": memory.analytic_bytes,
        "mem_vanilla_bytes": memory.vanilla_bytes,
        "mem_full_bytes": memory.total_bytes,
        "gflops": step.gflops,
        "decomp_gflops": step.decomposition / 1e9,
        "gflops_detail": {
            "forward": step.forward / 1e9,
            "decomposition": step.decomposition / 1e9,
            "backward": step.backward / 1e9,
        },
        "train_seconds": train_seconds,
        "train_step_seconds": log.median_step(),
        "final_loss": sum(log.losses[-5:]) / len(log.losses[-5:]),
        "steps": len(log.losses),
        "layer_names": names,
        "ranks": {
            layer.name: list(layer.ranks) for layer in memory.layers if layer.ranks is not None
        },
        **extra,
    }
    return _Trained(method, layers, stepper, result)


def _interleaved_timing(
    trained: Sequence[_Trained], batch: tuple[torch.Tensor, torch.Tensor], rounds: int
) -> None:
    """Median step time per configuration, the configurations interleaved round by round.

    One untimed warm-up round first; then ``rounds`` rounds, each running one
    step of every configuration in turn on the same batch, so slow drifts of
    the machine (other load, thermal state) hit every method alike. The
    learning-rate schedule is not advanced (training is over; the accuracy
    was measured before).
    """
    times: list[list[float]] = [[] for _ in trained]
    for r in range(rounds + 1):
        for k, t in enumerate(trained):
            _, seconds = t.stepper.step(*batch, schedule=False)
            if r > 0:
                times[k].append(seconds)
    for t, ts in zip(trained, times):
        t.result["step_seconds"] = statistics.median(ts)
        t.result["step_seconds_all"] = ts


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------


@dataclass
class Experiment:
    """What :func:`run_experiment` produced (meaningful on the main process).

    Attributes
    ----------
    config : RunConfig
    rows : list of Row
        Aggregated over seeds.
    notes : list of str
        Provenance: data, pretraining, rank source, machine.
    results : list of dict
        Per (seed, method, layers).
    meta : dict
        Configuration, environment and pretraining info for results.json.
    """

    config: RunConfig
    rows: list[R.Row]
    notes: list[str]
    results: list[dict[str, Any]]
    meta: dict[str, Any]

    def table(self) -> str:
        """The printed table."""
        return R.format_table(self.rows, self.notes, seeds=self.config.seeds)


def _target_data(config: RunConfig) -> tuple[D.ImageData, D.ImageData, str]:
    if config.data is None:
        train, test = D.split(D.digits(config.resolution), config.test_fraction, config.seed)
        source = "scikit-learn digits (8x8, upscaled)"
    else:
        data, given_test = D.load_data(config.data, config.resolution)
        if given_test is None:
            train, test = D.split(data, config.test_fraction, config.seed)
            source = f"{config.data} (held-out split {config.test_fraction:g})"
        else:
            train, test = data, given_test
            source = f"{config.data} (its x_test/y_test as test split)"
    train = D.subsample(train, config.train_samples, config.seed)
    test = D.subsample(test, config.test_samples, config.seed + 1)
    return train, test, source


def run_experiment(config: RunConfig, env: T.DistEnv | None = None) -> Experiment:
    """Pretrain (or load), fine-tune every configuration, measure, aggregate.

    Parameters
    ----------
    config : RunConfig
        The experiment.
    env : DistEnv, optional
        Process placement (single CPU process by default).

    Returns
    -------
    Experiment
    """
    env = T.DistEnv() if env is None else env
    progress = not config.quiet and env.main
    wall = time.perf_counter()
    if env.device.type == "cuda":
        # cuBLAS needs this before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=env.device.type == "cuda")
    try:
        return _run(config, env, progress, wall)
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def _backbone(
    config: RunConfig, seed: int, env: T.DistEnv, progress: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The pretrained state of ``seed`` (process 0 trains or loads it, the others receive it)."""
    cache = None if config.cache_dir is None else Path(config.cache_dir)
    shared = None
    if env.main:
        shared = T.pretrained_state(
            config.model,
            config.resolution,
            seed,
            config.pretrain,
            cache,
            device=env.device,
            progress=progress,
        )
    state, info = env.broadcast(shared)
    return state, {**info, "seed": seed}


def _run(config: RunConfig, env: T.DistEnv, progress: bool, wall: float) -> Experiment:
    train, test, source = _target_data(config)
    # Fail before pretraining on a model the resolution is too small for.
    with torch.no_grad():
        get_model(config.model, num_classes=2).eval()(
            torch.zeros(1, 3, config.resolution, config.resolution)
        )
    user_state = None
    if config.weights is not None:
        user_state = T.user_weights(config.model, config.weights)
    # One fixed batch, the same on every process: memory, FLOPs and timing.
    first = D.batch_indices(len(train), config.finetune.batch_size, seed=config.seed, epoch=0)
    if not first:
        raise ValueError(
            f"{len(train)} training samples make no batch of {config.finetune.batch_size}; "
            "lower --batch-size"
        )
    measure = (train.images[first[0]], train.labels[first[0]])

    runs = config.rows()
    results: list[dict[str, Any]] = []
    pre_info: list[dict[str, Any]] = []
    for seed in range(config.seed, config.seed + config.seeds):
        # Each seed has its own pretrained backbone (cached per seed), so the
        # spread over seeds covers pretraining as well as fine-tuning.
        if user_state is None:
            state, info = _backbone(config, seed, env, progress)
        else:
            state, info = user_state, {"weights": config.weights, "seed": seed}
        pre_info.append(info)
        trained: list[_Trained] = []
        for k, (method, layers) in enumerate(runs):
            label = f"{_label(method, config)}, {layers} layers"
            desc = f"[{k + 1}/{len(runs)}] {label}" + (
                f" (seed {seed})" if config.seeds > 1 else ""
            )
            t = _run_one(
                method,
                layers,
                seed,
                config,
                state,
                train,
                test,
                measure,
                env,
                desc if progress else None,
            )
            trained.append(t)
            if progress:
                r = t.result
                tqdm.write(
                    f"{desc}: accuracy {100 * r['accuracy']:.1f}%, "
                    f"Mem {r['mem_bytes'] / R.MB:.3f} MB, trained in {r['train_seconds']:.1f} s",
                    file=sys.stderr,
                )
        _interleaved_timing(trained, measure, config.timing_rounds)
        results += [t.result for t in trained]
        del trained

    rows = R.summarise(results)
    notes = _notes(config, env, source, train, test, pre_info, rows)
    meta = {
        "config": {
            **asdict(config),
            "layers": list(config.layers),
            "methods": list(config.methods),
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "device": str(env.device),
            "processes": env.world,
        },
        "data": {
            "source": source,
            "train": len(train),
            "test": len(test),
            "classes": list(train.classes),
        },
        "pretraining": pre_info,
        "notes": notes,
        "wall_seconds": time.perf_counter() - wall,
    }
    return Experiment(config, rows, notes, results, meta)


def _notes(
    config: RunConfig,
    env: T.DistEnv,
    source: str,
    train: D.ImageData,
    test: D.ImageData,
    pre: Sequence[dict[str, Any]],
    rows: Sequence[R.Row],
) -> list[str]:
    ft = config.finetune
    notes = [
        f"{config.model} at {config.resolution}x{config.resolution}, batch {ft.batch_size}"
        + (f" per process x {env.world} processes" if env.distributed else "")
        + f", {ft.epochs} epoch{'s' if ft.epochs > 1 else ''}, SGD lr {ft.lr:g}, on {env.device}"
        + (f" ({torch.get_num_threads()} threads)" if env.device.type == "cpu" else ""),
        f"target: {source}: {len(train)} train / {len(test)} test, {train.num_classes} classes",
    ]
    if config.weights is not None:
        notes.append(f"backbone: {config.weights} (--weights)")
    else:
        for p in pre:
            how = "cached" if p.get("cached") else f"pretrained in {p['seconds']:.0f} s"
            notes.append(
                f"backbone: {how} on procedural shapes and glyphs ({config.pretrain.steps} "
                f"steps, seed {p['seed']}), held-out source accuracy "
                f"{100 * p['source_accuracy']:.1f}%"
            )
    if "asi" in config.methods:
        notes.append(
            f"ASI ranks: budget allocation at HOSVD's memory (hosvd@{config.threshold}) on "
            f"{config.budget_batches} training batches"
        )
    if config.seeds > 1:
        notes.append(
            f"seeds {config.seed}..{config.seed + config.seeds - 1}: each seed pretrains its own "
            "backbone (unless --weights) and fine-tunes with its own order, classifier init and "
            "ASI seed; the train/test split is the base seed's"
        )
    notes += _findings(rows)
    return notes


def _paired_gap(a: R.Row, b: R.Row) -> tuple[float, float, int]:
    """Accuracy of ``a`` minus ``b`` in points, seed by seed: mean, sample std, seed count."""
    acc_b = {s["seed"]: s["accuracy"] for s in b.seeds}
    gaps = [100 * (s["accuracy"] - acc_b[s["seed"]]) for s in a.seeds if s["seed"] in acc_b]
    if not gaps:
        return a.accuracy - b.accuracy, math.nan, 0
    mean = statistics.fmean(gaps)
    return mean, statistics.stdev(gaps) if len(gaps) > 1 else 0.0, len(gaps)


def _findings(rows: Sequence[R.Row]) -> list[str]:
    """Plain statements comparing ASI with vanilla and HOSVD at each depth (no spin).

    Accuracy gaps are paired by seed (same backbone, same data order), so the
    spread is that of the difference, not of either method.
    """
    by = {(r.method, r.layers): r for r in rows}
    out = []
    for (method, layers), asi in by.items():
        if method != "asi":
            continue
        van, hos = by.get(("vanilla", layers)), by.get(("hosvd", layers))
        parts = []
        if van is not None and van.mem_mb > 0:
            gap, spread, n = _paired_gap(asi, van)
            parts.append(
                f"Mem {100 * asi.mem_mb / van.mem_mb:.1f}% of vanilla's, accuracy "
                f"{gap:+.1f}" + (f"±{spread:.1f}" if n > 1 else "") + " points vs vanilla"
            )
        if hos is not None and hos.mem_mb > 0:
            gap, spread, n = _paired_gap(asi, hos)
            parts.append(
                f"Mem {asi.mem_mb / hos.mem_mb:.2f}x HOSVD's, accuracy {gap:+.1f}"
                + (f"±{spread:.1f}" if n > 1 else "")
                + " points vs HOSVD"
            )
            if hos.gflops > 0 and hos.decomp_gflops > 0:  # False when not counted (NaN)
                parts.append(
                    f"GFLOPs {asi.gflops / hos.gflops:.2f}x HOSVD's (decomposition "
                    f"{asi.decomp_gflops / hos.decomp_gflops:.3f}x)"
                )
        if parts:
            out.append(f"ASI, {layers} layers: " + "; ".join(parts))
    return out


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

_FULL = {
    "resolution": 48,
    "layers": ["all", "2", "4"],
    "epochs": 8,
    "batch_size": 64,
    "pretrain_steps": 600,
    "train_samples": None,
    "test_samples": None,
    "timing_rounds": 5,
}
_QUICK = {
    "resolution": 32,
    "layers": ["all", "2", "4"],
    "epochs": 1,
    "batch_size": 32,
    "pretrain_steps": 40,
    "train_samples": 320,
    "test_samples": 200,
    "timing_rounds": 2,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tensorcompress run``."""
    g = parser.add_argument_group("experiment")
    g.add_argument("--model", default="mcunet_in1", help=f"one of {', '.join(MODEL_NAMES)}")
    g.add_argument("--resolution", type=int, help="input side in pixels (48; --quick 32)")
    g.add_argument(
        "--layers",
        nargs="+",
        help="'all' (vanilla only) and numbers of fine-tuned last convs (all 2 4)",
    )
    g.add_argument(
        "--methods", nargs="+", default=list(METHODS), help=f"among {', '.join(METHODS)}"
    )
    g.add_argument(
        "--threshold", type=float, default=0.8, help="HOSVD/SVD explained variance (0.8)"
    )
    g.add_argument("--patch", type=int, default=2, help="gradient filter patch R (2)")
    g.add_argument("--epochs", type=int, help="fine-tuning epochs (8; --quick 1)")
    g.add_argument("--batch-size", type=int, help="per process (64; --quick 32)")
    g.add_argument("--lr", type=float, default=0.1, help="fine-tuning learning rate (0.1)")
    g.add_argument("--pretrain-steps", type=int, help="source-task steps (600; --quick 40)")
    g.add_argument("--seed", type=int, default=0, help="base seed (0)")
    g.add_argument("--seeds", type=int, default=1, help="fine-tuning repeats; mean and spread")
    g.add_argument("--timing-rounds", type=int, help="interleaved timing rounds (5; --quick 2)")
    g.add_argument("--quick", action="store_true", help="smaller everything (about a minute)")
    d = parser.add_argument_group("data and weights")
    d.add_argument("--data", help="image folder (one subfolder per class) or .npz with x, y")
    d.add_argument("--weights", help="a state_dict for --model instead of pretraining")
    d.add_argument("--test-fraction", type=float, default=0.25, help="held-out share (0.25)")
    d.add_argument("--train-samples", type=int, help="cap on training samples (stratified)")
    d.add_argument("--test-samples", type=int, help="cap on test samples (stratified)")
    o = parser.add_argument_group("output and machine")
    o.add_argument("--out", default="tensorcompress-results", help="results folder")
    o.add_argument(
        "--cache-dir", default=None, help=f"pretrained checkpoints ({T.default_cache_dir()})"
    )
    o.add_argument("--no-cache", action="store_true", help="always pretrain, store nothing")
    o.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    o.add_argument("--threads", type=int, help="torch CPU threads (torch's default)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` of parsed arguments (``--quick`` fills the unset sizes)."""
    preset = _QUICK if args.quick else _FULL

    def pick(name: str) -> Any:
        value = getattr(args, name, None)
        return preset[name] if value is None else value

    pretrain = T.PretrainConfig(steps=pick("pretrain_steps"))
    if args.quick:
        pretrain = replace(pretrain, batch_size=32, eval_samples=200)
    cache = None if args.no_cache else str(args.cache_dir or T.default_cache_dir())
    return RunConfig(
        model=args.model,
        resolution=pick("resolution"),
        layers=tuple(str(x) for x in pick("layers")),
        methods=tuple(args.methods),
        threshold=args.threshold,
        patch=args.patch,
        finetune=T.FineTuneConfig(epochs=pick("epochs"), batch_size=pick("batch_size"), lr=args.lr),
        pretrain=pretrain,
        seed=args.seed,
        seeds=args.seeds,
        data=args.data,
        weights=args.weights,
        test_fraction=args.test_fraction,
        train_samples=pick("train_samples"),
        test_samples=pick("test_samples"),
        cache_dir=cache,
        timing_rounds=pick("timing_rounds"),
        device=args.device,
        quiet=args.quiet,
    )


def main(args: argparse.Namespace) -> int:
    """Run ``tensorcompress run``."""
    config = config_from_args(args)
    out = R.check_writable(args.out)
    threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive int, got {args.threads}")
        torch.set_num_threads(args.threads)
    env = T.init_distributed(config.device)
    try:
        exp = run_experiment(config, env)
        if env.main:
            table = exp.table()
            files = R.write_results(out, exp.rows, exp.meta, table)
            print(table)
            pre = exp.meta["pretraining"]
            fresh = sum(p["seconds"] for p in pre if "weights" not in p and not p.get("cached"))
            how = (
                "weights from --weights"
                if config.weights is not None
                else f"of which pretraining {fresh:.1f} s"
                if fresh
                else "pretraining cached"
            )
            print(
                f"\n{len(exp.results)} fine-tuning runs, {exp.meta['wall_seconds']:.1f} s in all "
                f"({how}); results in {files[0].parent}"
            )
        env.barrier()
    finally:
        T.shutdown_distributed()
        torch.set_num_threads(threads)
    return 0
