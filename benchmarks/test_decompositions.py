"""Speed of the core decompositions on realistic activations.

Methods, at the same ranks (from the explained-variance threshold of HOSVD
on the first batch):

- ``asi_warm``: ``asi.decompose`` warm-started from its previous step, as in
  training: two different batches through the same layers, alternating;
- ``asi_reference``: the same warm ASI step as a straightforward
  implementation writes it (:func:`reference_asi`), a baseline;
- ``asi_official``: the same step in the structure of the paper's official
  implementation (:func:`official_asi`), the second baseline;
- ``hosvd``: ``hosvd.decompose`` at the ranks;
- ``tensorly_tucker``: TensorLy's ``tucker(init="svd", n_iter_max=1)``;
- ``torch_svd_lowrank``: torch's randomized SVD of the channel unfolding.

``pytest benchmarks/test_decompositions.py --benchmark-only`` times them with
pytest-benchmark, one group per shape (``--source``, ``--threshold`` and
``--threads`` choose the rest; see ``conftest.py``), both baselines in each.
``python benchmarks/test_decompositions.py`` prints the ratio table: rounds
interleaved across methods, medians, ratios against the baselines measured in
the same rounds, and every method's relative error on the same batch
(``--help`` for the options, ``--breakdown`` for where warm ASI, both
baselines and HOSVD spend their time).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import pytest
import tensorly as tl
import torch
from _inputs import Setting, activation, add_arguments, settings
from _timing import (
    bench,
    counted_flops,
    load_average,
    print_breakdown,
    ratio_quartiles,
    summary,
    time_rounds,
)
from tensorly.decomposition import tucker

from tensorcompress import asi, hosvd, tenalg
from tensorcompress.experiments.activations import Source, realistic_activation
from tensorcompress.experiments.allocator import use_allocator

SHAPES = [(64, 512, 7, 7), (64, 256, 14, 14), (64, 96, 28, 28), (32, 64, 56, 56), (32, 197, 384)]
METHODS = (
    "asi_warm",
    "asi_reference",
    "asi_official",
    "hosvd",
    "tensorly_tucker",
    "torch_svd_lowrank",
)
ASI_STREAMS = ("asi_warm", "asi_reference", "asi_official")
BASELINES = ("asi_reference", "asi_official")
ROUNDS, WARMUP = 7, 1

# Targets, as ratios measured in the same rounds.
ASI_SPEEDUP_TARGET = 2.5  # warm ASI against each baseline, at no larger error
TENSORLY_SPEEDUP_TARGET = 30.0  # hosvd.decompose against TensorLy
ERROR_SLACK = 1.02  # "no larger error", with 2% for a different but equally good subspace


def reference_asi(x: torch.Tensor, factors: list[torch.Tensor]) -> tuple[Any, list[Any]]:
    """ASI as a straightforward implementation writes it: every mode on the full tensor.

    For each mode: unfold (a permuted copy), one step ``Y = A_k (A_k^T U_k)``,
    QR; then the core by one full-size mode product per mode.
    """
    new = []
    for k, u in enumerate(factors):
        a_k = tenalg.unfold(x, k)
        new.append(torch.linalg.qr(a_k @ (a_k.T @ u)).Q)
    core = x
    for k, u in enumerate(new):
        core = torch.movedim(torch.tensordot(u.T, torch.movedim(core, k, 0), dims=1), 0, k)
    return core, new


def official_asi(x: torch.Tensor, factors: list[torch.Tensor]) -> tuple[Any, list[Any]]:
    """The same warm ASI step in the structure of the paper's official implementation.

    For each mode: a permuted copy of the full tensor (mode ``k`` swapped with
    mode 0, then reshaped), ``Y = A_k (A_k^T U_k)`` and a QR; the core by a
    chain of ``torch.tensordot`` over the leading mode, starting from a copy
    of the full tensor (after one contraction per mode the modes are back in
    order).
    """
    core = x.clone()
    new = []
    for k, u in enumerate(factors):
        order = list(range(x.ndim))
        order[0], order[k] = k, 0
        a_k = x.permute(order).contiguous().reshape(x.shape[k], -1)
        q = torch.linalg.qr(a_k @ (a_k.T @ u)).Q
        core = torch.tensordot(core, q, dims=([0], [0]))
        new.append(q)
    return core, new


def tensorly_tucker(x: torch.Tensor, ranks: tuple[int, ...]) -> tuple[Any, list[Any]]:
    """TensorLy's HOSVD-initialised Tucker (one HOOI sweep) on its PyTorch backend."""
    with tl.backend_context("pytorch"):
        core, factors = tucker(x, rank=list(ranks), init="svd", n_iter_max=1, tol=None)
    return core, factors


