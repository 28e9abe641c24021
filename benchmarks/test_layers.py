"""One training step (forward + backward) of a single compressed layer.

Layers, on realistic activations
(:func:`tensorcompress.experiments.activations.realistic_activation`):

- ``conv3x3``: Conv2d 512 -> 512, 3x3, on 64 x 512 x 7 x 7 (ResNet layer4);
- ``dw3x3``: depthwise 3x3, 96 channels, on 64 x 96 x 28 x 28 (MobileNetV2);
- ``pw1x1``: Conv2d 1x1 192 -> 64 on 64 x 192 x 28 x 28 (MobileNetV2 projection);
- ``linear``: Linear 384 -> 384 on 32 x 197 x 384 tokens (ViT-S).

A step is ``y = layer(x); y.backward(gy)`` with ``x.requires_grad`` (a layer
inside the fine-tuned block, so the input gradient is part of the step), two
different batches alternating through the same layer as in training, ranks
from an explained-variance threshold, ASI warm-started. Kept bytes are the
storages autograd saved for the layer, parameters excluded.

``pytest benchmarks/test_layers.py --benchmark-only`` times each step with
pytest-benchmark, one group per layer with vanilla in each (``--source``,
``--threshold``, ``--threads``: see ``conftest.py``);
``python benchmarks/test_layers.py`` prints the ratio table (medians of rounds
interleaved across methods, against vanilla in the same rounds; ``--help``
for the options, ``--breakdown`` for where each step spends its time).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from _inputs import Setting, activation, add_arguments, settings
from _timing import bench, load_average, print_breakdown, summary, time_rounds
from torch import nn

from tensorcompress import hosvd
from tensorcompress.experiments.activations import Source
from tensorcompress.experiments.allocator import use_allocator
from tensorcompress.results import TuckerResult
from tensorcompress.torch import CompressedModule, convert

METHODS = ("vanilla", "asi", "hosvd", "svd", "gradient_filter")
ROUNDS, WARMUP = 15, 2  # the warm-up covers ASI's cold start and first-call setup

LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv3x3": (lambda: nn.Conv2d(512, 512, 3, padding=1, bias=False), (64, 512, 7, 7)),
    "dw3x3": (lambda: nn.Conv2d(96, 96, 3, padding=1, groups=96, bias=False), (64, 96, 28, 28)),
    "pw1x1": (lambda: nn.Conv2d(192, 64, 1, bias=False), (64, 192, 28, 28)),
    "linear": (lambda: nn.Linear(384, 384), (32, 197, 384)),
}

# Targets: step time as a ratio to vanilla's in the same rounds, by (method,
# layer) or by method; kept bytes as a ratio to vanilla's (images, eps 0.8).
STEP_TARGET: dict[Any, float] = {
    ("asi", "conv3x3"): 1.0,
    ("asi", "linear"): 1.0,
    "asi": 2.0,
    "hosvd": 3.0,
}
KEPT_TARGET = {"asi": 0.15}


def applicable(layer: str, method: str) -> bool:
    """Gradient filtering is defined for convolutions only."""
    return not (method == "gradient_filter" and layer == "linear")


@dataclass
class Step:
    """A layer under one method, with two batches and an output gradient."""

    layer_name: str
    method: str
    module: nn.Module
    batches: list[torch.Tensor]
    grads: list[torch.Tensor]
    count: int = 0
    kept: list[int] = field(default_factory=list)

    @classmethod
    def make(
        cls,
        layer_name: str,
        method: str,
        source: Source = "images",
        threshold: float = 0.8,
        seed: int = 0,
        product_dtype: torch.dtype | None = None,
    ) -> Step:
        build, shape = LAYERS[layer_name]
        torch.manual_seed(seed)
        module = build()
        if method in ("asi", "hosvd"):
            module = convert(module, method=method, rank=threshold, product_dtype=product_dtype)
        elif method != "vanilla":
            module = convert(module, method=method, rank=threshold)
        batches = [activation(shape, s, source).detach().requires_grad_() for s in (0, 1)]
        with torch.no_grad():
            out_shape = module.eval()(batches[0]).shape
        module.train()
        gen = torch.Generator().manual_seed(seed + 1)
        grads = [torch.randn(out_shape, generator=gen) for _ in batches]
        return cls(layer_name, method, module, batches, grads)

    def __call__(self) -> None:
        i = self.count % 2
        self.count += 1
        x = self.batches[i]
        x.grad = None
        for p in self.module.parameters():
            p.grad = None
        self.module(x).backward(self.grads[i])

    def last_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The input and output gradient of the last step."""
        i = (self.count - 1) % 2
        return self.batches[i], self.grads[i]

    def kept_bytes(self) -> int:
        """Bytes autograd saves for the layer's backward (parameters excluded)."""
        params = {p.untyped_storage().data_ptr() for p in self.module.parameters()}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()
            return t

        x = self.batches[self.count % 2]
        x.grad = None
        for p in self.module.parameters():
            p.grad = None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = self.module(x)
        y.backward(self.grads[self.count % 2])
        self.count += 1
        return sum(storages.values())

    def weight_grad_error(self) -> tuple[float, float | None]:
        """Relative dW error of the last batch, and that of exact HOSVD at the same ranks."""
        x, gy = self.last_batch()
        weight = self.module.weight
        assert weight.grad is not None
        got = weight.grad.detach().clone()
        _, exact = _vanilla_grads(self.module, x.detach(), gy)
        err = float((got - exact).norm() / exact.norm())
        res = self.module.last_result if isinstance(self.module, CompressedModule) else None
        if not isinstance(res, TuckerResult):
            return err, None
        # Textbook HOSVD: every factor from x's own unfolding, then the projection.
        x_hat = hosvd.decompose(x.detach(), list(res.ranks), sequential=False).reconstruct()
        _, ref = _vanilla_grads(self.module, x_hat, gy)
        return err, float((ref - exact).norm() / exact.norm())

    @property
    def ranks(self) -> Any:
        """Ranks the layer kept at its last step."""
        return getattr(self.module, "ranks", None)


