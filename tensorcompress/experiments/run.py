"""``tensorcompress run``: an on-device fine-tuning experiment, end to end.

A model is pretrained on a source task (procedural shapes, cached on disk),
then its last N convs (and everything after them) are fine-tuned on a target
task (scikit-learn's digits by default), once per method and threshold:

- ``vanilla``: plain autograd, on all layers and on the last N;
- ``gradient_filter``: Gradient Filtering with patch R (default 2);
- ``hosvd``: ST-HOSVD every step at explained variance ε;
- ``svd``: truncated SVD of the channel unfolding at explained variance ε;
- ``asi``: Activation Subspace Iteration with per-layer ranks allocated under
  HOSVD's memory at ε (:func:`tensorcompress.torch.budget.plan_ranks`, the
  paper's protocol).

HOSVD, SVD and ASI run at every threshold ε of ``--thresholds`` (0.8 0.9 0.95
by default), so each traces a frontier of accuracy against memory and
compute. For each configuration it reports top-1 test accuracy, the
activation memory the fine-tuned convs keep (paper convention) and all the
activations the step keeps (:func:`tensorcompress.torch.measure.activation_memory`),
the training FLOPs of one step (:func:`tensorcompress.torch.flops.training_step_flops`)
and the median step time with its ratio to vanilla, all from the same run;
then the paper's equal-accuracy comparison
(:func:`tensorcompress.experiments.frontier.equal_accuracy`): each method's
memory and GFLOPs against vanilla's at vanilla's accuracy, interpolated along
its frontier.

Every configuration with the same last-N layers freezes the same prefix of
the network, so its outputs are computed once per seed and N for every
training and test batch and replayed in each method's fine-tuning
(:class:`~tensorcompress.experiments.prefix.FrozenPrefix`; ``--no-replay``
computes them every time, with the same results). Memory, FLOPs and step
times are measured on the whole model, without the replay.

Model and resolution: MCUNet-in1 at 48x48 by default. MCUNet is the paper's
headline model and the cheapest of :mod:`tensorcompress.models` on a CPU;
48 is the smallest side at which its last stage still has spatial extent
(2x2 after the /32 downsampling; at 32 it is 1x1 and the spatial modes that
Tucker compresses vanish), and an integer upscale (x6) of the 8x8 digits.
"""

from __future__ import annotations

import argparse
import contextlib
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
from torch import nn
from tqdm.auto import tqdm

from tensorcompress import measured_plans
from tensorcompress.experiments import data as D
from tensorcompress.experiments import frontier as FR
from tensorcompress.experiments import kinds as K
from tensorcompress.experiments import report as R
from tensorcompress.experiments import train as T
from tensorcompress.experiments.allocator import add_allocator_argument, use_allocator
from tensorcompress.experiments.prefix import FrozenPrefix
from tensorcompress.models import MODEL_NAMES, get_model
from tensorcompress.torch import METHODS, convert, last_blocks
from tensorcompress.torch.budget import output_grams, plan_weight_ranks
from tensorcompress.torch.flops import training_step_flops
from tensorcompress.torch.lowrank import factor_by_outputs
from tensorcompress.torch.measure import activation_memory
from tensorcompress.torch.selection import execution_order, select_layers
from tensorcompress.torch.transformer import block_names

__all__ = [
    "DEFAULT_THRESHOLDS",
    "PLANS",
    "RUN_MODELS",
    "THRESHOLD_METHODS",
    "Experiment",
    "RunConfig",
    "add_arguments",
    "config_from_args",
    "main",
    "parse_thresholds",
    "prepare",
    "run_experiment",
]

THRESHOLD_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m in {"hosvd", "svd", "asi"})
"""The methods of :data:`tensorcompress.torch.METHODS` that take an explained-variance
threshold (ASI through HOSVD's memory at it): one row per threshold."""

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.8, 0.9, 0.95)
"""Thresholds of a default run: three points of each frontier, from the paper's 0.8 up
towards vanilla's accuracy."""

RUN_MODELS: tuple[str, ...] = (*MODEL_NAMES, "vit_tiny")
"""Models ``tensorcompress run`` fine-tunes: the CNNs, and ViT-Tiny (its last blocks)."""

REPLAY_LIMIT_BYTES = 2**30
"""Largest recorded frozen prefix (per seed and N) kept for replay; above it, computed."""