def svd_lowrank(x: torch.Tensor, ranks: tuple[int, ...]) -> tuple[Any, ...]:
    """torch's randomized SVD of the channel-mode unfolding at the channel rank."""
    return torch.svd_lowrank(tenalg.unfold(x, 1), q=ranks[1], niter=2)


def error(x: torch.Tensor, result: Any) -> float:
    """Relative reconstruction error of a Tucker (core, factors) or an SVD triple."""
    parts = tuple(result)
    if len(parts) == 3:
        u, s, v = parts
        approx = tenalg.fold((u * s) @ v.T, 1, x.shape)
    else:
        approx = tenalg.tucker_to_tensor(parts[0], list(parts[1]))
    return tenalg.relative_error(x, approx)


class Case:
    """Two batches of one activation shape, their ranks and the three warm ASI streams.

    Each stream (``asi_warm`` and both baselines) starts from the same cold
    ASI result and alternates the two batches on its own, so in every round
    all of them see the same batch after the same history.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        source: Source,
        threshold: float,
        product_dtype: torch.dtype | None = None,
    ) -> None:
        self.shape = shape
        self.product_dtype = product_dtype
        self.batches = [activation(shape, seed, source) for seed in (0, 1)]
        self.ranks = hosvd.decompose(self.batches[0], threshold).ranks
        cold = asi.decompose(self.batches[0], self.ranks)
        self.state: dict[str, Any] = {
            "asi_warm": cold,
            "asi_reference": list(cold.factors),
            "asi_official": list(cold.factors),
        }
        self.steps = dict.fromkeys(ASI_STREAMS, 0)

    def step(self, stream: str) -> tuple[torch.Tensor, Any]:
        """One warm step of ``stream`` on its next batch; return the batch and the result."""
        x = self.batches[self.steps[stream] % 2]
        self.steps[stream] += 1
        if stream == "asi_warm":
            result = asi.decompose(
                x,
                self.ranks,
                warm_start=self.state[stream],
                product_dtype=self.product_dtype,
                check_finite=False,
            )
            self.state[stream] = result
            return x, result
        core, factors = {"asi_reference": reference_asi, "asi_official": official_asi}[stream](
            x, self.state[stream]
        )
        self.state[stream] = factors
        return x, (core, factors)

    def calls(self) -> dict[str, Callable[[], tuple[torch.Tensor, Any]]]:
        """Every method as a call with no arguments, returning its batch and result."""
        x = self.batches[0]
        return {
            "asi_warm": functools.partial(self.step, "asi_warm"),
            "asi_reference": functools.partial(self.step, "asi_reference"),
            "asi_official": functools.partial(self.step, "asi_official"),
            "hosvd": lambda: (
                x,
                hosvd.decompose(
                    x, self.ranks, product_dtype=self.product_dtype, check_finite=False
                ),
            ),
            "tensorly_tucker": lambda: (x, tensorly_tucker(x, self.ranks)),
            "torch_svd_lowrank": lambda: (x, svd_lowrank(x, self.ranks)),
        }

    def asi_errors(self) -> dict[str, float]:
        """Error of one more step of every ASI stream, all on the first batch.

        Streams behind the others catch up first, so every stream takes the
        step after the same history (the same number of steps on the same
        alternating batches).
        """
        even = max(self.steps.values()) + max(self.steps.values()) % 2
        errors = {}
        for stream in ASI_STREAMS:
            while self.steps[stream] < even:
                self.step(stream)
            errors[stream] = error(*self.step(stream))
        return errors

    @functools.cached_property
    def textbook_hosvd_error(self) -> float:
        """Error of HOSVD without sequential truncation at the ranks, on the first batch."""
        x = self.batches[0]
        return tenalg.relative_error(
            x, hosvd.decompose(x, self.ranks, sequential=False).reconstruct()
        )

    @functools.cached_property
    def best_channel_svd_error(self) -> float:
        """Error of the exact truncated SVD of the first batch's channel unfolding."""
        s2 = torch.linalg.svdvals(tenalg.unfold(self.batches[0], 1).double()) ** 2
        return float((s2[self.ranks[1] :].sum() / s2.sum()).sqrt())


