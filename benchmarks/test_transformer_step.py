"""One training step of a transformer's last blocks, per method: memory and time.

Models (randomly initialised from configs, :mod:`tensorcompress.models`):

- ``vit``: ViT-Tiny (hidden 192, 12 blocks, 3 heads, MLP 768) on 32x32 images
  in 4x4 patches (65 tokens), batch 64, eager attention unless a method
  switches it; the last 4 blocks are fine-tuned (``--blocks 4 12`` also runs
  all 12), with the final norm and the classifier;
- ``llama``: a TinyLlama-shaped decoder narrowed 8x (hidden 256, 32 query and
  4 key/value heads, gated MLP 704, RMSNorm), 4 blocks, vocabulary 2000,
  sequence classification, batch 16 of 128 tokens; the last 2 blocks.

Methods (:func:`tensorcompress.torch.transformer.prepare`): ``vanilla``;
``checkpoint`` (each block under ``torch.utils.checkpoint``; ``checkpoint+sdpa``
with SDPA attention, Hugging Face's default); ``lora`` (PEFT,
r=8, the blocks' Linear layers); ``lora+asi`` (ASI on the LoRA
down-projections' input); ``asi``, ``hosvd``, ``svd`` (the blocks' Linear
inputs, explained variance 0.8 or ``--rank``, q/k/v sharing one decomposition); with the
options ``+sdpa`` (SDPA attention instead of stored probabilities),
``+int8`` (the other saved tensors as per-block int8), ``+fused`` (each
MLP's GELU and fc2 as one function keeping the GELU input as int8; fc2 not
compressed) and ``+norm`` (the Linear layers reading a norm's output, q/k/v
and fc1 or gate/up, keep nothing and are not compressed: their weight
gradients rebuild the norm's output from the int8 input the norm keeps).

A step is ``zero_grad``, forward, the model's loss, backward and an AdamW
step. Per method the script reports, from
:func:`tensorcompress.torch.measure.training_memory`: weights, gradients and
AdamW state, the activations saved after the forward, the peak activation
memory over forward and backward (everything but weights, gradients and
optimizer state) and the largest groups live at that peak; the step time
(median of rounds interleaved across the methods, ratio to vanilla in the
same rounds); and the relative error of the trainable parameters' gradient
against the exact one of the same parameterisation (vanilla for full
fine-tuning, LoRA for the LoRA methods), on a batch of natural-image crops
(the ViT; random tokens for the Llama) after warm-up steps.

``pytest benchmarks/test_transformer_step.py --benchmark-only`` times each
method with pytest-benchmark (groups ``transformer step vit`` and
``transformer step llama``); ``python benchmarks/test_transformer_step.py``
prints the tables (``--help``), ``--plot PATH`` draws peak activation memory
against step time for every method.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
from torch import nn

from tensorcompress.experiments.activations import sample_images
from tensorcompress.experiments.allocator import add_allocator_argument, use_allocator
from tensorcompress.models import tiny_llama, vit_tiny
from tensorcompress.torch.measure import MB, TrainingMemory, training_memory
from tensorcompress.torch.transformer import BlockOptions, prepare

METHODS: dict[str, tuple[str, BlockOptions]] = {
    "vanilla": ("vanilla", BlockOptions()),
    "checkpoint": ("checkpoint", BlockOptions()),
    "checkpoint+sdpa": ("checkpoint", BlockOptions(attention="sdpa")),
    "lora": ("lora", BlockOptions()),
    "lora+asi": ("lora+asi", BlockOptions()),
    "asi": ("asi", BlockOptions()),
    "asi+sdpa": ("asi", BlockOptions(attention="sdpa")),
    "asi+sdpa+int8": ("asi", BlockOptions(attention="sdpa", saved="int8")),
    "asi+sdpa+int8+fused": (
        "asi",
        BlockOptions(attention="sdpa", saved="int8", fused_mlp=True),
    ),
    "asi+sdpa+int8+fused+norm": (
        "asi",
        BlockOptions(attention="sdpa", saved="int8", fused_mlp=True, norm_fed=True),
    ),
    "lora+asi+sdpa+int8": ("lora+asi", BlockOptions(attention="sdpa", saved="int8")),
    "sdpa+int8": ("vanilla", BlockOptions(attention="sdpa", saved="int8")),
    "sdpa+int8+fused": ("vanilla", BlockOptions(attention="sdpa", saved="int8", fused_mlp=True)),
    "sdpa+int8+fused+norm": (
        "vanilla",
        BlockOptions(attention="sdpa", saved="int8", fused_mlp=True, norm_fed=True),
    ),
    "hosvd": ("hosvd", BlockOptions()),
    "svd": ("svd", BlockOptions()),
}
W = max(map(len, METHODS))  # the method column's width
# The models whose MLP layout fused_mlp knows (ViTMLP, LlamaMLP).
FUSED_MODELS = ("vit", "llama")


def applies(method: str, model: str) -> bool:
    """Whether ``method`` runs on ``model`` (``+fused`` needs a known MLP layout)."""
    return "+fused" not in method or model in FUSED_MODELS


# The exact reference of each method's gradient: the same parameters trained exactly.
REFERENCE = {name: "lora" if name.startswith("lora") else "vanilla" for name in METHODS}
MODELS = ("vit", "llama")
ROUNDS, WARMUP = 5, 2  # the warm-up covers ASI's cold start
LR = 1e-4


# ---------------------------------------------------------------------------
# Models and batches
# ---------------------------------------------------------------------------


def image_batch(batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Natural-image crops (scikit-learn's sample photographs), 32x32, normalised."""
    images = sample_images()
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    crops = []
    for _ in range(batch):
        side = int(torch.randint(32, 129, (1,), generator=g))
        i = int(torch.randint(0, n, (1,), generator=g))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        crop = images[i : i + 1, :, top : top + side, left : left + side]
        crops.append(nn.functional.interpolate(crop, size=(32, 32), mode="bilinear"))
    x = torch.cat(crops)
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    return {"pixel_values": x, "labels": torch.randint(0, 10, (batch,), generator=g)}