def parse_thresholds(values: Sequence[Any]) -> tuple[float, ...]:
    """Explained-variance thresholds from the command line (strings or numbers), sorted.

    Raises
    ------
    ValueError
        On an empty list, a value that is not a number, one outside (0, 1], or
        a value given twice; the message is one line naming the value.
    """
    if isinstance(values, (str, bytes)) or not values:
        raise ValueError(
            "--thresholds is empty; give one or more explained variances in (0, 1], "
            "e.g. --thresholds 0.8 0.9 0.95"
        )
    out: list[float] = []
    for value in values:
        try:
            t = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"--thresholds takes numbers in (0, 1], got {value!r}") from None
        if not 0.0 < t <= 1.0:  # False for NaN too
            raise ValueError(f"--thresholds must be in (0, 1], got {value!r}")
        if t in out:
            raise ValueError(f"--thresholds gives {t:g} twice; give each threshold once")
        out.append(t)
    return tuple(sorted(out))


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines an experiment.

    Attributes
    ----------
    model : str
        One of :data:`RUN_MODELS`: a CNN of :data:`tensorcompress.models.MODEL_NAMES`,
        or ``"vit_tiny"`` (a transformer: N counts its last blocks, see
        :mod:`tensorcompress.experiments.kinds`).
    resolution : int
        Input side in pixels.
    layers : tuple of str
        ``"all"`` (vanilla only: the full fine-tuning reference) and numbers
        of fine-tuned last convs (blocks for a transformer), as strings
        (``("all", "2", "4")``).
    methods : tuple of str
        Among the model kind's methods
        (:data:`~tensorcompress.experiments.kinds.CNN_METHODS` for a CNN,
        :data:`~tensorcompress.experiments.kinds.TRANSFORMER_METHODS` for a
        transformer); empty: a CNN's
        :data:`~tensorcompress.experiments.kinds.DEFAULT_CNN_METHODS`, a
        transformer's :data:`~tensorcompress.experiments.kinds.DEFAULT_TRANSFORMER_METHODS`.
    thresholds : tuple of float
        Explained variances of HOSVD and SVD, and the budgets
        ``hosvd@threshold`` of ASI: one row per threshold for each of
        :data:`THRESHOLD_METHODS` (sorted; each in (0, 1], each once).
    patch : int
        Gradient filter patch size R.
    finetune : FineTuneConfig
        Fine-tuning hyper-parameters.
    pretrain : PretrainConfig
        Pretraining hyper-parameters (part of the cache key).
    reuse_pretrain : tuple of PretrainConfig
        Pretraining configurations whose cached checkpoints are used instead
        of ``pretrain``'s when present (``--quick`` reuses a default run's
        backbone); nothing is pretrained for them.
    seed : int
        Base seed: the train/test split and the first repeat.
    seeds : int
        Repeats with seeds ``seed .. seed + seeds - 1``, each with its own
        pretraining (cached per seed) and fine-tuning order, classifier
        initialisation and ASI seed, on the base seed's split: the table
        shows mean and spread.
    tolerance : float or None
        Accuracy points below vanilla's that the equal-accuracy comparison
        counts as equal; None: the run's own noise (:func:`_tolerances`).
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
    replay : bool
        Record the frozen prefix once per seed and N and replay it
        (:class:`~tensorcompress.experiments.prefix.FrozenPrefix`); False
        computes it in every configuration. The results are the same.
    device : str
        ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).
    quiet : bool
        No progress bars or per-run lines.
    plans : {"measured", "estimated"}
        The sweep plans of ASI and HOSVD (:func:`tensorcompress.measured_plans`):
        the fastest measured on each shape's first call (the default), or
        the cost estimate's. Measured plans depend on the machine's timing,
        and each order rounds slightly differently, which training
        amplifies: ASI rows then vary by about a point of accuracy from run
        to run. Estimated plans make a run repeatable.
    product_dtype : {"float32", "bfloat16"}
        The dtype of the tensor products inside ASI's and HOSVD's
        decompositions (WASI's ASI too), as
        :class:`~tensorcompress.torch.CompressionConfig`'s ``product_dtype``:
        ``"bfloat16"`` runs them on a CPU's AMX or a GPU's tensor cores. The
        training itself stays in float32.
    factor : {"all", "smaller"}
        WSI/WASI rows: factor every fine-tuned layer (groups 1) at the row's
        ε (the published method), or only those whose factors hold fewer
        numbers than their weights (``only_if_smaller`` of
        :func:`~tensorcompress.torch.wasi.to_wasi`); the others then train
        dense, WASI's with their inputs compressed as ASI's rows compress
        them.
    weight_ranks : {"threshold", "budget"}
        WSI/WASI rows: each weight's rank keeps the row's ε of its spectrum
        (the published method), or the ranks come from
        :func:`~tensorcompress.torch.budget.plan_weight_ranks`: the bytes the
        weights take at ε, allocated across the layers by their measured
        output errors on the first training batches (with ``factor="smaller"``,
        leaving a layer dense is one of the choices).
    weight_basis : {"weight", "outputs"}
        WSI/WASI rows: factor each weight by its truncated SVD (the published
        method), or in the basis of its outputs on the first training batches
        (``output_grams`` of :func:`~tensorcompress.torch.wasi.to_wasi`: the
        same ranks and bytes, the rank-``k`` weight closest to the layer's
        outputs); with ``weight_ranks="budget"``, the allocation measures
        that factorization's errors.
    frozen_threshold : float or None
        WSI/WASI rows: also factor the frozen layers that run before the
        fine-tuned part (a transformer's Linear layers, a CNN's convs with
        groups 1), in the basis of their outputs on
        the first training batches, at the rank that keeps this share of their
        outputs' energy, where that is smaller
        (:func:`~tensorcompress.torch.lowrank.factor_by_outputs`); they stay
        frozen, and the exported model is low-rank there too. None: the
        frozen layers stay as pretrained.
    blocks : BlockSettings
        Transformers: the attention, the saved form of the compressed
        methods' other tensors and LoRA's rank
        (:class:`~tensorcompress.experiments.kinds.BlockSettings`).
    """

    model: str = "mcunet_in1"
    resolution: int = 48
    layers: tuple[str, ...] = ("all", "2", "4")
    methods: tuple[str, ...] = ()
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    patch: int = 2
    finetune: T.FineTuneConfig = field(default_factory=T.FineTuneConfig)
    pretrain: T.PretrainConfig = field(default_factory=T.PretrainConfig)
    reuse_pretrain: tuple[T.PretrainConfig, ...] = ()
    seed: int = 0
    seeds: int = 1
    tolerance: float | None = None
    data: str | None = None
    weights: str | None = None
    test_fraction: float = 0.25
    train_samples: int | None = None
    test_samples: int | None = None
    cache_dir: str | None = None
    budget_batches: int = 2
    timing_rounds: int = 5
    replay: bool = True
    device: str = "cpu"
    quiet: bool = False
    plans: str = "measured"
    product_dtype: str = "float32"
    factor: str = "all"
    weight_ranks: str = "threshold"
    weight_basis: str = "weight"
    frozen_threshold: float | None = None
    blocks: K.BlockSettings = field(default_factory=K.BlockSettings)

    def __post_init__(self) -> None:
        if self.plans not in PLANS:
            raise ValueError(f"plans must be one of {PLANS}, got {self.plans!r}")
        if self.factor not in FACTOR_CHOICES:
            raise ValueError(f"factor must be one of {FACTOR_CHOICES}, got {self.factor!r}")
        if self.weight_ranks not in WEIGHT_RANK_CHOICES:
            raise ValueError(
                f"weight_ranks must be one of {WEIGHT_RANK_CHOICES}, got {self.weight_ranks!r}"
            )
        if self.weight_basis not in WEIGHT_BASES:
            raise ValueError(
                f"weight_basis must be one of {WEIGHT_BASES}, got {self.weight_basis!r}"
            )
        if self.frozen_threshold is not None and not 0.0 < self.frozen_threshold <= 1.0:
            raise ValueError(
                f"frozen_threshold must be in (0, 1] or None, got {self.frozen_threshold!r}"
            )
        if self.product_dtype not in PRODUCT_DTYPES:
            raise ValueError(
                f"product_dtype must be one of {PRODUCT_DTYPES}, got {self.product_dtype!r}"
            )
        key = self.model.lower().replace("-", "_")
        if key not in RUN_MODELS:
            raise ValueError(
                f"unknown model {self.model!r}; valid names are: {', '.join(RUN_MODELS)}"
            )
        object.__setattr__(self, "model", key)
        valid = self.valid_methods
        if not self.methods:
            default = K.DEFAULT_TRANSFORMER_METHODS if self.transformer else K.DEFAULT_CNN_METHODS
            object.__setattr__(self, "methods", default)
        unknown = [m for m in self.methods if m not in valid]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown} for {key}; valid methods are: {valid}")
        object.__setattr__(self, "methods", tuple(dict.fromkeys(self.methods)))
        object.__setattr__(self, "thresholds", parse_thresholds(self.thresholds))
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
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if not (self.finetune.lr > 0 and math.isfinite(self.finetune.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.finetune.lr}")
        if self.tolerance is not None and not (
            self.tolerance >= 0 and math.isfinite(self.tolerance)
        ):
            raise ValueError(f"--tolerance must be a non-negative number, got {self.tolerance}")

    @property
    def transformer(self) -> bool:
        """Whether the model is a transformer (N counts blocks)."""
        return K.is_transformer(self.model)

    @property
    def products(self) -> torch.dtype | None:
        """:attr:`product_dtype` as the adapter takes it (``None``: float32, the input's)."""
        return None if self.product_dtype == "float32" else torch.bfloat16

    @property
    def valid_methods(self) -> tuple[str, ...]:
        """The model kind's methods."""
        return K.TRANSFORMER_METHODS if self.transformer else K.CNN_METHODS

    @property
    def threshold_methods(self) -> tuple[str, ...]:
        """The methods with one row per threshold: :data:`THRESHOLD_METHODS`, WSI and
        WASI, and for a transformer LoRA+ASI."""
        if self.transformer:
            return (*THRESHOLD_METHODS, "lora+asi", *K.FACTORED_METHODS)
        return (*THRESHOLD_METHODS, *K.FACTORED_METHODS)

    def rows(self) -> list[tuple[str, str, float | None]]:
        """The (method, layers, threshold) configurations, in table order.

        Vanilla runs on every ``layers`` entry, the other methods on the
        numbers only; :attr:`threshold_methods` once per threshold, the
        others with threshold None.
        """
        return [
            (m, n, t)
            for m in self.methods
            for n in self.layers
            if n != "all" or m == "vanilla"
            for t in (self.thresholds if m in self.threshold_methods else (None,))
        ]


LABELS = {
    "vanilla": "vanilla",
    "gradient_filter": "gradient filter R{patch}",
    "hosvd": "HOSVD ε={eps:g}",
    "svd": "SVD ε={eps:g}",
    "asi": "ASI ε={eps:g}",
    "checkpoint": "checkpointing",
    "lora": "LoRA r{r}",
    "lora+asi": "LoRA+ASI ε={eps:g}",
    "wsi": "WSI ε={eps:g}",
    "wasi": "WASI ε={eps:g}",
}
"""Display names; a CNN's ASI ε is that of the HOSVD memory budget it fits, a
transformer's the explained variance its ranks keep."""


def _label(method: str, config: RunConfig, threshold: float | None) -> str:
    return LABELS[method].format(patch=config.patch, eps=threshold, r=config.blocks.lora_r)


# ---------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------


@dataclass
class _Trained:
    """A fine-tuned configuration kept for the interleaved timing."""

    key: tuple[str, str, float | None]
    stepper: T.Stepper
    result: dict[str, Any]


_AsiRanks = dict[float, tuple[dict[str, tuple[int, ...]], dict[str, Any]]]


def _asi_ranks(
    model: nn.Module,
    names: list[str],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    thresholds: Sequence[float],
    env: T.DistEnv,
) -> _AsiRanks:
    """ASI's per-layer ranks under HOSVD's memory at each threshold, decided on process 0.

    The allocation of ``plan_ranks(..., budget="hosvd@threshold")`` on the
    first training batches (:func:`~tensorcompress.experiments.train.asi_budget_ranks`,
    one measurement for every threshold), shared with the other processes.
    """
    shared = None
    if env.main:
        shared = {}
        for t, alloc in T.asi_budget_ranks(model, batches, names, thresholds).items():
            ranks = {n: tuple(int(r) for r in alloc.ranks[n]) for n in names}
            shared[t] = (
                ranks,
                {
                    "source": f"budget.plan_ranks(budget='hosvd@{t}')",
                    "budget_bytes": alloc.budget_bytes,
                    "allocated_bytes": alloc.total_bytes,
                    "thresholds": alloc.thresholds,
                },
            )
    out: _AsiRanks = env.broadcast(shared)
    return out


def _budget_batches(
    train: D.ImageData, config: RunConfig, seed: int, env: T.DistEnv
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (D.to_input(images, env.device), labels.to(env.device))
        for images, labels in T.step_iter(
            train, config.budget_batches, config.finetune.batch_size, seed, env
        )
    ]


def _weight_factors(
    model: nn.Module,
    names: list[str],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    threshold: float,
    config: RunConfig,
    env: T.DistEnv,
) -> tuple[dict[str, int] | None, dict[str, torch.Tensor] | None, dict[str, Any]]:
    """WSI/WASI's per-layer weight ranks (``--weight-ranks budget``) and output Gram
    matrices (``--weight-basis outputs``), decided on process 0 and shared.

    The ranks are ``plan_weight_ranks(..., budget=threshold)`` (the bytes the weights
    take at the threshold, allocated by measured output errors of the factorization
    the row trains; with ``--factor smaller`` a layer left dense is one of the
    choices); None for the threshold's own. The Gram matrices are ``output_grams``
    on ``batches``; None for the SVD. The dict describes both for ``results.json``.
    """
    shared = None
    if env.main:
        grams = output_grams(model, batches, names) if config.weight_basis == "outputs" else None
        ranks: dict[str, int] | None = None
        about: dict[str, Any] = {"basis": config.weight_basis}
        if config.weight_ranks == "budget":
            alloc = plan_weight_ranks(
                model,
                batches,
                names,
                threshold,
                WEIGHT_CANDIDATES,
                only_if_smaller=config.factor == "smaller",
                output_grams=grams,
            )
            ranks = {n: int(alloc[n].ranks[0]) for n in names}
            about.update(
                source=f"budget.plan_weight_ranks(budget={threshold})",
                budget_bytes=alloc.budget_bytes,
                allocated_bytes=alloc.total_bytes,
                thresholds=alloc.thresholds,
            )
        shared = (ranks, grams, about)
    out: tuple[dict[str, int] | None, dict[str, torch.Tensor] | None, dict[str, Any]]
    out = env.broadcast(shared)
    return out


def prepare(
    method: str,
    layers: str,
    threshold: float | None,
    seed: int,
    config: RunConfig,
    state: dict[str, torch.Tensor],
    train: D.ImageData,
    example: torch.Tensor,
    env: T.DistEnv,
    asi_ranks: _AsiRanks | None = None,
) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """The model of one configuration, ready to fine-tune.

    The backbone with a fresh classifier (seeded by ``seed``), frozen by
    :func:`~tensorcompress.experiments.train.freeze_for` (the rule
    ``tensorcompress table`` uses too) and converted for ``method``.

    Parameters
    ----------
    method, layers : str
        The configuration (``layers``: ``"all"`` or a number of last convs).
    threshold : float or None
        Explained variance (HOSVD, SVD) or HOSVD budget (ASI); None otherwise.
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
    asi_ranks : dict, optional
        ASI's ranks per threshold, measured already for these layers and
        seed (else measured here, for ``threshold`` only).

    Returns
    -------
    tuple
        The model, the fine-tuned convs and extra result fields (ASI's ranks).
        A transformer's model comes from
        :func:`~tensorcompress.experiments.kinds.prepare_blocks` (a ``peft``
        model for LoRA), with the layers whose weights train in its blocks.
    """
    model = T.load_backbone(config.model, train.num_classes, state, seed).to(env.device)
    extra: dict[str, Any] = {}
    if method in K.FACTORED_METHODS and config.frozen_threshold is not None and layers != "all":
        extra["frozen_factors"] = _factor_frozen(model, layers, train, seed, config, example, env)
    weight_rank: dict[str, int] | None = None
    grams: dict[str, torch.Tensor] | None = None
    measured = method in K.FACTORED_METHODS and (
        config.weight_ranks == "budget" or config.weight_basis == "outputs"
    )
    if config.transformer:
        if measured:
            assert threshold is not None
            linears = select_layers(model, last_blocks(int(layers)), example)
            batches = _budget_batches(train, config, seed, env)
            weight_rank, grams, extra["weight_factors"] = _weight_factors(
                model, linears, batches, threshold, config, env
            )
        net, names = K.prepare_blocks(
            model,
            method,
            layers,
            threshold,
            example,
            config.blocks,
            seed=seed,
            product_dtype=config.products,
            only_if_smaller=config.factor == "smaller",
            weight_rank=weight_rank,
            output_grams=grams,
        )
        return net, names, extra
    names = T.freeze_for(model, layers, example)
    rank: Any = threshold
    if method == "asi":
        assert threshold is not None
        if asi_ranks is None or threshold not in asi_ranks:
            batches = _budget_batches(train, config, seed, env)
            asi_ranks = _asi_ranks(model, names, batches, [threshold], env)
        ranks, extra["asi_ranks"] = asi_ranks[threshold]
        rank = {n: ranks[n] for n in names}
    if method in K.FACTORED_METHODS:
        assert threshold is not None
        factors = _factorable(model, names)
        if measured and factors:
            batches = _budget_batches(train, config, seed, env)
            weight_rank, grams, extra["weight_factors"] = _weight_factors(
                model, factors, batches, threshold, config, env
            )
        _factor(model, method, names, threshold, seed, config, weight_rank, grams)
    elif method != "vanilla":
        convert(
            model,
            method=method,
            rank=rank,
            layers=names,
            patch=config.patch,
            seed=seed,
            product_dtype=config.products,
        )
    return model, names, extra


def _factor_frozen(
    model: nn.Module,
    layers: str,
    train: D.ImageData,
    seed: int,
    config: RunConfig,
    example: torch.Tensor,
    env: T.DistEnv,
) -> dict[str, Any]:
    """``--frozen-threshold``: the layers that run before the fine-tuned part and factor
    as the fine-tuned ones do (a transformer's Linear layers, a CNN's convs with groups
    1), factored by ``factor_by_outputs`` on the budget batches (their Gram matrices
    measured on process 0 and shared); returns the ranks for results.json."""
    assert config.frozen_threshold is not None
    trained = set(K.trained_modules(model, layers, example, blocks=config.transformer))
    modules = dict(model.named_modules())
    # Hugging Face reads the patch conv's weight dtype: a transformer's Linear layers only.
    kind = nn.Linear if config.transformer else nn.Conv2d
    order = execution_order(model, example)
    frozen = _factorable(
        model, [n for n in order if n not in trained and isinstance(modules[n], kind)]
    )
    grams = None
    if env.main and frozen:
        grams = output_grams(model, _budget_batches(train, config, seed, env), frozen)
    grams = env.broadcast(grams)
    ranks = factor_by_outputs(model, grams or {}, config.frozen_threshold)
    factored = dict(model.named_modules())
    for name in ranks:
        factored[name].requires_grad_(False)
    return {"threshold": config.frozen_threshold, "layers": frozen, "ranks": ranks}


def _factorable(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The convs among ``names`` that WSI/WASI factor: those with groups 1."""
    modules = dict(model.named_modules())
    return [n for n in names if getattr(modules[n], "groups", 1) == 1]


def _factor(
    model: nn.Module,
    method: str,
    names: Sequence[str],
    threshold: float,
    seed: int,
    config: RunConfig,
    weight_rank: dict[str, int] | None = None,
    grams: dict[str, torch.Tensor] | None = None,
) -> None:
    """WSI/WASI on a CNN's fine-tuned convs: those with groups 1 factor (weight at
    ``threshold``, or at ``weight_rank``'s per-layer ranks, in the basis of ``grams``
    when given, and for WASI the input at ``threshold``; with
    ``config.factor == "smaller"`` only those whose factors are smaller); WASI
    compresses the others' inputs with ASI."""
    from tensorcompress.torch.wasi import to_wasi, wasi_layers

    factors = _factorable(model, names)
    if factors:
        to_wasi(
            model,
            method=method,
            rank=threshold if weight_rank is None else weight_rank,
            act_rank=threshold,
            layers=factors,
            seed=seed,
            product_dtype=config.products,
            only_if_smaller=config.factor == "smaller",
            output_grams=grams,
        )
    factored = wasi_layers(model)
    rest = [n for n in names if n not in factored]
    if method == "wasi" and rest:
        convert(
            model,
            method="asi",
            rank=threshold,
            layers=rest,
            seed=seed,
            product_dtype=config.products,
        )


@dataclass
class _Replay:
    """The frozen prefixes of one seed (one plan per N), recorded for every batch."""

    prefix: FrozenPrefix
    states: dict[str, dict[str, torch.Tensor]]


def _record_prefix(
    depths: Sequence[str],
    seed: int,
    config: RunConfig,
    state: dict[str, torch.Tensor],
    data: tuple[D.ImageData, D.ImageData],
    example: torch.Tensor,
    env: T.DistEnv,
) -> _Replay | None:
    """The frozen prefix of every N of ``depths`` on every training and test batch of ``seed``.

    One model runs the training batches in training order (in training mode,
    as the configurations will, so its frozen BatchNorms' running averages
    follow the same updates) and then the test batches (in eval mode); one
    forward records the prefix of every N. None when nothing is frozen, or
    when the recording would pass :data:`REPLAY_LIMIT_BYTES`.
    """
    train, test = data
    model = T.load_backbone(config.model, train.num_classes, state, seed).to(env.device)
    trainable = {n: K.trained_modules(model, n, example, blocks=config.transformer) for n in depths}
    prefix = FrozenPrefix(model, trainable, example)
    if not any(prefix.replays(n) for n in depths):
        return None
    with torch.no_grad():
        model.train()
        for index in T.epoch_batches(len(train), config.finetune, seed, env):
            for images, _ in D.iterate(train, index):
                prefix.record(model, D.to_input(images, env.device))
                if prefix.nbytes > REPLAY_LIMIT_BYTES:
                    return None
        with T.eval_mode(model):
            for _, x in T.eval_batches(test, env):
                prefix.record(model, x)
    return _Replay(prefix, {n: prefix.state(model, n) for n in depths})


def _run_one(
    key: tuple[str, str, float | None],
    seed: int,
    config: RunConfig,
    state: dict[str, torch.Tensor],
    data: tuple[D.ImageData, D.ImageData],
    measure: tuple[torch.Tensor, torch.Tensor],
    env: T.DistEnv,
    progress: str | None,
    asi_ranks: _AsiRanks | None,
    replay: _Replay | None,
) -> _Trained:
    method, layers, threshold = key
    train, test = data
    device = env.device
    x_measure = D.to_input(measure[0], device)
    y_measure = measure[1].to(device)
    model, names, extra = prepare(
        method, layers, threshold, seed, config, state, train, x_measure, env, asi_ranks
    )
    net: nn.Module = model
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if replay is not None and (not replay.prefix.replays(layers) or "frozen_factors" in extra):
        # A factored prefix computes other inputs than the recorded one.
        replay = None
    # A peft model wraps the recorded model's modules under its own names.
    getter = getattr(model, "get_base_model", None)
    base: nn.Module = getter() if callable(getter) else model
    replaying = (
        contextlib.nullcontext() if replay is None else replay.prefix.replaying(base, layers)
    )
    start = time.perf_counter()
    with replaying:
        ft = config.finetune
        ft = replace(ft, lr=K.finetune_lr(method, ft.lr, ft.optimizer))
        log, stepper = T.fine_tune(net, train, ft, seed=seed, env=env, progress=progress)
        train_seconds = time.perf_counter() - start
        accuracy = T.evaluate(model, test, env)
    if replay is not None:
        # What the replay skipped: the frozen BatchNorms' running averages.
        _, unexpected = base.load_state_dict(replay.states[layers], strict=False)
        if unexpected:
            raise RuntimeError(f"the recorded prefix state names no module here: {unexpected[:3]}")

    # Measured after training, on the whole model: ASI is in its steady state
    # (warm start), and HOSVD's ranks are those of the trained weights.
    whole: dict[str, Any] = {}
    if config.transformer:
        # The whole step too: the Linear inputs are a minority of what blocks keep.
        blocks = () if layers == "all" else block_names(model, int(layers))
        whole, full = K.transformer_measurements(
            model, x_measure, y_measure, names, stepper.optimizer, blocks
        )
        memory = full.saved
    else:
        plain, factored = K.split_factored(model, names)
        memory = activation_memory(model, x_measure, layers=plain)
        whole["mem_bytes"] = memory.kept_bytes + K.factored_kept_bytes(memory, factored)
    step = training_step_flops(
        model, x_measure, loss_fn=lambda out: K.cross_entropy(out, y_measure)
    )
    if method in K.FACTORED_METHODS:
        whole.update(_factored_fields(model))
    if method in ("vanilla", *K.FACTORED_METHODS):
        whole["weight_bytes"] = _weight_bytes(model, names)
    result = {
        "method": method,
        "label": _label(method, config, threshold),
        "layers": layers,
        "threshold": threshold,
        "seed": seed,
        "accuracy": accuracy,
        "mem_bytes": memory.kept_bytes,
        "mem_analytic_bytes": memory.analytic_bytes,
        "mem_vanilla_bytes": memory.vanilla_bytes,
        "mem_full_bytes": memory.total_bytes,
        **whole,
        "gflops": step.gflops,
        "decomp_gflops": step.decomposition / 1e9,
        "gflops_detail": {
            "forward": step.forward / 1e9,
            "decomposition": step.decomposition / 1e9,
            "backward": step.backward / 1e9,
        },
        "train_seconds": train_seconds,
        "replayed_prefix": replay is not None,
        "final_loss": sum(log.losses[-5:]) / len(log.losses[-5:]),
        "steps": len(log.losses),
        "layer_names": names,
        "ranks": {
            layer.name: list(layer.ranks) for layer in memory.layers if layer.ranks is not None
        },
        **extra,
    }
    return _Trained(key, stepper, result)


def _factored_fields(model: nn.Module) -> dict[str, Any]:
    """WSI/WASI rows: each factored layer's weight rank and break-even rank
    (:attr:`~tensorcompress.torch.lowrank.LowRankModule.break_even_rank`)."""
    from tensorcompress.torch.wasi import wasi_layers

    layers = wasi_layers(model)
    return {
        "weight_ranks": {name: m.rank for name, m in layers.items()},
        "break_even_ranks": {name: m.break_even_rank for name, m in layers.items()},
    }


def _weight_bytes(model: nn.Module, names: Sequence[str]) -> int:
    """Bytes of the trained layers' own parameters: a dense layer's weight and bias, a
    factored one's factors and bias (the weight side of the WASI paper's convention)."""
    modules = dict(model.named_modules())
    return sum(
        p.numel() * p.element_size() for n in names for p in modules[n].parameters(recurse=False)
    )


def _interleaved_timing(
    trained: Sequence[_Trained], batch: tuple[torch.Tensor, torch.Tensor], rounds: int
) -> None:
    """Median step time per configuration, the configurations interleaved round by round.

    One untimed warm-up round first; then ``rounds`` rounds, each running one
    step of every configuration in turn on the same batch, so slow drifts of
    the machine (other load, thermal state) hit every method alike. Each
    round starts at the next configuration, so that none always runs right
    after the same other one. The learning-rate schedule is not advanced
    (training is over; the accuracy was measured before).
    """
    times: list[list[float]] = [[] for _ in trained]
    n = len(trained)
    for r in range(rounds + 1):
        for k in [(r + i) % n for i in range(n)]:
            _, seconds = trained[k].stepper.step(*batch, schedule=False)
            if r > 0:
                times[k].append(seconds)
    for t, ts in zip(trained, times):
        t.result["step_seconds"] = statistics.median(ts)
        t.result["step_seconds_all"] = ts


def _inference_timing(trained: Sequence[_Trained], batch: torch.Tensor, rounds: int) -> None:
    """WSI/WASI rows: the exported model's inference forward against the dense model's.

    :func:`~tensorcompress.torch.lowrank.export_low_rank` gives the model a user deploys
    (two products per factored layer); :func:`~tensorcompress.torch.lowrank.to_dense` of
    it is the same trained model with each factored weight multiplied out (``L R``), the
    original architecture. Both run in eval mode without gradients on the timing batch,
    interleaved round by round (the first order alternating) after one warm-up round;
    ``infer_ratio`` is the exported model's median over the dense one's.
    """
    from tensorcompress.torch.lowrank import export_low_rank, to_dense

    for t in trained:
        if t.key[0] not in K.FACTORED_METHODS:
            continue
        model = getattr(t.stepper.model, "module", t.stepper.model)  # DDP's wrapped model
        models = (export_low_rank(model).eval(), to_dense(export_low_rank(model)).eval())
        x = batch.contiguous(memory_format=t.stepper.memory_format)
        times: tuple[list[float], list[float]] = ([], [])
        with torch.no_grad():
            for r in range(rounds + 1):
                for k in (r % 2, 1 - r % 2):
                    T.synchronize(t.stepper.device)
                    start = time.perf_counter()
                    models[k](x)
                    T.synchronize(t.stepper.device)
                    if r > 0:
                        times[k].append(time.perf_counter() - start)
        t.result["infer_seconds"] = statistics.median(times[0])
        t.result["infer_dense_seconds"] = statistics.median(times[1])
        t.result["infer_ratio"] = t.result["infer_seconds"] / t.result["infer_dense_seconds"]


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------


@dataclass
class Experiment:
    """What :func:`run_experiment` produced (meaningful on the main process).

    Attributes
    ----------
    config : RunConfig
        The experiment.
    rows : list of Row
        Aggregated over seeds.
    notes : list of str
        Provenance: data, pretraining, rank source, machine; and the findings.
    results : list of dict
        Per (seed, method, layers, threshold).
    meta : dict
        Configuration, environment and pretraining info for results.json.
    equal : list of EqualAccuracy
        The equal-accuracy comparison (:func:`~tensorcompress.experiments.frontier.equal_accuracy`).
    tolerances : dict
        Its tolerance per layers, in accuracy points.
    tolerance_source : str
        Where the tolerances come from.
    """

    config: RunConfig
    rows: list[R.Row]
    notes: list[str]
    results: list[dict[str, Any]]
    meta: dict[str, Any]
    equal: list[FR.EqualAccuracy] = field(default_factory=list)
    tolerances: dict[str, float] = field(default_factory=dict)
    tolerance_source: str = ""

    def table(self) -> str:
        """The printed table, then the equal-accuracy comparison."""
        text = R.format_table(self.rows, self.notes, seeds=self.config.seeds)
        if self.equal:
            text += "\n\n" + R.format_equal_accuracy(self.equal, self.tolerance_source)
        return text

    def summary(self) -> dict[str, Any]:
        """results.json's ``summary``: the equal-accuracy comparison and its tolerance."""
        return {
            "equal_accuracy": [e.to_dict() for e in self.equal],
            "tolerance": self.tolerances,
            "tolerance_source": self.tolerance_source,
        }


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
    measuring = measured_plans(config.plans == "measured")
    try:
        return _run(config, env, progress, wall)
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        measured_plans(measuring)


def _backbone(
    config: RunConfig, seed: int, env: T.DistEnv, progress: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The pretrained state of ``seed`` (process 0 trains or loads it, the others receive it).

    A cached checkpoint of one of ``config.reuse_pretrain`` comes first;
    otherwise ``config.pretrain``'s, from the cache or pretrained now.
    """
    cache = None if config.cache_dir is None else Path(config.cache_dir)
    shared = None
    if env.main:
        for other in config.reuse_pretrain:
            found = T.cached_pretrained(
                config.model, config.resolution, seed, other, cache, env.device.type
            )
            if found is not None:
                shared = (found[0], {**found[1], "reused": True, "steps": other.steps})
                break
        if shared is None:
            state, info = T.pretrained_state(
                config.model,
                config.resolution,
                seed,
                config.pretrain,
                cache,
                device=env.device,
                progress=progress,
            )
            shared = (state, {**info, "steps": config.pretrain.steps})
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
    example = D.to_input(measure[0], env.device)

    runs = config.rows()
    results: list[dict[str, Any]] = []
    pre_info: list[dict[str, Any]] = []
    replayed: list[str] = []
    for seed in range(config.seed, config.seed + config.seeds):
        # Each seed has its own pretrained backbone (cached per seed), so the
        # spread over seeds covers pretraining as well as fine-tuning.
        if user_state is None:
            state, info = _backbone(config, seed, env, progress)
        else:
            state, info = user_state, {"weights": config.weights, "seed": seed}
        pre_info.append(info)
        trained: dict[tuple[str, str, float | None], _Trained] = {}
        # Configurations with the same last N share the frozen prefix (recorded
        # once for every N) and ASI's budget measurement (once per N).
        depths = [n for n in config.layers if n != "all"]
        replay = None
        if config.replay and not env.distributed and sum(key[1] != "all" for key in runs) > 1:
            replay = _record_prefix(depths, seed, config, state, (train, test), example, env)
            if replay is not None and seed == config.seed:
                replayed += [n for n in depths if replay.prefix.replays(n)]
        for layers in config.layers:
            group = [key for key in runs if key[1] == layers]
            asi: _AsiRanks | None = None
            if any(m == "asi" for m, _, _ in group) and not config.transformer:
                model, names, _ = prepare(
                    "vanilla", layers, None, seed, config, state, train, example, env
                )
                asi = _asi_ranks(
                    model, names, _budget_batches(train, config, seed, env), config.thresholds, env
                )
                del model
            for key in group:
                method, _, threshold = key
                k = runs.index(key)
                unit = "blocks" if config.transformer else "layers"
                desc = f"[{k + 1}/{len(runs)}] {_label(method, config, threshold)}, {layers} {unit}"
                desc += f" (seed {seed})" if config.seeds > 1 else ""
                t = _run_one(
                    key,
                    seed,
                    config,
                    state,
                    (train, test),
                    measure,
                    env,
                    desc if progress else None,
                    asi,
                    replay,
                )
                trained[key] = t
                if progress:
                    r = t.result
                    tqdm.write(
                        f"{desc}: accuracy {100 * r['accuracy']:.1f}%, "
                        f"Mem {r['mem_bytes'] / R.MB:.3f} MB, "
                        f"trained in {r['train_seconds']:.1f} s",
                        file=sys.stderr,
                    )
        del replay
        in_order = [trained[key] for key in runs]
        _interleaved_timing(in_order, measure, config.timing_rounds)
        # A forward is a fraction of a step: more rounds for the same noise.
        _inference_timing(in_order, example, 3 * config.timing_rounds)
        results += [t.result for t in in_order]
        del trained, in_order

    rows = R.summarise(results)
    tolerances, tolerance_source = _tolerances(config, rows, len(test))
    equal = FR.equal_accuracy(rows, tolerances)
    notes = _notes(config, env, source, train, test, pre_info, replayed)
    notes += _findings(rows, len(test))
    notes += _factored_findings(rows)
    if config.transformer:
        notes += _target_findings(rows)
    meta = {
        "config": {
            **asdict(config),
            "layers": list(config.layers),
            "methods": list(config.methods),
            "thresholds": list(config.thresholds),
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
    return Experiment(config, rows, notes, results, meta, equal, tolerances, tolerance_source)


def _tolerances(
    config: RunConfig, rows: Sequence[R.Row], n_test: int
) -> tuple[dict[str, float], str]:
    """Accuracy tolerance of the equal-accuracy comparison, per layers, and its source.

    ``--tolerance`` when given; otherwise the run's own noise on vanilla's
    accuracy with those layers: the larger of its binomial standard error on
    the test set and, with several seeds, its spread over seeds.
    """
    depths = [n for n in config.layers if n != "all"]
    if config.tolerance is not None:
        return {n: float(config.tolerance) for n in depths}, "--tolerance"
    out = {}
    for r in rows:
        if r.method == "vanilla" and r.layers in depths:
            out[r.layers] = max(FR.binomial_se(r.accuracy, n_test), r.accuracy_std)
    how = f"vanilla's accuracy noise: binomial standard error on the {n_test} test images"
    if config.seeds > 1:
        how += f", or its spread over the {config.seeds} seeds if larger"
    return out, how


def _notes(
    config: RunConfig,
    env: T.DistEnv,
    source: str,
    train: D.ImageData,
    test: D.ImageData,
    pre: Sequence[dict[str, Any]],
    replayed: Sequence[str],
) -> list[str]:
    ft = config.finetune
    opt = "AdamW" if ft.optimizer == "adamw" else "SGD"
    notes = [
        f"{config.model} at {config.resolution}x{config.resolution}, batch {ft.batch_size}"
        + (f" per process x {env.world} processes" if env.distributed else "")
        + f", {ft.epochs} epoch{'s' if ft.epochs > 1 else ''}, {opt} lr {ft.lr:g}, on {env.device}"
        + (f" ({torch.get_num_threads()} threads)" if env.device.type == "cpu" else ""),
        f"target: {source}: {len(train)} train / {len(test)} test, {train.num_classes} classes",
    ]
    if config.weights is not None:
        notes.append(f"backbone: {config.weights} (--weights)")
    else:
        for p in pre:
            how = (
                "cached (a default run's)"
                if p.get("reused")
                else "cached"
                if p.get("cached")
                else f"pretrained in {p['seconds']:.0f} s"
            )
            notes.append(
                f"backbone: {how}, procedural shapes and glyphs ({p['steps']} steps, seed "
                f"{p['seed']}), held-out source accuracy {100 * p['source_accuracy']:.1f}% "
                f"(chance {100 / len(D.SHAPE_CLASSES):.1f}%)"
            )
    if config.transformer:
        b = config.blocks
        notes += [
            "N = last blocks; trained: their Linear layers (LoRA: its adapters) and everything "
            "after the blocks (final norm, classifier). Every row: "
            f"{b.attention} attention. HOSVD, SVD, ASI, WASI: the blocks' Linear inputs "
            "compressed at ε"
            + (
                ", and every other tensor the blocks save (attention, norms, GELU) kept as "
                "per-block int8 (approximate)"
                + (
                    "; HOSVD, SVD, ASI, WASI run each MLP's GELU and fc2 as one function that "
                    "keeps the GELU input as int8 (fc2 not compressed, its weight gradient, "
                    "WASI's factors' gradients, approximate)"
                    if b.fused_mlp
                    else ""
                )
                + (
                    "; the Linear layers reading a norm (q/k/v, fc1) keep nothing and are not "
                    "compressed: their weight gradients rebuild the norm's output from its int8 "
                    "input (approximate)"
                    if b.norm_fed
                    else ""
                )
                if b.saved == "int8"
                else ""
            ),
            "ASI ε, LoRA+ASI ε: ranks fixed at ASI's cold start by explained variance ε "
            f"(q/k/v share one decomposition); LoRA: peft, r={b.lora_r}, alpha={2 * b.lora_r}, "
            f"lr {K.finetune_lr('lora', ft.lr, ft.optimizer):g}; "
            "WSI ε, WASI ε: each weight trained as factors of the rank that keeps ε of its "
            "spectrum; peak act, peak: training_memory on the timing batch",
        ]
    elif "asi" in config.methods:
        notes.append(
            "ASI ranks: budget allocation at HOSVD's memory at the same ε (hosvd@ε) on "
            f"{config.budget_batches} training batches"
        )
    if not config.transformer and any(m in K.FACTORED_METHODS for m in config.methods):
        lr = K.finetune_lr("wsi", ft.lr, ft.optimizer)
        notes.append(
            "WSI ε, WASI ε: the fine-tuned convs with groups 1 trained as factors of the rank "
            "that keeps ε of each weight's spectrum (WASI: inputs by ASI at ε, depthwise "
            f"convs' too), SGD lr {lr:g} (factored steps diverge at the dense lr)"
        )
    if config.factor == "smaller" and any(m in K.FACTORED_METHODS for m in config.methods):
        notes.append(
            "WSI ε, WASI ε (--factor smaller): only the layers whose factors at ε hold fewer "
            "numbers than their weights are factored; the others train dense (WASI: their "
            "inputs compressed as ASI's rows compress them)"
        )
    if config.weight_ranks == "budget" and any(m in K.FACTORED_METHODS for m in config.methods):
        notes.append(
            "WSI ε, WASI ε (--weight-ranks budget): weight ranks by "
            "budget.plan_weight_ranks: the bytes the weights take at ε, allocated among the "
            f"thresholds {', '.join(f'{t:g}' for t in WEIGHT_CANDIDATES)}"
            + (" and dense (--factor smaller)" if config.factor == "smaller" else "")
            + " by each layer's output error with its weight truncated, on "
            f"{config.budget_batches} training batches"
        )
    if config.weight_basis == "outputs" and any(m in K.FACTORED_METHODS for m in config.methods):
        notes.append(
            "WSI ε, WASI ε (--weight-basis outputs): each weight factored in the basis of its "
            "outputs (L the leading eigenvectors of their Gram matrix on "
            f"{config.budget_batches} training batches, R = L^T W), not by its SVD: the same "
            "ranks and bytes"
        )
    if config.frozen_threshold is not None and any(m in K.FACTORED_METHODS for m in config.methods):
        notes.append(
            f"WSI ε, WASI ε (--frozen-threshold {config.frozen_threshold:g}): the frozen "
            f"{'Linear layers' if config.transformer else 'convs with groups 1'} before the "
            "fine-tuned part factored too, each in the basis "
            f"of its outputs on {config.budget_batches} training batches at the rank that keeps "
            f"{config.frozen_threshold:g} of their energy, where smaller "
            "(lowrank.factor_by_outputs); they stay frozen, and these rows train without the "
            "replayed prefix"
        )
    if config.product_dtype != "float32":
        notes.append(
            f"ASI and HOSVD decompositions: tensor products in {config.product_dtype} "
            "(--product-dtype), eigendecompositions, bases and training in float32"
        )
    if replayed:
        notes.append(
            f"frozen prefix (last {', '.join(replayed)} layers) computed once per seed and "
            "replayed in every method's training; memory, GFLOPs and step times on the whole model"
        )
    if config.seeds > 1:
        notes.append(
            f"seeds {config.seed}..{config.seed + config.seeds - 1}: each seed pretrains its own "
            "backbone (unless --weights) and fine-tunes with its own order, classifier init and "
            "ASI seed; the train/test split is the base seed's"
        )
    return notes


def _target_findings(rows: Sequence[R.Row]) -> list[str]:
    """The transformer targets, for the deepest N: every ASI-based row and the recommended
    ε; then every WASI row against the WASI targets."""
    depths = sorted({r.layers for r in rows if r.layers != "all"}, key=int)
    if not depths:
        return []
    checks = K.target_checks(rows, depths[-1])
    out = [c.text() for c in checks]
    eps = K.recommended_threshold(checks)
    if eps is not None:
        good = [c for c in checks if c.threshold == eps and c.label.startswith("ASI ")]
        met = "meets every target" if good and good[0].all_met else "misses a target"
        out.append(
            f"recommended ε = {eps:g} (the smallest whose ASI, last {depths[-1]} blocks, is "
            f"within 1 point of vanilla's accuracy, else the most accurate): it {met}"
        )
    wasi = K.wasi_target_checks(rows, depths[-1])
    out += [c.text() for c in wasi]
    eps = K.recommended_threshold(wasi, "WASI")
    if eps is not None:
        (chosen,) = [c for c in wasi if c.threshold == eps]
        met = "meets every WASI target" if chosen.all_met else "misses a WASI target"
        out.append(
            f"recommended WASI ε = {eps:g} (the smallest whose WASI, last {depths[-1]} blocks, "
            f"is within 2 points of vanilla's accuracy, else the most accurate): it {met}"
        )
    return out


def _factored_findings(rows: Sequence[R.Row]) -> list[str]:
    """Per WSI/WASI row (first seed): how many layers are factored, their ranks, and how
    many of them hold more numbers than the dense weight (a rank above break-even); the
    WASI paper's memory convention against vanilla's (mean over seeds); the exported model's
    inference time against the dense model's."""
    out = []
    vanilla = {r.layers: r for r in rows if r.method == "vanilla"}
    for r in rows:
        fields = r.seeds[0] if r.seeds else {}
        ranks, even = fields.get("weight_ranks"), fields.get("break_even_ranks")
        if ranks is None or even is None:
            continue
        trained = len(fields.get("layer_names", ())) or len(ranks)
        text = f"{r.label}, {r.layers} layers: {len(ranks)} of {trained} layers factored"
        if ranks:
            larger = sum(ranks[n] >= even[n] for n in ranks)
            text += (
                f", weight ranks {min(ranks.values())}-{max(ranks.values())} (break-even "
                f"{min(even.values()):.0f}-{max(even.values()):.0f}); {larger} of them larger "
                "than their dense weights"
            )
        frozen = fields.get("frozen_factors")
        if frozen is not None and frozen["ranks"]:
            values = frozen["ranks"].values()
            text += (
                f"; {len(frozen['ranks'])} of {len(frozen['layers'])} frozen layers factored "
                f"at {frozen['threshold']:g} of their outputs, ranks {min(values)}-{max(values)}"
            )
        text += " (first seed)"
        paper = K.paper_convention(r, vanilla[r.layers]) if r.layers in vanilla else None
        if paper is not None:
            text += (
                f"; WASI paper's convention (the layers' weights plus their kept inputs) "
                f"{paper[0] / R.MB:.2f} MB, {paper[1]:.1f}x below vanilla's "
                f"{paper[2] / R.MB:.2f} MB (mean over seeds)"
            )
        ratios = [s["infer_ratio"] for s in r.seeds if "infer_ratio" in s]
        if ratios:
            text += (
                f"; exported for inference (export_low_rank), its forward takes "
                f"{statistics.mean(ratios):.2f}x the dense model's (mean over seeds)"
            )
        out.append(text)
    return out


def _paired_gaps(a: R.Row, b: R.Row) -> list[float]:
    """Accuracy of ``a`` minus ``b`` in points, seed by seed."""
    acc_b = {s["seed"]: s["accuracy"] for s in b.seeds}
    return [100 * (s["accuracy"] - acc_b[s["seed"]]) for s in a.seeds if s["seed"] in acc_b]


def _gap_text(a: R.Row, b: R.Row, name: str, n_test: int) -> str:
    """``a``'s accuracy against ``b``'s, or that they do not differ beyond the run's noise."""
    gap = a.accuracy - b.accuracy
    noise = FR.gap_noise(a.accuracy, b.accuracy, n_test, _paired_gaps(a, b))
    if abs(gap) <= noise:
        return f"accuracy within noise of {name}'s (±{noise:.1f} points)"
    return f"accuracy {gap:+.1f} points vs {name} (noise ±{noise:.1f})"


def _findings(rows: Sequence[R.Row], n_test: int) -> list[str]:
    """Plain statements comparing ASI with vanilla and HOSVD, per layers and ε (no spin).

    Memory and GFLOPs are measured, not sampled: their ratios are stated as
    they are. An accuracy gap is stated only beyond the run's noise
    (:func:`~tensorcompress.experiments.frontier.gap_noise`: the test set's
    sampling error of the difference, or the spread of the gaps paired by
    seed when larger); otherwise the line says it is within noise.
    """
    by = {(r.method, r.layers, r.threshold): r for r in rows}
    out = []
    for (method, layers, eps), asi in by.items():
        if method != "asi":
            continue
        van, hos = by.get(("vanilla", layers, None)), by.get(("hosvd", layers, eps))
        parts = []
        if van is not None and van.mem_mb > 0:
            parts.append(
                f"Mem {100 * asi.mem_mb / van.mem_mb:.1f}% of vanilla's, "
                + _gap_text(asi, van, "vanilla", n_test)
            )
        if hos is not None and hos.mem_mb > 0:
            part = f"Mem {asi.mem_mb / hos.mem_mb:.2f}x HOSVD's"
            if hos.gflops > 0 and hos.decomp_gflops > 0:
                part += (
                    f", GFLOPs {asi.gflops / hos.gflops:.2f}x (decomposition "
                    f"{asi.decomp_gflops / hos.decomp_gflops:.3f}x)"
                )
            parts.append(part + ", " + _gap_text(asi, hos, "HOSVD", n_test))
        if parts:
            out.append(f"ASI ε={eps:g}, {layers} layers: " + "; ".join(parts))
    return out


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

_FULL: dict[str, Any] = {
    "resolution": 48,
    "layers": ["all", "2", "4"],
    "epochs": 4,
    "batch_size": 32,
    "lr": 0.2,
    "pretrain": T.PretrainConfig(steps=600, eval_samples=1000),
    "train_samples": None,
    "test_samples": None,
    "timing_rounds": 5,
    "thresholds": list(DEFAULT_THRESHOLDS),
}
_QUICK: dict[str, Any] = {
    "resolution": 48,
    "layers": ["2"],
    "epochs": 4,
    "batch_size": 32,
    "lr": 0.2,
    "pretrain": T.PretrainConfig(steps=300, eval_samples=500),
    "train_samples": None,
    "test_samples": None,
    "timing_rounds": 2,
    "thresholds": [0.8],
}


PLANS = ("measured", "estimated")
"""Sweep plans a run takes (:attr:`RunConfig.plans`)."""
PRODUCT_DTYPES = ("float32", "bfloat16")
"""Product dtypes a run takes (:attr:`RunConfig.product_dtype`)."""
FACTOR_CHOICES = ("all", "smaller")
"""Which layers WSI/WASI rows factor (:attr:`RunConfig.factor`)."""

WEIGHT_RANK_CHOICES = ("threshold", "budget")
"""Where WSI/WASI rows' weight ranks come from (:attr:`RunConfig.weight_ranks`)."""

WEIGHT_BASES = ("weight", "outputs")
"""How WSI/WASI rows factor each weight (:attr:`RunConfig.weight_basis`)."""

WEIGHT_CANDIDATES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
"""The weight thresholds ``--weight-ranks budget`` allocates among (the row's ε joins them)."""

_VIT_FULL: dict[str, Any] = {
    "resolution": 32,
    # The last 2 and 4 blocks; vanilla on every block ("all") on request.
    "layers": ["2", "4"],
    "epochs": 2,
    "batch_size": 32,
    "lr": 1e-3,
    "pretrain": T.VIT_PRETRAINING,
    "train_samples": None,
    "test_samples": None,
    "timing_rounds": 3,
    # ASI's accuracy moves most between these two on this backbone
    # (docs/guides/transformer-experiments.md).
    "thresholds": [0.9, 0.99],
}
_VIT_QUICK: dict[str, Any] = {
    **_VIT_FULL,
    "layers": ["4"],
    "epochs": 1,
    # A cold --quick run stays under 2 minutes: 250 steps of the first 2 blocks
    # (the last 4 over 150 steps learn nothing, and vanilla stays at chance).
    "pretrain": replace(T.VIT_PRETRAINING, trained_blocks=(0, 1)).with_steps(250),
    "train_samples": 512,
    "timing_rounds": 2,
    "thresholds": [0.9],
}
_PRESETS = {
    (False, False): _FULL,
    (False, True): _QUICK,
    (True, False): _VIT_FULL,
    (True, True): _VIT_QUICK,
}
"""(transformer, quick) to the sizes a run takes when not given."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tensorcompress run``."""
    g = parser.add_argument_group("experiment")
    g.add_argument("--model", default="mcunet_in1", help=f"one of {', '.join(RUN_MODELS)}")
    g.add_argument("--resolution", type=int, help="input side in pixels (48)")
    g.add_argument(
        "--layers",
        nargs="+",
        help="'all' (vanilla only) and numbers of fine-tuned last convs or blocks "
        "(all 2 4; --quick 2; vit_tiny: 2 4, --quick 4)",
    )
    g.add_argument(
        "--methods",
        nargs="+",
        help=f"CNN: among {', '.join(K.CNN_METHODS)} (all but wsi and wasi); vit_tiny: among "
        f"{', '.join(K.TRANSFORMER_METHODS)} (all but hosvd and svd)",
    )
    g.add_argument(
        "--thresholds",
        "--threshold",
        dest="thresholds",
        nargs="*",
        metavar="EPS",
        help="explained variances of HOSVD/SVD and ASI's HOSVD budget, one row each "
        f"({' '.join(f'{t:g}' for t in DEFAULT_THRESHOLDS)}; --quick 0.8; vit_tiny: 0.9 0.99, "
        "--quick 0.9)",
    )
    g.add_argument(
        "--tolerance",
        type=float,
        help="accuracy points below vanilla's counted as equal (the run's noise)",
    )
    g.add_argument("--patch", type=int, default=2, help="gradient filter patch R (2)")
    g.add_argument(
        "--saved",
        choices=["int8", "none"],
        default="int8",
        help="vit_tiny: HOSVD/SVD/ASI keep the blocks' other saved tensors as int8 (int8)",
    )
    g.add_argument(
        "--mlp",
        choices=["fused", "separate"],
        default="fused",
        help="vit_tiny, with --saved int8: HOSVD/SVD/ASI/WASI run each MLP's GELU and fc2 as one "
        "function keeping the GELU input as int8, fc2 uncompressed (fused)",
    )
    g.add_argument(
        "--norms",
        choices=["shared", "separate"],
        default="shared",
        help="vit_tiny, with --saved int8: HOSVD/SVD/ASI leave q/k/v and fc1 uncompressed, "
        "their weight gradients rebuilding the norm's output from its int8 input (shared)",
    )
    g.add_argument("--lora-r", type=int, default=8, help="vit_tiny: LoRA rank (8)")
    g.add_argument("--epochs", type=int, help="fine-tuning epochs (4; vit_tiny 2)")
    g.add_argument("--batch-size", type=int, help="per process (32)")
    g.add_argument(
        "--lr",
        type=float,
        help="fine-tuning learning rate (0.2; vit_tiny 1e-3, LoRA rows x4)",
    )
    g.add_argument(
        "--pretrain-steps",
        type=int,
        help="source-task steps (600, --quick 300; vit_tiny 700, --quick 250)",
    )
    g.add_argument(
        "--pretrain-blocks",
        nargs="+",
        type=int,
        metavar="I",
        help="vit_tiny: indices of the blocks that pretrain, negative from the last (-4 -3 -2 -1)",
    )
    g.add_argument("--seed", type=int, default=0, help="base seed (0)")
    g.add_argument("--seeds", type=int, default=1, help="fine-tuning repeats; mean and spread")
    g.add_argument("--timing-rounds", type=int, help="interleaved timing rounds (5; --quick 2)")
    g.add_argument(
        "--quick",
        action="store_true",
        help="last 2 layers and ε=0.8 only; a 300-step backbone unless a default run's is cached",
    )
    g.add_argument(
        "--no-replay",
        action="store_true",
        help="compute the frozen prefix in every run instead of replaying it (same results)",
    )
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
    add_allocator_argument(o)
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    o.add_argument(
        "--plans",
        choices=PLANS,
        default="measured",
        help="ASI/HOSVD sweep plans: the fastest measured (default) or the estimate's, "
        "which makes ASI rows repeatable",
    )
    o.add_argument(
        "--product-dtype",
        choices=PRODUCT_DTYPES,
        default="float32",
        help="dtype of the tensor products inside the ASI/HOSVD decompositions (bfloat16: "
        "AMX or tensor cores); training stays in float32",
    )
    o.add_argument(
        "--factor",
        choices=FACTOR_CHOICES,
        default="all",
        help="WSI/WASI: factor every fine-tuned layer (all) or only those whose factors are "
        "smaller than their weights (smaller; the others train dense)",
    )
    g.add_argument(
        "--weight-ranks",
        choices=WEIGHT_RANK_CHOICES,
        default="threshold",
        help="WSI/WASI: each weight's rank keeps ε of its spectrum (threshold), or the bytes "
        "that takes, allocated across the layers by their measured output errors (budget)",
    )
    g.add_argument(
        "--weight-basis",
        choices=WEIGHT_BASES,
        default="weight",
        help="WSI/WASI: factor each weight by its truncated SVD (weight), or in the basis "
        "of its outputs on the first training batches (outputs; same ranks and bytes)",
    )
    g.add_argument(
        "--frozen-threshold",
        type=float,
        metavar="EPS",
        help="WSI/WASI: also factor the frozen layers before the fine-tuned part, in the "
        "basis of their outputs, at the rank keeping EPS of their outputs' energy (they stay "
        "frozen; the exported model is low-rank there too)",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` of parsed arguments (``--quick`` fills the unset sizes).

    ``--quick`` pretrains its own shorter backbone, but uses a default run's
    (same model, resolution and seed) when that one is cached.
    """
    transformer = K.is_transformer(args.model)
    preset = _PRESETS[(transformer, bool(args.quick))]

    def pick(name: str) -> Any:
        value = getattr(args, name, None)
        return preset[name] if value is None else value

    pretrain: T.PretrainConfig = preset["pretrain"]
    steps = getattr(args, "pretrain_steps", None)
    if steps is not None:
        pretrain = pretrain.with_steps(steps)
    blocks = getattr(args, "pretrain_blocks", None)
    if blocks is not None:
        if not transformer:
            raise ValueError(f"--pretrain-blocks is for transformers, not {args.model!r}")
        pretrain = replace(pretrain, trained_blocks=tuple(blocks))
    reuse: tuple[T.PretrainConfig, ...] = ()
    if args.quick and steps is None and blocks is None:
        reuse = (_PRESETS[(transformer, False)]["pretrain"],)
    cache = None if args.no_cache else str(args.cache_dir or T.default_cache_dir())
    return RunConfig(
        model=args.model,
        resolution=pick("resolution"),
        layers=tuple(str(x) for x in pick("layers")),
        methods=tuple(args.methods or ()),
        thresholds=tuple(pick("thresholds")),
        patch=args.patch,
        finetune=T.FineTuneConfig(
            epochs=pick("epochs"),
            batch_size=pick("batch_size"),
            lr=pick("lr"),
            weight_decay=0.05 if transformer else 0.0,
            optimizer=K.optimizer_name(args.model),
            grad_clip=1.0 if transformer else None,
        ),
        pretrain=pretrain,
        reuse_pretrain=reuse,
        seed=args.seed,
        seeds=args.seeds,
        tolerance=args.tolerance,
        data=args.data,
        weights=args.weights,
        test_fraction=args.test_fraction,
        train_samples=pick("train_samples"),
        test_samples=pick("test_samples"),
        cache_dir=cache,
        timing_rounds=pick("timing_rounds"),
        replay=not args.no_replay,
        device=args.device,
        quiet=args.quiet,
        plans=getattr(args, "plans", "measured"),
        product_dtype=getattr(args, "product_dtype", "float32"),
        factor=getattr(args, "factor", "all"),
        weight_ranks=getattr(args, "weight_ranks", "threshold"),
        weight_basis=getattr(args, "weight_basis", "weight"),
        frozen_threshold=getattr(args, "frozen_threshold", None),
        blocks=K.BlockSettings(
            saved=None if getattr(args, "saved", "int8") == "none" else "int8",
            fused_mlp=getattr(args, "mlp", "fused") == "fused",
            norm_fed=getattr(args, "norms", "shared") == "shared",
            lora_r=getattr(args, "lora_r", 8),
        ),
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
    allocator = use_allocator(args.allocator)
    env = T.init_distributed(config.device)
    try:
        exp = run_experiment(config, env)
        if env.main:
            exp.meta["environment"]["allocator"] = allocator
            table = exp.table()
            files = R.write_results(out, exp.rows, exp.meta, table, exp.summary())
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