@functools.lru_cache(maxsize=4)
def case(
    shape: tuple[int, ...],
    source: Source,
    threshold: float,
    product_dtype: torch.dtype | None = None,
) -> Case:
    """The :class:`Case` of ``shape``, built once per process."""
    return Case(shape, source, threshold, product_dtype)


# ---------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------


def _id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_decomposition(
    benchmark: Any,
    shape: tuple[int, ...],
    method: str,
    source: Source,
    threshold: float,
    product_dtype: torch.dtype | None,
) -> None:
    c = case(shape, source, threshold, product_dtype)
    products = "" if product_dtype is None else f", {product_dtype}"
    benchmark.group = f"decompose {_id(shape)}, {source}, eps {threshold:g}{products}"
    x, result = bench(benchmark, c.calls()[method], ROUNDS, WARMUP)
    parts = tuple(result)
    if method == "torch_svd_lowrank":
        assert parts[0].shape[1] == c.ranks[1]
        # No oversampling, two power iterations: within 15% of the optimal error.
        assert error(x, result) <= 1.15 * c.best_channel_svd_error
        return
    assert tuple(parts[0].shape) == c.ranks
    err = error(x, result)
    if method in ASI_STREAMS:
        errors = c.asi_errors()
        # The baselines compute the same step; warm ASI is no less accurate.
        assert errors["asi_official"] == pytest.approx(errors["asi_reference"], rel=1e-3)
        assert errors["asi_warm"] <= ERROR_SLACK * min(errors[b] for b in BASELINES), errors
    elif method == "hosvd":
        # Sequential truncation: as accurate as textbook HOSVD, give or take.
        assert err <= ERROR_SLACK * c.textbook_hosvd_error
    else:
        # One HOOI sweep from the HOSVD start can only lower the error.
        assert err <= c.textbook_hosvd_error * (1 + 1e-4)


def test_dead_leaves_have_more_spatial_detail() -> None:
    """The second image source is there for its detail: higher spatial ranks, seeded."""
    shape = (16, 32, 14, 14)
    images = hosvd.decompose(realistic_activation(shape, 0), 0.8).ranks
    leaves = realistic_activation(shape, 0, source="dead_leaves")
    assert all(a > b for a, b in zip(hosvd.decompose(leaves, 0.8).ranks[2:], images[2:]))
    assert torch.equal(leaves, realistic_activation(shape, 0, source="dead_leaves"))
    assert not torch.equal(leaves, realistic_activation(shape, 1, source="dead_leaves"))


# ---------------------------------------------------------------------------
# Script mode: the ratio table
# ---------------------------------------------------------------------------


def measure(setting: Setting, shapes: list[tuple[int, ...]], rounds: int) -> list[dict[str, Any]]:
    """One row per shape: each method's times and error, in ``rounds`` interleaved rounds."""
    rows = []
    for shape in shapes:
        c = case(shape, setting.source, setting.threshold, setting.product_dtype)
        calls = c.calls()
        times = time_rounds(calls, rounds, WARMUP)
        errors = {m: error(*calls[m]()) for m in METHODS if m not in ASI_STREAMS}
        errors |= c.asi_errors()
        rows.append(
            {
                "shape": shape,
                "ranks": c.ranks,
                "times": times,
                "median": {m: summary(t).median for m, t in times.items()},
                "error": errors,
                "flops": {m: counted_flops(calls[m]) for m in ASI_STREAMS},
            }
        )
    return rows


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISS"


