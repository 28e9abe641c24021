"""Training loops of the fine-tuning experiment: pretraining (cached), fine-tuning, evaluation.

- :func:`pretrain` trains a model from scratch on the procedural source task
  (:func:`tensorcompress.experiments.data.shape_batch`, an endless seeded
  stream); :func:`pretrained_state` caches the result on disk, keyed by
  everything that determines it, so a second run skips it.
- :func:`fine_tune` trains a prepared model on the target task for a number
  of epochs and records every step's wall time; :func:`evaluate` gives top-1
  accuracy.
- :func:`freeze_for` decides what trains when the last N convs are
  fine-tuned, with the adapter's one selector and one freeze rule
  (:func:`tensorcompress.torch.fine_tuned_modules`): the convs themselves and
  every parameterised module that runs after the first of them (BatchNorms in
  between, the classifier); everything that runs before is frozen.
  :func:`asi_budget_ranks` gives ASI its ranks under HOSVD's memory.
- :class:`DistEnv` is the process's place in a ``torchrun`` job: data are
  sharded by rank, gradients averaged by DistributedDataParallel (gloo on
  CPU, nccl on CUDA), accuracy summed over processes. Each process keeps its
  own compressed-layer (ASI) state.

Frozen BatchNorm layers still normalise with batch statistics during training
and update their running averages (``model.train()`` on the whole model, as in
the paper's code): "frozen" means no parameter is updated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from tensorcompress.experiments import data as D
from tensorcompress.experiments import kinds as K
from tensorcompress.models import get_model
from tensorcompress.torch import fine_tuned_modules, last_layers, select_layers, trainable_only
from tensorcompress.torch.budget import (
    DEFAULT_CANDIDATES,
    Allocation,
    Sensitivity,
    allocate,
    budget_from_spec,
    measure_sensitivity,
)
from tensorcompress.torch.selection import find_blocks, plain_type

__all__ = [
    "OPTIMIZERS",
    "VIT_PRETRAINING",
    "DistEnv",
    "FineTuneConfig",
    "PretrainConfig",
    "TrainLog",
    "asi_budget_ranks",
    "cached_pretrained",
    "default_cache_dir",
    "default_pretraining",
    "epoch_batches",
    "eval_batches",
    "eval_mode",
    "evaluate",
    "fine_tune",
    "freeze_for",
    "head_name",
    "init_distributed",
    "load_backbone",
    "load_pretrained",
    "make_optimizer",
    "pretrain",
    "pretrained_state",
    "synchronize",
    "tuned_convs",
]

# Bump when the source task or the pretraining loop changes: old cache
# entries then no longer match.
_PRETRAIN_VERSION = 6


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a (possibly single-process) job.

    Attributes
    ----------
    rank, world : int
        Process index and count (0 and 1 without ``torchrun``).
    device : torch.device
        This process's device.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """True on the process that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True under ``torchrun`` with more than one process."""
        return self.world > 1

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over every process (unchanged in a single process)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every process (no-op in a single process)."""
        if self.distributed:
            dist.barrier()


def _resolve_device(name: str, local_rank: int) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:N)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def init_distributed(device: str = "cpu") -> DistEnv:
    """The process's :class:`DistEnv`, joining the ``torchrun`` job if there is one.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) this
    initialises the default process group: gloo on CPU, nccl on CUDA (each
    process on ``cuda:LOCAL_RANK``). Call :func:`shutdown_distributed` at the end.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _resolve_device(device, local)
    if world <= 1:
        return DistEnv(0, 1, dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo",
            # Long enough for process 0 to pretrain while the others wait.
            timeout=timedelta(hours=2),
        )
    return DistEnv(dist.get_rank(), dist.get_world_size(), dev)


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA), so a wall clock around it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------


def head_name(model: nn.Module) -> str:
    """Qualified name of the classifier: the last ``nn.Linear`` in module order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return names[-1]


def _is_conv(module: nn.Module, name: str) -> bool:
    return plain_type(module) in (nn.Conv1d, nn.Conv2d)