def token_batch(batch: int, seed: int, length: int = 128, vocab: int = 2000) -> dict[str, Any]:
    """Random token ids (no padding) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "labels": torch.randint(0, 10, (batch,), generator=g)}


@dataclass(frozen=True)
class Workload:
    """A model, its batches and how many of its last blocks train."""

    model: str
    blocks: int
    batch: int
    rank: float = 0.8  # explained variance of the compressed methods' inputs

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        if self.model == "vit":
            return vit_tiny(attn_implementation="eager").train()
        return tiny_llama(
            num_labels=10, num_layers=4, vocab_size=2000, attn_implementation="eager"
        ).train()

    def batch_of(self, seed: int) -> dict[str, Any]:
        if self.model == "vit":
            return image_batch(self.batch, seed)
        return token_batch(self.batch, seed)

    def __str__(self) -> str:
        what = (
            "ViT-Tiny, 32x32 images" if self.model == "vit" else "Llama (TinyLlama / 8), 128 tokens"
        )
        return f"{what}, batch {self.batch}, last {self.blocks} blocks, ε {self.rank:g}"


WORKLOADS = {"vit": Workload("vit", 4, 64), "llama": Workload("llama", 2, 16)}


@dataclass
class Run:
    """One method on one workload: the prepared model, its optimizer, two batches."""

    name: str
    workload: Workload
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[dict[str, Any]]
    count: int = 0
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)

    @classmethod
    def make(cls, name: str, workload: Workload) -> Run:
        method, options = METHODS[name]
        options = replace(options, rank=workload.rank)
        batches = [workload.batch_of(1), workload.batch_of(2)]
        model = prepare(
            workload.build(), method, workload.blocks, example_input=batches[0], options=options
        )
        if method.startswith("lora"):
            # PEFT starts B at zero, which makes A's gradient zero: give B small seeded
            # values, as after some training, so that both factors' gradients are compared.
            g = torch.Generator().manual_seed(0)
            for n, p in sorted(model.named_parameters()):
                if ".lora_B." in n:
                    p.data.copy_(0.01 * torch.randn(p.shape, generator=g))
        params = [p for p in model.parameters() if p.requires_grad]
        return cls(name, workload, model, torch.optim.AdamW(params, lr=LR), batches)

    def step(self) -> None:
        """One training step, the two batches alternating."""
        batch = self.batches[self.count % 2]
        self.count += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.model(**batch).loss.backward()
        self.optimizer.step()

    def gradient(self) -> dict[str, torch.Tensor]:
        """Gradients of the trainable parameters on the first batch (no optimizer step)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model(**self.batches[0]).loss.backward()
        grads = {
            _canonical(n): p.grad.detach().clone()
            for n, p in self.model.named_parameters()
            if p.grad is not None
        }
        self.optimizer.zero_grad(set_to_none=True)
        return grads

    def memory(self, attribute: bool = True) -> TrainingMemory:
        return training_memory(self.model, self.batches[0], self.optimizer, attribute=attribute)


