"""Cost of measuring per-layer sensitivity, against a plain training step.

Setting (the paper's rank-selection pass): ResNet-18 (``tensorcompress.models``),
batch 16 of 224x224 natural-image crops, the last 4 convolutions
(``last_layers(4)``: ``layer4.0.conv2``, ``layer4.0.downsample.0``,
``layer4.1.conv1``, ``layer4.1.conv2``), the 6 default candidate thresholds,
2 batches. The sensitivity pass is
:func:`tensorcompress.torch.budget.measure_sensitivity` (one forward and one
partial backward per batch, then every candidate's weight gradient from
sliced eigenbases); the training step is forward + ``loss.backward()`` of the
whole model with every parameter trainable.

``python benchmarks/test_budget_cost.py`` prints the medians of interleaved repeats
and the ratio (sensitivity over 2 batches / one training step), plus what the
allocation at the ``hosvd@0.8`` budget gains over the uniform threshold.
Measured (2-core CPU machine shared with other jobs, torch 2.13, 224x224):
training step 6.7 s, sensitivity 8.7 s, ratio 1.31 with ``--threads 1``;
ratio 2.5-3.0 with 2 threads (4.8 s / 12.0 s at load 5, 10.8 s / 32.1 s at
load 10), the difference being the multi-threaded LAPACK ``eigh`` under
oversubscription (a 512x512 ``eigh`` took 0.26 s with 2 threads, 0.04 s with 1).

``pytest benchmarks/test_budget_cost.py --benchmark-only`` times both with
pytest-benchmark in one group, ``budget``, the training step being the
baseline; with ``--benchmark-disable`` (CI) the images are 64x64 and each runs
once, so the run stays short.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from _timing import bench, summary, time_rounds
from torch import nn

from tensorcompress.experiments.activations import sample_images
from tensorcompress.experiments.allocator import add_allocator_argument, use_allocator
from tensorcompress.models import resnet18
from tensorcompress.torch import last_layers
from tensorcompress.torch.budget import (
    DEFAULT_CANDIDATES,
    Sensitivity,
    allocate,
    budget_from_spec,
    measure_sensitivity,
)

BATCH = 16
N_BATCHES = 2
N_LAYERS = 4
TARGET_STEPS = 3.0  # "at most a few training steps" for the whole pass
ROUNDS, WARMUP = 5, 1


def crops(batch: int, size: int, seed: int) -> torch.Tensor:
    """Contrast-normalised crops of the scikit-learn sample images, ``(batch, 3, size, size)``."""
    images = sample_images()
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    out = []
    for _ in range(batch):
        side = int(torch.randint(size // 2, min(h, w, 2 * size) + 1, (1,), generator=gen))
        i = int(torch.randint(0, n, (1,), generator=gen))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        crop = images[i : i + 1, :, top : top + side, left : left + side]
        out.append(nn.functional.interpolate(crop, size=(size, size), mode="bilinear"))
    x = torch.cat(out)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    return x / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-3)


@dataclass
class Setup:
    """The model, its batches and the selected layer names."""

    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    layers: list[str]
    device: torch.device

    @classmethod
    def make(cls, size: int = 224, device: str = "cpu") -> Setup:
        dev = torch.device(device)
        torch.manual_seed(0)
        model = resnet18(num_classes=10).to(dev)
        gen = torch.Generator().manual_seed(1)
        batches = [
            (
                crops(BATCH, size, seed).to(dev),
                torch.randint(0, 10, (BATCH,), generator=gen).to(dev),
            )
            for seed in range(N_BATCHES)
        ]
        layers = last_layers(N_LAYERS).select(model, batches[0][0])
        return cls(model, batches, layers, dev)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self) -> None:
        """Forward + backward of the whole model (one batch)."""
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        inputs, targets = self.batches[0]
        nn.functional.cross_entropy(self.model(inputs), targets).backward()
        self._sync()

    def sensitivity(self) -> Sensitivity:
        """The sensitivity pass over every batch."""
        sens = measure_sensitivity(self.model, self.batches, self.layers, DEFAULT_CANDIDATES)
        self._sync()
        return sens


# ---------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------


def _setup(benchmark: Any) -> Setup:
    # CI runs once with --benchmark-disable: smaller images, same code path.
    benchmark.group = "budget"
    return Setup.make(size=64 if benchmark.disabled else 224)


def test_train_step(benchmark: Any) -> None:
    setup = _setup(benchmark)
    bench(benchmark, setup.train_step, ROUNDS, WARMUP)
    assert all(p.grad is not None for p in setup.model.parameters())


def test_sensitivity(benchmark: Any) -> None:
    setup = _setup(benchmark)
    sens = bench(benchmark, setup.sensitivity, ROUNDS, WARMUP)
    assert sens.names == tuple(setup.layers)
    assert sens.n_batches == N_BATCHES
    benchmark.extra_info["errors"] = {
        layer.name: [round(c.error, 4) for c in layer.choices] for layer in sens.layers
    }
    alloc = allocate(sens, budget_from_spec("hosvd@0.8", sens))
    assert alloc.total_error <= sens.error_at(0.8)


# ---------------------------------------------------------------------------
# Script mode: the ratio
# ---------------------------------------------------------------------------


def main() -> None:
    """Print the cost ratio (``python benchmarks/test_budget_cost.py --help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=ROUNDS, help="interleaved rounds")
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_allocator_argument(parser)
    args = parser.parse_args()
    print(use_allocator(args.allocator))
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup.make(args.size, args.device)
    # Interleaved: both see the same machine state.
    times = time_rounds(
        {"step": setup.train_step, "sensitivity": setup.sensitivity}, args.repeats, WARMUP
    )
    step, sens_t = summary(times["step"]).median, summary(times["sensitivity"]).median
    sens = setup.sensitivity()
    ratio = sens_t / step
    print(
        f"torch {torch.__version__}, device {setup.device}, {torch.get_num_threads()} threads, "
        f"{args.repeats} interleaved repeats, ResNet-18, batch {BATCH}, {args.size}x{args.size}"
    )
    print(f"layers: {', '.join(setup.layers)}; candidates {DEFAULT_CANDIDATES}")
    print(f"training step (fwd+bwd, whole model): {1e3 * step:8.1f} ms (median)")
    print(f"sensitivity, {N_BATCHES} batches:        {1e3 * sens_t:8.1f} ms (median)")
    print(
        f"ratio: {ratio:.2f} training steps for {N_BATCHES} batches "
        f"({ratio / N_BATCHES:.2f} per batch); target <= {TARGET_STEPS:g}: "
        f"{'ok' if ratio <= TARGET_STEPS else 'MISS'}"
    )
    budget = budget_from_spec("hosvd@0.8", sens)
    alloc = allocate(sens, budget)
    print(
        f"hosvd@0.8 budget {budget} B: uniform 0.8 error {sens.error_at(0.8):.4f}, "
        f"allocated error {alloc.total_error:.4f} with {alloc.total_bytes} B"
    )
    for name, c in zip(alloc.names, alloc.choices):
        errs = " ".join(f"{x.error:.3f}" for x in sens[name].choices)
        print(f"  {name:<24} eps {c.threshold:.1f} ranks {c.ranks!s:<18} errors by eps: {errs}")


if __name__ == "__main__":
    main()