def tuned_convs(model: nn.Module, layers: int | str, example_input: Any) -> list[str]:
    """The convs fine-tuned for ``layers``: every conv (``"all"``) or the last N.

    The last N are counted in execution order on ``example_input``
    (:func:`tensorcompress.torch.select_layers` with
    :func:`~tensorcompress.torch.last_layers`, the adapter's one selector).

    Parameters
    ----------
    model : nn.Module
        The model.
    layers : int or str
        ``"all"``, or a positive number of last convs (an int or its digits).
    example_input : Tensor
        One batch (a single image is enough).

    Returns
    -------
    list of str
        Qualified names of the convs.
    """
    if str(layers) == "all":
        return select_layers(model, _is_conv)
    return select_layers(model, last_layers(int(layers)), example_input)


def freeze_for(model: nn.Module, layers: int | str, example_input: Any) -> list[str]:
    """Prepare ``model`` to fine-tune ``layers``; return the fine-tuned convs.

    The convs are :func:`tuned_convs`; what trains is the adapter's one freeze
    rule, :func:`tensorcompress.torch.fine_tuned_modules` (every module with
    parameters that runs at or after the first of them, in execution order:
    the BatchNorms between and after them and the classifier); every other
    parameter is frozen. ``tensorcompress run`` and ``tensorcompress table``
    both prepare their models with it.

    Parameters
    ----------
    model : nn.Module
        The model, changed in place (``requires_grad``).
    layers : int or str
        ``"all"`` or a number of last convs.
    example_input : Tensor
        One batch, to find execution order.

    Returns
    -------
    list of str
        The fine-tuned convs, in execution order for the last N.
    """
    convs = tuned_convs(model, layers, example_input)
    trainable_only(model, fine_tuned_modules(model, convs, example_input))
    return convs


def asi_budget_ranks(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    convs: Sequence[str],
    thresholds: Sequence[float],
) -> dict[float, Allocation]:
    """ASI's per-layer ranks under HOSVD's memory, for each threshold (the paper's protocol).

    For each ``t``: the allocation :func:`tensorcompress.torch.budget.plan_ranks`
    gives with budget ``"hosvd@t"`` (the bytes HOSVD at explained variance
    ``t`` keeps in these convs) on ``batches``. The sensitivity is measured
    once, with every threshold among the candidates; each budget is then
    allocated among the candidates ``plan_ranks`` would have measured for it
    (the paper's, plus ``t``), so the result is that of one ``plan_ranks``
    call per threshold at the cost of one measurement.

    Parameters
    ----------
    model : nn.Module
        The model, prepared (frozen) but not converted.
    batches : sequence of (inputs, targets)
        Training batches to measure on.
    convs : sequence of str
        The fine-tuned convs.
    thresholds : sequence of float
        Explained-variance thresholds in (0, 1].

    Returns
    -------
    dict
        Threshold to :class:`~tensorcompress.torch.budget.Allocation`
        (``.ranks``, ``.budget_bytes``, ``.total_bytes``, ``.thresholds``).
    """
    wanted = [float(t) for t in thresholds]
    sens = measure_sensitivity(model, batches, list(convs), sorted({*DEFAULT_CANDIDATES, *wanted}))
    out = {}
    for t in wanted:
        keep = {*DEFAULT_CANDIDATES, t}
        own = Sensitivity(
            tuple(
                replace(layer, choices=tuple(c for c in layer.choices if c.threshold in keep))
                for layer in sens.layers
            ),
            sens.n_batches,
        )
        out[t] = allocate(own, budget_from_spec(f"hosvd@{t!r}", own))
    return out


# ---------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------


OPTIMIZERS = ("sgd", "adamw")
"""Optimizers of :class:`FineTuneConfig` and :class:`PretrainConfig`."""