def print_table(setting: Setting, rows: list[dict[str, Any]], load: tuple[float, float]) -> None:
    """Print the ratio table of one setting, measured at ``load`` (before, after)."""
    print(f"\n{setting}; load average {load[0]:.1f} before, {load[1]:.1f} after")
    header = (
        f"{'shape':>13} {'ranks':>16} {'asi ms':>7} {'ref/asi':>7} {'(rounds)':>10} "
        f"{'off/asi':>7} {'(rounds)':>10} {'(flops)':>7} {'err asi':>7} {'err ref':>7} "
        f"{'err off':>7} {'hosvd ms':>8} {'tl/hosvd':>8} {'err hosvd':>9} {'err tl':>6} "
        f"{'lowrank ms':>10}  targets"
    )
    print(header)
    for row in rows:
        m, e, t = row["median"], row["error"], row["times"]
        ref, off = m["asi_reference"] / m["asi_warm"], m["asi_official"] / m["asi_warm"]
        ref_q = ratio_quartiles(t["asi_reference"], t["asi_warm"])
        off_q = ratio_quartiles(t["asi_official"], t["asi_warm"])
        flops = row["flops"]["asi_reference"] / row["flops"]["asi_warm"]
        tl_ratio = m["tensorly_tucker"] / m["hosvd"]
        no_larger_error = e["asi_warm"] <= ERROR_SLACK * min(e[b] for b in BASELINES)
        asi_ok = min(ref, off) >= ASI_SPEEDUP_TARGET and no_larger_error
        marks = (
            f"asi>={ASI_SPEEDUP_TARGET:g}x:{_mark(asi_ok)} "
            f"tl>={TENSORLY_SPEEDUP_TARGET:g}x:{_mark(tl_ratio >= TENSORLY_SPEEDUP_TARGET)}"
        )
        print(
            f"{_id(row['shape']):>13} {','.join(map(str, row['ranks'])):>16} "
            f"{1e3 * m['asi_warm']:7.2f} {ref:7.2f} {f'{ref_q[0]:.2f}-{ref_q[1]:.2f}':>10} "
            f"{off:7.2f} {f'{off_q[0]:.2f}-{off_q[1]:.2f}':>10} {flops:7.2f} "
            f"{e['asi_warm']:7.4f} {e['asi_reference']:7.4f} {e['asi_official']:7.4f} "
            f"{1e3 * m['hosvd']:8.2f} {tl_ratio:8.1f} {e['hosvd']:9.4f} "
            f"{e['tensorly_tucker']:6.4f} {1e3 * m['torch_svd_lowrank']:10.2f}  {marks}"
        )


def print_stats(rows: list[dict[str, Any]]) -> None:
    """Print every method's statistics, as pytest-benchmark's table names them (ms)."""
    print(
        f"{'shape':>13} {'method':<18} {'min':>8} {'median':>8} {'q1':>8} {'q3':>8} "
        f"{'iqr':>7} {'mean':>8} {'rounds':>6}"
    )
    for row in rows:
        for method, times in row["times"].items():
            s = summary(times)
            print(
                f"{_id(row['shape']):>13} {method:<18} {1e3 * s.min:8.2f} {1e3 * s.median:8.2f} "
                f"{1e3 * s.q1:8.2f} {1e3 * s.q3:8.2f} {1e3 * s.iqr:7.2f} {1e3 * s.mean:8.2f} "
                f"{s.rounds:6d}"
            )


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split("x"))


def main() -> None:
    """Print the ratio tables (``python benchmarks/test_decompositions.py --help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=ROUNDS, help="interleaved rounds")
    parser.add_argument(
        "--shapes", nargs="+", type=_shape, default=SHAPES, metavar="AxBxC", help="activations"
    )
    parser.add_argument("--stats", action="store_true", help="also print every method's statistics")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also print where warm ASI, both baselines and hosvd spend one call (profiler)",
    )
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, default threads {torch.get_num_threads()}, "
        f"{args.repeats} interleaved rounds after {WARMUP} warm-up; medians. ref/asi and "
        "off/asi: baseline time over warm ASI's ((rounds): middle half of the ratios round "
        "by round; (flops): reference's counted operations over warm ASI's); tl/hosvd: "
        "TensorLy's time over hosvd.decompose's at the same ranks; errors on the same batch; "
        f"{use_allocator(args.allocator)}."
    )
    for setting in settings(args):
        before = load_average()
        rows = measure(setting, args.shapes, args.repeats)
        print_table(setting, rows, (before, load_average()))
        if args.stats:
            print_stats(rows)
        if args.breakdown:
            for shape in args.shapes:
                c = case(shape, setting.source, setting.threshold, setting.product_dtype)
                calls = c.calls()
                for method in (*ASI_STREAMS, "hosvd"):
                    print_breakdown(f"{method} on {_id(shape)} ({setting})", calls[method])


if __name__ == "__main__":
    main()