def _vanilla_grads(
    module: nn.Module, x: torch.Tensor, gy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vanilla dL/dx and dL/dW of ``module``'s op on ``x`` (compression off)."""
    training = module.training
    module.eval()  # compressed layers run the plain op in eval mode
    try:
        x = x.detach().requires_grad_()
        w = module.weight.detach().requires_grad_()
        y = torch.func.functional_call(module, {"weight": w}, (x,))
        gx, gw = torch.autograd.grad(y, (x, w), gy)
    finally:
        module.train(training)
    return gx, gw


# ---------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------

CASES = [(layer, method) for layer in LAYERS for method in METHODS if applicable(layer, method)]


@pytest.mark.parametrize("layer, method", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_training_step(
    benchmark: Any,
    layer: str,
    method: str,
    source: Source,
    threshold: float,
    product_dtype: torch.dtype | None,
) -> None:
    step = Step.make(layer, method, source, threshold, product_dtype=product_dtype)
    products = "" if product_dtype is None else f", {product_dtype}"
    benchmark.group = f"step {layer}, {source}, eps {threshold:g}{products}"
    bench(benchmark, step, ROUNDS, WARMUP)
    # Every method keeps the input gradient exact: only dW uses the compressed input.
    x, gy = step.last_batch()
    assert x.grad is not None
    expected, _ = _vanilla_grads(step.module, x, gy)
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    if benchmark.enabled:
        benchmark.extra_info["kept_bytes"] = step.kept_bytes()
        benchmark.extra_info["ranks"] = step.ranks


@pytest.mark.parametrize("layer", list(LAYERS))
def test_kept_bytes_and_weight_grad_error(layer: str) -> None:
    """Memory and accuracy targets (deterministic, so asserted here; images, eps 0.8)."""
    vanilla = Step.make(layer, "vanilla")
    base = vanilla.kept_bytes()
    for method in ("asi", "hosvd"):
        step = Step.make(layer, method)
        step()  # ASI: the cold start; kept_bytes runs a warm step
        kept = step.kept_bytes()
        err, exact_err = step.weight_grad_error()
        assert exact_err is not None
        if method == "asi":
            assert kept <= KEPT_TARGET["asi"] * base, (kept, base)
            assert err <= exact_err + 0.05  # warm ASI is close to exact HOSVD's subspaces
        else:
            assert abs(err - exact_err) < 1e-4  # HOSVD is exact HOSVD


# ---------------------------------------------------------------------------
# Script mode: the ratio table
# ---------------------------------------------------------------------------


def measure(
    setting: Setting, repeats: int, layers: list[str], methods: list[str]
) -> list[dict[str, Any]]:
    """Median step time of interleaved rounds, kept bytes and dW error per (layer, method)."""
    rows = []
    for layer in layers:
        steps = {
            m: Step.make(
                layer, m, setting.source, setting.threshold, product_dtype=setting.product_dtype
            )
            for m in methods
            if applicable(layer, m)
        }
        faults: dict[str, list[int]] = {}
        times = time_rounds(steps, repeats, WARMUP, faults)
        kept = {m: s.kept_bytes() for m, s in steps.items()}
        base_t = summary(times["vanilla"]).median
        for m, s in steps.items():
            err, exact_err = s.weight_grad_error() if m != "vanilla" else (0.0, None)
            stats = summary(times[m])
            rows.append(
                {
                    "layer": layer,
                    "method": m,
                    "ranks": s.ranks,
                    "ms": 1e3 * stats.median,
                    "iqr_ms": 1e3 * stats.iqr,
                    "faults": summary([float(f) for f in faults[m]]).median,
                    "time_ratio": stats.median / base_t,
                    "kept_ratio": kept[m] / kept["vanilla"],
                    "gw_err": err,
                    "hosvd_err": exact_err,
                }
            )
    return rows


def _target_mark(row: dict[str, Any]) -> str:
    marks = []
    limit = STEP_TARGET.get((row["method"], row["layer"]), STEP_TARGET.get(row["method"]))
    if limit is not None:
        marks.append(f"time<={limit:g}:{'ok' if row['time_ratio'] <= limit else 'MISS'}")
    kept_limit = KEPT_TARGET.get(row["method"])
    if kept_limit is not None:
        ok = row["kept_ratio"] <= kept_limit
        marks.append(f"kept<={kept_limit:g}:{'ok' if ok else 'MISS'}")
    return " ".join(marks)


def print_table(setting: Setting, rows: list[dict[str, Any]], load: tuple[float, float]) -> None:
    """Print the ratio table of one setting, measured at ``load`` (before, after)."""
    print(f"\n{setting}; load average {load[0]:.1f} before, {load[1]:.1f} after")
    header = (
        f"{'layer':<8} {'method':<16} {'ranks':<18} {'step ms':>8} {'iqr ms':>7} {'faults':>6} "
        f"{'time/van':>8} {'kept/van':>8} {'dW err':>7} {'HOSVD@r':>7}  targets"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        hosvd_err = "" if r["hosvd_err"] is None else f"{r['hosvd_err']:.3f}"
        print(
            f"{r['layer']:<8} {r['method']:<16} {r['ranks']!s:<18} {r['ms']:8.1f} "
            f"{r['iqr_ms']:7.1f} {r['faults']:6.0f} {r['time_ratio']:8.2f} {r['kept_ratio']:8.4f} "
            f"{r['gw_err']:7.3f} {hosvd_err:>7}  {_target_mark(r)}"
        )


def main() -> None:
    """Print the table (``python benchmarks/test_layers.py --help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=ROUNDS, help="interleaved rounds")
    parser.add_argument("--layers", nargs="*", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also print where one step of each method spends its time (profiler)",
    )
    args = parser.parse_args()
    methods = ["vanilla", *[m for m in args.methods if m != "vanilla"]]
    print(
        f"torch {torch.__version__}, default threads {torch.get_num_threads()}, "
        f"{args.repeats} interleaved rounds after {WARMUP} warm-up; medians; "
        "time/van and kept/van: ratios to vanilla in the same rounds; "
        f"faults: minor page faults per step (median); {use_allocator(args.allocator)}"
    )
    for setting in settings(args):
        before = load_average()
        rows = measure(setting, args.repeats, args.layers, methods)
        print_table(setting, rows, (before, load_average()))
        if args.breakdown:
            for layer in args.layers:
                for method in methods:
                    if applicable(layer, method):
                        step = Step.make(
                            layer,
                            method,
                            setting.source,
                            setting.threshold,
                            product_dtype=setting.product_dtype,
                        )
                        step()  # ASI's cold start is not profiled
                        print_breakdown(f"{method} step of {layer} ({setting})", step)


if __name__ == "__main__":
    main()