def make_optimizer(
    name: str, params: Sequence[nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """``"sgd"``: SGD with Nesterov momentum 0.9; ``"adamw"``: AdamW decaying matrices only.

    AdamW (betas 0.9, 0.98) leaves biases, norm weights and other vectors
    undecayed, as transformer training usually does.
    """
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    if name != "adamw":
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    decay = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": weight_decay}]
    if other:
        groups.append({"params": other, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def _optimizer(
    params: Sequence[nn.Parameter], lr: float, steps: int, weight_decay: float, name: str = "sgd"
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """:func:`make_optimizer`, linear warm-up over 5 % of the steps, then cosine to 0."""
    opt = make_optimizer(name, params, lr, weight_decay)
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class TrainLog:
    """What a training run recorded.

    Attributes
    ----------
    step_seconds : list of float
        Wall time of every optimisation step (forward, backward, update).
    losses : list of float
        Training loss of every step (this process's shard).
    """

    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class FineTuneConfig:
    """Fine-tuning hyper-parameters.

    Attributes
    ----------
    epochs : int
        Passes over the training split.
    batch_size : int
        Per process.
    lr : float
        Peak learning rate (linear warm-up over 5 % of the steps, cosine to 0).
    weight_decay : float
        L2 penalty on the trained parameters.
    optimizer : {"sgd", "adamw"}
        SGD with Nesterov momentum 0.9, or AdamW (:func:`make_optimizer`).
    grad_clip : float or None
        Largest gradient norm (the trained parameters', clipped before each
        update); None: no clipping.
    """

    epochs: int = 4
    batch_size: int = 32
    lr: float = 0.2
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    grad_clip: float | None = None


class Stepper:
    """One model's optimiser and a method to run a timed training step.

    Parameters
    ----------
    model : nn.Module
        The model to train (possibly DDP-wrapped).
    total_steps : int
        Length of the learning-rate schedule.
    config : FineTuneConfig
        Hyper-parameters.
    device : torch.device
        Where the batches go.
    memory_format : torch.memory_format, optional
        Layout of the batches (``torch.channels_last`` for a model converted to it).
    """

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        config: FineTuneConfig,
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.model = model
        self.device = device
        self.memory_format = memory_format
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen")
        self.params = params
        self.grad_clip = config.grad_clip
        self.optimizer, self.scheduler = _optimizer(
            params, config.lr, total_steps, config.weight_decay, config.optimizer
        )

    def step(
        self, images: torch.Tensor, labels: torch.Tensor, schedule: bool = True
    ) -> tuple[float, float]:
        """One training step; returns ``(loss, seconds)``.

        The clock covers moving the batch, forward, backward and the update
        (with a device synchronisation on CUDA), not the data loading.
        """
        self.model.train()
        synchronize(self.device)
        start = time.perf_counter()
        x = D.to_input(images, self.device).contiguous(memory_format=self.memory_format)
        y = labels.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = K.cross_entropy(self.model(x), y)
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        synchronize(self.device)
        seconds = time.perf_counter() - start
        if schedule:
            self.scheduler.step()
        return float(loss.detach()), seconds


def epoch_batches(
    n: int, config: FineTuneConfig, seed: int, env: DistEnv
) -> list[list[torch.Tensor]]:
    """The sample indices of every training batch of :func:`fine_tune`, epoch by epoch.

    Parameters
    ----------
    n : int
        Training samples.
    config : FineTuneConfig
        Epochs and batch size.
    seed : int
        Seeds the sample order of every epoch.
    env : DistEnv
        This process's shard.

    Returns
    -------
    list of list of Tensor
        Per epoch, the index tensor of each batch, in training order.
    """
    return [
        D.batch_indices(n, config.batch_size, seed=seed, epoch=e, rank=env.rank, world=env.world)
        for e in range(config.epochs)
    ]


def fine_tune(
    model: nn.Module,
    train: D.ImageData,
    config: FineTuneConfig,
    *,
    seed: int,
    env: DistEnv,
    progress: str | None = None,
) -> tuple[TrainLog, Stepper]:
    """Train ``model`` (already frozen/converted, possibly DDP-wrapped) for ``config.epochs``.

    Parameters
    ----------
    model : nn.Module
        The model; its trainable parameters are those with ``requires_grad``.
    train : ImageData
        Training split (this process takes its shard of every epoch).
    config : FineTuneConfig
        Hyper-parameters.
    seed : int
        Seeds the sample order of every epoch.
    env : DistEnv
        Process placement.
    progress : str, optional
        Progress-bar label (no bar when None or not the main process).

    Returns
    -------
    tuple
        The :class:`TrainLog` and the :class:`Stepper` (its optimiser, to time
        further steps).
    """
    epochs = epoch_batches(len(train), config, seed, env)
    total = sum(len(e) for e in epochs)
    if total == 0:
        raise ValueError(
            f"{len(train)} training samples make no full batch of {config.batch_size} "
            f"per process ({env.world} processes); lower --batch-size"
        )
    stepper = Stepper(model, total, config, env.device)
    log = TrainLog()
    with tqdm(
        total=total, desc=progress, disable=progress is None or not env.main, leave=False
    ) as bar:
        for index in epochs:
            for images, labels in D.iterate(train, index):
                loss, seconds = stepper.step(images, labels)
                if not math.isfinite(loss):
                    raise RuntimeError(f"{progress or 'training'}: the loss became {loss}")
                log.losses.append(loss)
                log.step_seconds.append(seconds)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                bar.update()
    return log, stepper


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every module's training flag restored after it."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


EVAL_BATCH = 256
"""Images per forward in :func:`evaluate`."""


def eval_batches(data: D.ImageData, env: DistEnv) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The sample indices and network inputs :func:`evaluate` runs, this process's shard."""
    shard = torch.arange(env.rank, len(data), env.world)
    for start in range(0, len(shard), EVAL_BATCH):
        idx = shard[start : start + EVAL_BATCH]
        yield idx, D.to_input(data.images[idx], env.device)


@torch.no_grad()
def evaluate(model: nn.Module, data: D.ImageData, env: DistEnv) -> float:
    """Top-1 accuracy (in [0, 1]) on ``data``, each process scoring its shard."""
    correct = 0
    with eval_mode(model):
        for idx, x in eval_batches(data, env):
            correct += int((K.logits(model(x)).argmax(dim=1).cpu() == data.labels[idx]).sum())
    shard = len(range(env.rank, len(data), env.world))
    right, total = env.sum([correct, shard])
    return right / total if total else math.nan


# ---------------------------------------------------------------------------
# Pretraining and its cache
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining on the procedural source task.

    Attributes
    ----------
    steps : int
        Optimisation steps (each on a fresh batch of the endless stream).
    batch_size : int
        Images per step.
    lr : float
        Peak learning rate (linear warm-up over 5 % of the steps, cosine to 0).
    weight_decay : float
        L2 penalty.
    eval_samples : int
        Held-out source samples scored at the end.
    optimizer : {"sgd", "adamw"}
        SGD with Nesterov momentum 0.9 (the CNNs), or AdamW (transformers).
    coarse_resolution : int or None
        Transformers: the first ``coarse_steps`` steps run on images of this
        side (a ViT's position embeddings interpolated to its patch grid,
        Hugging Face's ``interpolate_pos_encoding``), the rest at the run's
        resolution: progressive resizing, a quarter of the tokens per image
        at half the side.
    coarse_steps : int
        Steps at ``coarse_resolution``.
    grad_clip : float or None
        Largest gradient norm; None: no clipping.
    trained_blocks : tuple of int, or None
        Transformers: indices of the blocks that pretrain (negative ones count
        from the last block). The model is cut to those blocks (with the
        embeddings, the final norm and the classifier); the other blocks are
        skipped while pretraining and keep their initialisation. None: every
        block trains.
    """

    steps: int = 600
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-5
    eval_samples: int = 1000
    optimizer: str = "sgd"
    coarse_resolution: int | None = None
    coarse_steps: int = 0
    grad_clip: float | None = None
    trained_blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0 <= self.coarse_steps <= self.steps:
            raise ValueError(
                f"coarse_steps must be in [0, steps={self.steps}], got {self.coarse_steps}"
            )
        if self.coarse_steps and self.coarse_resolution is None:
            raise ValueError("coarse_steps needs a coarse_resolution")
        if self.trained_blocks is not None and (
            not self.trained_blocks or not all(isinstance(i, int) for i in self.trained_blocks)
        ):
            raise ValueError(
                f"trained_blocks must be None or a non-empty tuple of block indices, "
                f"got {self.trained_blocks!r}"
            )

    def with_steps(self, steps: int) -> PretrainConfig:
        """The same recipe over ``steps`` steps (the coarse share of them kept)."""
        coarse = round(self.coarse_steps * steps / self.steps) if self.steps else 0
        return replace(self, steps=steps, coarse_steps=min(coarse, steps))


VIT_PRETRAINING = PretrainConfig(
    steps=700,
    batch_size=64,
    lr=1e-3,
    weight_decay=0.05,
    eval_samples=1000,
    optimizer="adamw",
    coarse_resolution=16,
    coarse_steps=589,
    grad_clip=1.0,
    trained_blocks=(-4, -3, -2, -1),
)
"""ViT-Tiny's pretraining in a default ``tensorcompress run --model vit_tiny``: the
last 4 of its 12 blocks, the ones the runs fine-tune, with blocks 1-8 skipped (they
keep :func:`~tensorcompress.models.vit_tiny`'s near-identity initialisation); AdamW
with gradients clipped to norm 1, 589 steps at 16x16 (17 tokens) and 111 at 32x32
(65 tokens).

Why these blocks: fine-tuning starts from pretrained weights, as it does for a user.
Pretraining a few blocks is what fits the budget: a 12-block ViT sits on the
chance-loss plateau of the 40-class source task for hundreds of steps while
AdamW's noise-driven updates move the small-init deep blocks far from identity
(the former recipe, all 12 blocks: 74 % digits accuracy for vanilla last-4
fine-tuning). The previous default pretrained blocks 1-2 instead, so the
fine-tuned blocks started from their initialisation; WSI/WASI then factored
random weights, and ASI's accuracy reflected fresh blocks, not fine-tuning.
``docs/guides/transformer-experiments.md`` compares the backbones (the runs that
measured them are named there)."""


def default_pretraining(model_name: str) -> tuple[int, PretrainConfig]:
    """The resolution and :class:`PretrainConfig` of a default ``tensorcompress run``.

    ViT-Tiny: 32 pixels and :data:`VIT_PRETRAINING`; the CNNs: 48 pixels and
    ``PretrainConfig()`` (600 SGD steps).
    """
    if K.is_transformer(model_name):
        return 32, VIT_PRETRAINING
    return 48, PretrainConfig()


_KEY_DEFAULTS = {
    "optimizer": "sgd",
    "coarse_resolution": None,
    "coarse_steps": 0,
    "grad_clip": None,
    "trained_blocks": None,
}
"""Fields of :class:`PretrainConfig` left out of the cache key at these values, so the
checkpoints cached before they existed keep their names."""


class _Interpolating(nn.Module):
    """A Hugging Face vision transformer called with ``interpolate_pos_encoding=True``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x, interpolate_pos_encoding=True)


@contextlib.contextmanager
def _only_blocks(model: nn.Module, indices: tuple[int, ...] | None) -> Iterator[None]:
    """Inside the block, ``model`` runs the blocks at ``indices`` only (all when None).

    The model's list of blocks (:func:`~tensorcompress.torch.selection.find_blocks`)
    is replaced by a list of those blocks, in order, and put back on exit, so that
    the skipped blocks neither run nor appear among the parameters.
    """
    if indices is None:
        yield
        return
    name, blocks = find_blocks(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    every = list(blocks.children())
    try:
        picked = sorted({range(len(every))[i] for i in indices})
    except IndexError:
        raise ValueError(
            f"trained_blocks {indices} out of range for a model of {len(every)} blocks"
        ) from None
    kept = [every[i] for i in picked]
    setattr(
        parent,
        attr,
        nn.Sequential(*kept) if isinstance(blocks, nn.Sequential) else nn.ModuleList(kept),
    )
    try:
        yield
    finally:
        setattr(parent, attr, blocks)


def pretrain(
    model_name: str,
    resolution: int,
    seed: int,
    config: PretrainConfig,
    *,
    device: torch.device | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train ``model_name`` from scratch on the source task (one process).

    The model's initialisation is seeded by ``seed`` through a forked global
    RNG (the caller's RNG state is left as it was); the data stream by
    ``seed`` too.

    Parameters
    ----------
    model_name : str
        A :data:`tensorcompress.models.MODEL_NAMES` name.
    resolution : int
        Input side in pixels.
    seed : int
        Seeds the initialisation and the data stream.
    config : PretrainConfig
        Steps, batch size, learning rate.
    device : torch.device, optional
        Where to train (CPU by default); the returned state is on the CPU.
    progress : bool
        Show a progress bar.

    Returns
    -------
    tuple
        The trained ``state_dict`` (on the CPU) and an info dict
        (``source_accuracy`` on held-out source samples, ``seconds``, the config).
    """
    device = torch.device("cpu") if device is None else device
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_model(model_name, num_classes=len(D.SHAPE_CLASSES)).to(device)
    # Channels-last runs these small depthwise/pointwise convs about a quarter
    # faster on a CPU; fine-tuning keeps the default layout the adapter expects.
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    ft = FineTuneConfig(
        epochs=1,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        optimizer=config.optimizer,
        grad_clip=config.grad_clip,
    )
    coarse = None
    if config.coarse_steps:
        if not K.is_transformer(model_name):
            raise ValueError(f"coarse_steps is for transformers, not {model_name!r}")
        coarse = _Interpolating(model)
    if config.trained_blocks is not None and not K.is_transformer(model_name):
        raise ValueError(f"trained_blocks is for transformers, not {model_name!r}")
    desc = f"pretraining {model_name} {resolution}px on shapes"
    with (
        _only_blocks(model, config.trained_blocks),
        tqdm(total=config.steps, desc=desc, disable=not progress, leave=False) as bar,
    ):
        # Built inside: the optimiser holds the trained blocks' parameters only.
        stepper = Stepper(model, config.steps, ft, device, memory_format=torch.channels_last)
        for step in range(config.steps):
            side = resolution
            stepper.model = model
            if coarse is not None and step < config.coarse_steps:
                side, stepper.model = int(config.coarse_resolution or resolution), coarse
            images, labels = D.shape_batch(config.batch_size, side, seed, step)
            loss, _ = stepper.step(images, labels)
            if not math.isfinite(loss):
                raise RuntimeError(f"pretraining diverged at step {step} (loss {loss})")
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update()
    # A different stream (seed + 1_000_003) for the held-out score.
    held_out = D.shapes(config.eval_samples, resolution, seed + 1_000_003)
    accuracy = evaluate(model, held_out, DistEnv(device=device))
    info = {
        "source": f"procedural shapes and glyphs ({len(D.SHAPE_CLASSES)} classes)",
        "source_accuracy": accuracy,
        "seconds": time.perf_counter() - start,
        "device": str(device),
        "config": asdict(config),
    }
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, info


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/tensorcompress``, else ``~/.cache/tensorcompress``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tensorcompress"


def cache_key(
    model_name: str, resolution: int, seed: int, config: PretrainConfig, device_type: str = "cpu"
) -> str:
    """File name of a pretrained checkpoint: readable prefix and a hash of everything.

    The device type is part of the key: CPU and CUDA kernels round differently,
    so a checkpoint is only the same one on the same kind of device.
    """
    fields = {
        k: v for k, v in asdict(config).items() if k not in _KEY_DEFAULTS or _KEY_DEFAULTS[k] != v
    }
    spec = {
        "model": model_name,
        "resolution": resolution,
        "seed": seed,
        "config": fields,
        "device": device_type,
        "version": _PRETRAIN_VERSION,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{model_name}-{resolution}px-seed{seed}-{digest}.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def pretrained_state(
    model_name: str,
    resolution: int,
    seed: int,
    config: PretrainConfig,
    cache_dir: Path | None,
    *,
    device: torch.device | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The pretrained ``state_dict``, from the cache when present, else trained and cached.

    Parameters
    ----------
    model_name, resolution, seed, config, device, progress
        As in :func:`pretrain`.
    cache_dir : Path or None
        Where checkpoints live (``None``: no cache, always pretrain). A
        corrupt or unreadable entry is pretrained again and overwritten.

    Returns
    -------
    tuple
        ``state_dict`` and info (with ``cached`` True when it came from disk,
        and ``path``).

    Raises
    ------
    OSError
        If ``cache_dir`` cannot be created or written (checked before pretraining).
    """
    device = torch.device("cpu") if device is None else device
    path = None
    if cache_dir is not None:
        folder = Path(cache_dir) / "pretrained"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"--cache-dir {str(cache_dir)!r} cannot be created: {err}") from err
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"--cache-dir {str(cache_dir)!r} is not writable")
        path = folder / cache_key(model_name, resolution, seed, config, device.type)
        found = _load_checkpoint(path)
        if found is not None:
            return found
    state, info = pretrain(model_name, resolution, seed, config, device=device, progress=progress)
    if path is not None:
        _atomic_save({"state_dict": state, "info": info}, path)
    return state, {**info, "cached": False, "path": None if path is None else str(path)}


def _load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """A cached checkpoint, or None when missing, truncated or foreign."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state, info = saved["state_dict"], dict(saved["info"])
    except Exception:  # a truncated or foreign file: pretrain again and overwrite it
        return None
    return state, {**info, "cached": True, "path": str(path)}


def cached_pretrained(
    model_name: str,
    resolution: int,
    seed: int,
    config: PretrainConfig,
    cache_dir: Path | None,
    device_type: str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The checkpoint :func:`pretrained_state` would load for these arguments, if cached.

    Never pretrains and never writes. Returns ``None`` when ``cache_dir`` is
    None or holds no readable checkpoint for them.
    """
    if cache_dir is None:
        return None
    path = (
        Path(cache_dir)
        / "pretrained"
        / cache_key(model_name, resolution, seed, config, device_type)
    )
    return _load_checkpoint(path)


def load_pretrained(
    model_name: str = "vit_tiny",
    *,
    seed: int = 0,
    num_classes: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    pretrain: bool = True,
    progress: bool = False,
) -> nn.Module:
    """The backbone a default ``tensorcompress run --model MODEL`` pretrains, with its weights.

    The checkpoint is the run's own (:func:`default_pretraining`, on the CPU,
    from the same cache: ``cache_dir``, by default :func:`default_cache_dir`),
    so a ``tensorcompress run --model vit_tiny`` leaves it there and this
    loads it in a second. Other code (benchmarks, notebooks) gets the same
    pretrained weights the run fine-tunes.

    Parameters
    ----------
    model_name : str
        ``"vit_tiny"`` or a CNN of :data:`tensorcompress.models.MODEL_NAMES`.
    seed : int
        The run's seed (``--seed``).
    num_classes : int, optional
        ``None``: the source task's classifier (40 classes, trained); an int:
        a fresh classifier of that size, seeded by ``seed``
        (:func:`load_backbone`).
    cache_dir : path, optional
        The checkpoint cache.
    pretrain : bool, default True
        Pretrain (and cache) when the checkpoint is missing; False raises
        ``FileNotFoundError`` instead.
    progress : bool
        Progress bar while pretraining.

    Returns
    -------
    nn.Module
        The model (a Hugging Face model for ``vit_tiny``: ``model(x).logits``),
        in training mode; ``model.pretraining`` is the checkpoint's info
        (``source_accuracy``, ``path``...).

    Examples
    --------
    >>> from tensorcompress.experiments.train import load_pretrained
    >>> vit = load_pretrained("vit_tiny", num_classes=10)  # doctest: +SKIP
    """
    resolution, config = default_pretraining(model_name)
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir)
    found = cached_pretrained(model_name, resolution, seed, config, cache)
    if found is None:
        if not pretrain:
            raise FileNotFoundError(
                f"no pretrained {model_name} (seed {seed}) in {str(cache)!r}; run "
                f"`tensorcompress run --model {model_name}` or pass pretrain=True"
            )
        found = pretrained_state(model_name, resolution, seed, config, cache, progress=progress)
    state, info = found
    if num_classes is None:
        model = get_model(model_name, num_classes=len(D.SHAPE_CLASSES))
        model.load_state_dict(state)
    else:
        model = load_backbone(model_name, num_classes, state, seed)
    model.pretraining = info  # type: ignore[assignment]
    return model


def load_backbone(
    model_name: str,
    num_classes: int,
    state: Mapping[str, torch.Tensor],
    seed: int,
) -> nn.Module:
    """A fresh ``num_classes`` model carrying ``state`` everywhere but the classifier.

    The classifier keeps its seeded random initialisation (a new task needs a
    new head), whatever the number of classes ``state`` was trained for.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_model(model_name, num_classes=num_classes)
    head = head_name(model)
    body = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    missing = [k for k in missing if not k.startswith(f"{head}.")]
    if missing or unexpected:
        raise ValueError(
            f"weights do not match {model_name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def user_weights(model_name: str, path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A ``state_dict`` file for ``model_name``, checked by :func:`tensorcompress.models.get_model`.

    The classifier's size is read from the file, so ImageNet (1000 classes)
    or any other head loads; it is replaced for the target task anyway.

    Raises
    ------
    OSError
        If the file cannot be read.
    ValueError
        If it is not a state_dict or does not match the model.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {str(p)!r} does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"could not read a state_dict from {str(p)!r}: {err}") from err
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(p)!r} holds a {type(state).__name__}, expected a state_dict")
    head = head_name(get_model(model_name, num_classes=1))
    weight = state.get(f"{head}.weight")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"state_dict in {str(p)!r} has no {head}.weight: it is not a {model_name}")
    # get_model validates the whole file (strict=True) and names it in its errors.
    model = get_model(model_name, num_classes=int(weight.shape[0]), weights=p)
    return model.state_dict()


def step_iter(
    data: D.ImageData, n: int, batch_size: int, seed: int, env: DistEnv
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` training batches of epoch 0 (this process's shard)."""
    index = D.batch_indices(
        len(data), batch_size, seed=seed, epoch=0, rank=env.rank, world=env.world
    )
    yield from D.iterate(data, index[:n])