def _canonical(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def relative_error(got: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    """``||g - g_exact|| / ||g_exact||`` over all trainable parameters together."""
    names = sorted(exact)
    if sorted(got) != names:
        raise ValueError(f"different parameters: {sorted(set(got) ^ set(names))}")
    a = torch.cat([got[n].ravel() for n in names])
    b = torch.cat([exact[n].ravel() for n in names])
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------

CASES = [(m, name) for m in MODELS for name in METHODS if applies(name, m)]


@pytest.mark.parametrize("model, method", CASES, ids=[f"{m}-{n}" for m, n in CASES])
def test_training_step(benchmark: Any, model: str, method: str) -> None:
    run = Run.make(method, WORKLOADS[model])
    benchmark.group = f"transformer step {model}"
    benchmark.pedantic(run.step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    if benchmark.enabled:
        mem = run.memory(attribute=False)
        benchmark.extra_info.update(
            peak_activation_bytes=mem.peak_activation_bytes,
            activations_bytes=mem.activations_bytes,
            peak_bytes=mem.peak_bytes,
            kept_bytes=mem.kept_bytes,
        )


# ---------------------------------------------------------------------------
# Script mode: the tables
# ---------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    memory: TrainingMemory | None
    median_s: float
    ratio: float
    cpu_ratio: float
    error: float | None


def measure(
    workload: Workload, names: list[str], rounds: int, time_only: bool = False
) -> list[Row]:
    """Gradient error, memory, then interleaved step times for every method (or times only)."""
    runs = {name: Run.make(name, workload) for name in names if applies(name, workload.model)}
    errors: dict[str, float | None] = dict.fromkeys(runs)
    memory: dict[str, TrainingMemory | None] = dict.fromkeys(runs)
    if not time_only:
        errors, measured = _errors_and_memory(runs)
        memory.update(measured)
    for _ in range(WARMUP):
        for run in runs.values():
            run.step()
    order = list(runs.values())
    for k in range(rounds):
        for run in order[k % len(order) :] + order[: k % len(order)]:  # a new start each round
            start, cpu = time.perf_counter(), time.process_time()
            run.step()
            run.times.append(time.perf_counter() - start)
            run.cpu_times.append(time.process_time() - cpu)
    base = statistics.median(runs["vanilla"].times)
    base_cpu = statistics.median(runs["vanilla"].cpu_times)
    rows = []
    for name, run in runs.items():
        median = statistics.median(run.times)
        cpu = statistics.median(run.cpu_times) / base_cpu
        rows.append(Row(name, memory[name], median, median / base, cpu, errors[name]))
    return rows


def _errors_and_memory(
    runs: dict[str, Run],
) -> tuple[dict[str, float | None], dict[str, TrainingMemory]]:
    # Gradient errors first: every model still has the initial weights. ASI warms up on
    # the two batches (no optimizer step), then the gradient of batch 1 is compared.
    grads = {}
    for run in runs.values():
        for _ in range(WARMUP):
            run.gradient()
        grads[run.name] = run.gradient()
    errors: dict[str, float | None] = {
        name: relative_error(grads[name], grads[REFERENCE[name]])
        if REFERENCE[name] in grads and name != REFERENCE[name]
        else None
        for name in runs
    }
    if "asi+sdpa+int8" in grads and "asi+sdpa" in grads:
        int8 = relative_error(grads["asi+sdpa+int8"], grads["asi+sdpa"])
        print(f"int8 alone (asi+sdpa+int8 against asi+sdpa): gradient error {int8:.4f}")
    return errors, {name: run.memory() for name, run in runs.items()}


def print_table(workload: Workload, rows: list[Row], rounds: int, top: int) -> None:
    print(f"\n{workload}")
    header = (
        f"{'method':<{W}} {'peak act':>8} {'x van':>6} {'saved':>7} {'kept':>7} {'weights':>7} "
        f"{'grads':>6} {'AdamW':>6} {'peak':>7} {'step s':>7} {'x van':>6} {'cpu x':>6} "
        f"{'grad err':>8}"
    )
    print(header)
    print("-" * len(header))
    base = next((r.memory for r in rows if r.name == "vanilla"), None)
    for r in rows:
        m = r.memory
        if m is None:
            memory = f"{'':>8} {'':>6} {'':>7} {'':>7} {'':>7} {'':>6} {'':>6} {'':>7}"
        else:
            ratio = m.peak_activation_bytes / base.peak_activation_bytes if base else 1.0
            memory = (
                f"{m.peak_activation_bytes / MB:8.1f} {ratio:6.2f} "
                f"{m.activations_bytes / MB:7.1f} {m.kept_bytes / MB:7.1f} "
                f"{m.weights_bytes / MB:7.1f} {m.gradients_bytes / MB:6.1f} "
                f"{m.optimizer_bytes / MB:6.1f} {m.peak_bytes / MB:7.1f}"
            )
        err = "" if r.error is None else f"{r.error:.4f}"
        timing = f"{r.median_s:7.2f} {r.ratio:6.2f} {r.cpu_ratio:6.2f}"
        print(f"{r.name:<{W}} {memory} {timing} {err:>8}")
    print(
        "MB = 2**20 bytes. peak act: highest memory over forward+backward besides weights, "
        "gradients and optimizer state; saved: autograd's saved tensors after the forward; "
        "kept: those of the trained Linear layers (the paper's Mem); peak: weights + grads + "
        f"AdamW + peak act. step s: median of {rounds} interleaved rounds (x van: its ratio to "
        "vanilla's; cpu x: the same for the process's CPU time); grad err: relative "
        "error of the trainable parameters' gradient against the exact one of the same "
        "parameters (vanilla, or LoRA for the LoRA methods)."
    )
    measured = [(r.name, r.memory) for r in rows if r.memory is not None]
    if not measured:
        return
    print("saved by kind (MB):")
    for name, m in measured:
        kinds = ", ".join(f"{k} {b / MB:.1f}" for k, b in m.activations_by_kind if b)
        print(f"  {name:<{W}} {kinds}")
    print(f"live at the peak (largest {top} groups, MB):")
    for name, m in measured:
        groups = "; ".join(
            f"{g.nbytes / MB:.1f} {g.phase} {g.kind} {g.where}" for g in m.live_at_peak[:top]
        )
        print(f"  {name:<{W}} {groups}")


def targets(rows: list[Row]) -> list[str]:
    """Which ASI-based methods are not dominated by checkpointing (the issue's targets).

    Against the better of ``checkpoint`` and ``checkpoint+sdpa`` in each
    figure where both ran: the shorter step, the lower peak.
    """
    by = {r.name: r for r in rows}
    checkpoints = [by[n] for n in ("checkpoint", "checkpoint+sdpa") if n in by]
    if "vanilla" not in by or not checkpoints:
        return []
    van = by["vanilla"]
    step = min(r.median_s for r in checkpoints)
    peaks = [r.memory.peak_activation_bytes for r in checkpoints if r.memory is not None]
    lines = []
    for r in rows:
        if "asi" not in r.name:
            continue
        checks = {"time <= checkpoint's": r.median_s <= step}
        if r.memory is not None and van.memory is not None and peaks:
            peak = r.memory.peak_activation_bytes
            checks["peak <= checkpoint's"] = peak <= min(peaks)
            checks["peak <= 0.3 x vanilla's"] = peak <= 0.3 * van.memory.peak_activation_bytes
        marks = ", ".join(f"{k}: {'ok' if v else 'MISS'}" for k, v in checks.items())
        lines.append(f"  {r.name:<{W}} {marks}")
    return lines


def plot(results: list[tuple[Workload, list[Row]]], path: str) -> None:
    """Peak activation memory against step-time ratio, one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, (workload, rows) in zip(axes[0], results):
        for r in rows:
            if r.memory is None:
                continue
            x, y = r.ratio, r.memory.peak_activation_bytes / MB
            ax.scatter(x, y, s=25)
            ax.annotate(r.name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("step time / vanilla's")
        ax.set_ylabel("peak activation memory (MB)")
        ax.set_title(str(workload), fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    """Print the tables (``python benchmarks/test_transformer_step.py --help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--blocks",
        nargs="*",
        type=int,
        default=[4, 12],
        help="ViT blocks fine-tuned, one table each",
    )
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--rank",
        type=float,
        default=0.8,
        help="explained variance of ASI/HOSVD/SVD's compressed inputs (default 0.8)",
    )
    parser.add_argument("--top", type=int, default=5, help="groups live at the peak shown")
    parser.add_argument("--plot", help="write the peak memory / step time plot here")
    parser.add_argument(
        "--time-only", action="store_true", help="step times only (no memory, no gradient error)"
    )
    add_allocator_argument(parser)
    args = parser.parse_args()
    print(use_allocator(args.allocator))
    torch.set_num_threads(args.threads)
    names = ["vanilla", *[m for m in args.methods if m != "vanilla"]]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, AdamW, "
        f"{WARMUP} warm-up steps, medians of {args.rounds} interleaved rounds"
    )
    workloads = []
    for model in args.models:
        if model == "vit":
            workloads += [
                Workload("vit", b, WORKLOADS["vit"].batch, args.rank) for b in args.blocks
            ]
        else:
            workloads.append(replace(WORKLOADS[model], rank=args.rank))
    results = []
    for workload in workloads:
        rows = measure(workload, names, args.rounds, args.time_only)
        print_table(workload, rows, args.rounds, args.top)
        lines = targets(rows)
        if lines:
            print("targets (ASI-based methods against checkpointing and vanilla):")
            print("\n".join(lines))
        results.append((workload, rows))
    if args.plot:
        plot(results, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
